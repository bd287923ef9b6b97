"""One variance analysis: config -> validated plan -> each attack's own loop over the same clean
images with the recorder on -> variance.csv/.md/.tex/.png and the run record variance.json.

It shares tgr-bench's plan pieces, source preparation, progress, run record, lock and entry
wrapper (pipeline.py); what is its own is the statistics. Cheap rather than resumable: one pass
of each attack over the images, nothing saved per image; a run that stops is re-run from the
start, and a re-run of a complete analysis with the same identity and images does nothing. The
cost of the recording is measured on the first batch of each attack (the same attack again
without it) and recorded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tgr_bench.attacks import MIFGSM, build_attack
from tgr_bench.attacks.architectures import source_family
from tgr_bench.console import make_console, progress
from tgr_bench.crafting import image_seeds
from tgr_bench.data import DataSpec, ImageSet, data_spec, load_dataset
from tgr_bench.errors import UserError
from tgr_bench.hashing import digest
from tgr_bench.images import quantize
from tgr_bench.models import ModelSpec, WeightFile, check_model_name, resolve_weights
from tgr_bench.pipeline import (
    build_source,
    complete,
    data_info,
    new_record,
    recorded,
    resolve_output_dir,
    smoke_labels,
)
from tgr_bench.pixels import batches
from tgr_bench.plan import invalid_id, once, root_settings
from tgr_bench.record import VARIANCE_JSON, Identity, RunRecord
from tgr_bench.report.writers import print_table
from tgr_bench.resume import run_lock
from tgr_bench.settings import Runtime
from tgr_bench.variance.blocks import BLOCKS, refuse, source_blocks
from tgr_bench.variance.recorder import GradientRecorder
from tgr_bench.variance.settings import VarianceSettings
from tgr_bench.variance.tables import FILES, long_frame, wide, write_all

log = logging.getLogger(__name__)


def _attacks(config: dict[str, Any], spec: ModelSpec) -> list[tuple[str, MIFGSM]]:
    """(name, attack) for every name of `attacks`, each from its `attack_overrides.<name>`
    entry (the packaged attack config with any overrides), built for the source's family."""
    settings: VarianceSettings = root_settings(VarianceSettings, config)
    configs = config.get("attack_overrides") or {}
    available = ", ".join(sorted(configs))
    names = list(settings.attacks)
    if not names:
        raise UserError(f"attacks= lists no attack; choose some of: {available}.")
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise UserError(f"Unknown attack(s) {unknown} in attacks=; available: {available}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"attacks= lists {repeated} more than once.")
    family = source_family(spec.arch)
    return [
        (n, build_attack(configs[n], family, spec.key, f"attack_overrides.{n}", spec.arch))
        for n in names
    ]


def _supported(name: str, attack: MIFGSM) -> None:
    """The statistics are per image and the loop aims at the true labels: copies (SI, Admix)
    would count as images, and a targeted loss would aim at another class."""
    unsupported = [m for m in ("si", "admix") if getattr(attack, m) is not None]
    unsupported += ["targeted"] if attack.targeted else []
    if unsupported:
        raise UserError(
            f"attack_overrides.{name}: tgr-bench-variance does not support "
            f"{' or '.join(unsupported)} (its statistics are one per image, on untargeted "
            f"attacks). Turn them off for this analysis; DI, TI and PatchOut are supported."
        )


def _family(spec: ModelSpec) -> str:
    family = source_family(spec.arch)
    if family not in BLOCKS:
        what = f"the source {spec.key}" + (f" (family {family})" if family else "")
        raise refuse(what)
    return family


@dataclass(frozen=True)
class VarianceSpec:
    """An analysis's config, resolved."""

    config: dict[str, Any]
    settings: VarianceSettings
    data: DataSpec
    source: ModelSpec
    family: str
    attacks: list[tuple[str, MIFGSM]]

    def content(self) -> dict[str, Any]:
        """What the analysis is a function of: its short hash names the default run
        directory, so the same command lands in the same place."""
        return {
            "source": self.source.identity(),
            "data": self.data.identity(),
            "shard": list(self.data.shard_of) if self.data.shard_of else None,
            "attacks": [
                {"name": n, "label": a.label, "params": a.params()} for n, a in self.attacks
            ],
            "seed": self.settings.seed,
            "precision": self.settings.precision,
        }

    @property
    def identity(self) -> Identity:
        c = self.content()
        return Identity(
            source=c["source"],
            attack="variance",
            params={"attacks": c["attacks"]},
            data=c["data"],
            seed=c["seed"],
            precision=c["precision"],
            shard=self.data.shard_of,
        )


def _resolve(config: dict[str, Any]) -> VarianceSpec:
    settings: VarianceSettings = root_settings(VarianceSettings, config)
    source = ModelSpec.of(config["source"])
    family = _family(source)
    attacks = _attacks(config, source)
    for name, attack in attacks:
        _supported(name, attack)
    return VarianceSpec(config, settings, data_spec(config.get("data")), source, family, attacks)


def resolve(cfg: Any, keep: bool = True) -> VarianceSpec:
    return once(cfg, _resolve, keep)


def variance_id(*, _root_: DictConfig) -> str:
    """The default run directory's id: the analysis's identity, short. A config that is not
    valid gets a directory of its own; the run then stops with the reason."""
    try:
        return digest(resolve(_root_).content())[:12]
    except Exception:
        return invalid_id(_root_)


@dataclass
class VariancePlan:
    spec: VarianceSpec
    out_dir: Path
    runtime: Runtime
    weights: WeightFile
    data: ImageSet


def make_plan(cfg: Any, out_dir: Path) -> VariancePlan:
    """Every input error surfaces here, before anything is built or written."""
    spec = resolve(cfg, keep=False)
    runtime = Runtime.of(spec.settings)
    check_model_name(spec.source)
    data = load_dataset(spec.data)
    for _, attack in spec.attacks:
        attack.check_data(*data.size)
    weights = resolve_weights(spec.source, spec.settings.tf2torch_dir)
    return VariancePlan(spec, out_dir, runtime, weights, data)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # between attacks only: the timings must be whole
    return time.perf_counter()


@dataclass
class Analysis:
    """Per-image values of one attack and what its first batch cost."""

    parts: dict[str, list[torch.Tensor]]
    seconds: float = 0.0
    first: dict[str, Any] | None = None


def _timed(attack: MIFGSM, model: torch.nn.Module, x: Any, y: Any, seeds: list[int], device: Any,
           recorder: GradientRecorder | None) -> tuple[torch.Tensor, float]:  # fmt: skip
    start = _clock(device)
    if recorder is None:
        adv = attack.perturb(model, x, y, seeds)
    else:
        with recorder.recording(attack):
            adv = attack.perturb(model, x, y, seeds)
    return adv, _clock(device) - start


def _first_batch(
    attack: MIFGSM, model: Any, clean: torch.Tensor, y: Any, seeds: list[int],
    adv: torch.Tensor, recorded_s: float,
) -> dict[str, Any]:  # fmt: skip
    """The same batch again without the recorder: the cost of recording, and the proof that
    recording changes no image."""
    x = clean.float() / 255.0
    plain_adv, plain_s = _timed(attack, model, x, y, seeds, clean.device, None)
    eps = attack.eps_levels
    same = torch.equal(quantize(adv, clean, eps), quantize(plain_adv, clean, eps))
    if not same:
        log.warning("%s: images with and without recording differ", attack.label)
    return {
        "images": len(clean),
        "recorded_s": round(recorded_s, 4),
        "plain_s": round(plain_s, 4),
        "ratio": round(recorded_s / plain_s, 4) if plain_s > 0 else None,
        "identical_images": same,
    }


def _batch(name: str, attack: MIFGSM, model: Any, recorder: GradientRecorder, clean: Any,
           y: Any, seeds: list[int], out: Analysis, time_first: bool) -> None:  # fmt: skip
    x = clean.float() / 255.0
    try:
        adv, seconds = _timed(attack, model, x, y, seeds, clean.device, recorder)
        stats = recorder.take()
        if time_first:
            out.first = _first_batch(attack, model, clean, y, seeds, adv, seconds)
    except torch.cuda.OutOfMemoryError:
        raise UserError(
            f"{name} on a batch of {len(clean)} images does not fit in GPU memory; lower "
            f"batch_size=."
        ) from None
    out.seconds += seconds
    out.parts["scale_free_var"].append(stats.scale_free_var)
    out.parts["raw_var"].append(stats.raw_var)
    if stats.input_cos is not None:
        out.parts["input_cos"].append(stats.input_cos)


def analyse_attack(
    name: str, attack: MIFGSM, model: torch.nn.Module, recorder: GradientRecorder,
    data: ImageSet, runtime: Runtime, time_plain: bool, bars: Any,
) -> tuple[dict[str, torch.Tensor | None], dict[str, Any]]:  # fmt: skip
    """Run `attack`'s own loop over every image with the recorder on. Returns the per-image
    values ({statistic: (blocks, images) or (images,)}) and what the record keeps of it."""
    out = Analysis({"scale_free_var": [], "raw_var": [], "input_cos": []})
    seeds = image_seeds(data.stems, runtime.seed)
    task = bars.add_task(name, total=len(data))
    with attack.source_context(model):  # TGR/PNA/SGM: their hooks, proven by their probe
        chunks = batches(data.pixels, range(len(data)), runtime.batch_size)
        for i, (idx, decoded) in enumerate(chunks):
            clean, y = decoded.to(runtime.device), data.labels[idx].to(runtime.device)
            batch_seeds = [seeds[j] for j in idx]
            _batch(name, attack, model, recorder, clean, y, batch_seeds, out, i == 0 and time_plain)
            bars.advance(task, len(idx))
    values: dict[str, torch.Tensor | None] = {
        "scale_free_var": torch.cat(out.parts["scale_free_var"], dim=1),
        "raw_var": torch.cat(out.parts["raw_var"], dim=1),
        "input_cos": torch.cat(out.parts["input_cos"]) if out.parts["input_cos"] else None,
    }
    info = {
        "name": name,
        "label": attack.label,
        "reference": attack.reference,
        "params": attack.params(),
        "hooks": attack.stats(),  # TGR's fired counts include the timing pass, when made
        "images": len(data),
        "seconds": round(out.seconds, 3),
        "first_batch": out.first,
    }
    return values, info


def warm_up(model: torch.nn.Module, data: ImageSet, runtime: Runtime) -> None:
    """One forward/backward at the batch size before anything is timed: one-time costs
    (allocator growth, library handles) would otherwise count against the first attack."""
    idx = list(range(min(len(data), runtime.batch_size)))
    x = data.pixels.load(idx).to(runtime.device).float().div_(255.0).requires_grad_(True)
    model(x).logsumexp(-1).sum().backward()


def _cost(attacks: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    timed = [a["first_batch"] for a in attacks if a["first_batch"]]
    recorded_s = sum(t["recorded_s"] for t in timed)
    plain_s = sum(t["plain_s"] for t in timed)
    return {
        "device": device.type,
        "analysis_s": round(sum(a["seconds"] for a in attacks), 3),
        # The same attacks on their first batch, with and without the recorder.
        "first_batch_recorded_s": round(recorded_s, 4) if timed else None,
        "first_batch_plain_s": round(plain_s, 4) if timed else None,
        "relative_to_crafting": round(recorded_s / plain_s, 4) if timed and plain_s > 0 else None,
    }


def _complete(plan: VariancePlan) -> RunRecord | None:
    """The record of a complete analysis with this identity and these images, or None."""
    try:
        record = RunRecord.load(plan.out_dir, VARIANCE_JSON)
    except UserError:
        return None
    if record is None or not record.complete or not record.analysis:
        return None
    files = all((plan.out_dir / f).is_file() for f in FILES)
    same = record.identity.digest() == plan.spec.identity.digest()
    clean = record.analysis.get("clean_sha256") == plan.data.digest
    return record if files and same and clean else None


def _analyse(plan: VariancePlan, record: RunRecord, model: Any, blocks: list, data: ImageSet,
             console: Any) -> Any:  # fmt: skip
    """Every attack's loop with the recorder on; the tables and the plot; returns the frame."""
    rt = plan.runtime
    recorder = GradientRecorder(blocks, model.net)
    if plan.spec.settings.time_plain:
        warm_up(model, data, rt)
    per_image, attacks = {}, []
    with progress(console) as bars:
        for name, attack in plan.spec.attacks:
            per_image[name], info = analyse_attack(
                name, attack, model, recorder, data, rt, plan.spec.settings.time_plain, bars
            )
            attacks.append(info)
    frame = long_frame(per_image, [name for name, _ in blocks])
    title = f"Gradient variance inside {plan.spec.source.key}: {len(data)} images"
    files = write_all(frame, plan.out_dir, title)
    record.analysis = {
        "identity_sha256": digest(plan.spec.content()),
        "clean_sha256": plan.data.digest,  # the images as read, before any smoke labels
        "images": list(data.stems),
        "attacks": attacks,
        "cost": _cost(attacks, rt.device),
        "files": [p.name for p in files],
    }
    return frame, title


def _stopped(signal_error: BaseException) -> str:
    what = "Ctrl-C" if isinstance(signal_error, KeyboardInterrupt) else "SIGTERM"
    return f"stopped by {what}; nothing is kept per image: re-run the command to start over."


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> RunRecord:
    """Validate, run every attack with the recorder, write the tables, the plot and the record
    (variance.json) into the run directory; returns the record."""
    console = make_console()
    plan = make_plan(cfg, resolve_output_dir(output_dir))
    rt, out = plan.runtime, plan.out_dir
    done = _complete(plan)
    if done is not None:
        console.print(f"[green]already complete:[/green] {out} (same identity); nothing to do")
        return done
    record = new_record(plan.spec.identity, plan.spec.config, rt)
    record.determinism = rt.apply()
    loaded = build_source(plan.spec.source, plan.weights, rt)
    blocks = source_blocks(loaded.model, plan.spec.family)
    data = smoke_labels(plan.data, plan.spec.data, loaded, rt)
    record.data = data_info(data)
    names = [name for name, _ in blocks]
    record.source = {**loaded.provenance(), "family": plan.spec.family, "blocks": names}
    with run_lock(out), recorded(record, out, _stopped, VARIANCE_JSON):
        frame, title = _analyse(plan, record, loaded.model, blocks, data, console)
        complete(record, out, VARIANCE_JSON)
    print_table(wide(frame, "scale_free_var"), f"{title} (scale-free variance per block)", console)
    cost = record.analysis["cost"] if record.analysis else {}
    if cost.get("relative_to_crafting") is not None:
        console.print(
            f"recording cost: {cost['relative_to_crafting']:.2f}x the time of the same attacks "
            f"without it (first batch of each)"
        )
    files = ", ".join(record.analysis["files"]) if record.analysis else ""
    console.print(f"[green]done:[/green] {files} in {out}")
    return record
