"""One variance analysis: config -> validated plan -> each attack's own loop over the same clean
images with the recorder on -> variance.csv/.md/.tex/.png and variance.json.

Cheap rather than resumable: one pass of each attack over the images, nothing saved per image;
a run that stops is re-run from the start, and a re-run of a complete analysis with the same
identity and images does nothing. The cost of the recording is measured on the first batch of
each attack (the same attack again without it) and written to variance.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tgr_bench import provenance
from tgr_bench.atomic import atomic_write
from tgr_bench.attacks import Attack, build_attack
from tgr_bench.attacks.architectures import source_family
from tgr_bench.crafting import image_seeds
from tgr_bench.data import DataSpec, ImageSet, load_dataset
from tgr_bench.errors import UserError
from tgr_bench.evaluate import predict
from tgr_bench.images import quantize
from tgr_bench.models import ModelSpec, Weights, build_model, check_model_name, resolve_weights
from tgr_bench.pixels import batches
from tgr_bench.record import digest
from tgr_bench.report.writers import print_table
from tgr_bench.settings import Runtime
from tgr_bench.variance.blocks import BLOCKS, refuse, source_blocks
from tgr_bench.variance.recorder import GradientRecorder
from tgr_bench.variance.tables import FILES, long_frame, wide, write_all

log = logging.getLogger(__name__)

RECORD = "variance.json"


def _container(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _out_dir(output_dir: str | Path | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise UserError("No output directory: call run(cfg, output_dir=...) or use tgr-bench-variance.")


def build_attacks(cfg: Any, spec: ModelSpec) -> list[tuple[str, Attack]]:
    """(name, attack) for every name of `attacks`, each from its `attack_overrides.<name>`
    entry (the packaged attack config with any overrides), bound to the source's family."""
    names = _container(cfg.get("attacks")) or []
    names = [names] if isinstance(names, str) else list(names)
    configs = _container(cfg.get("attack_overrides")) or {}
    available = ", ".join(sorted(configs))
    if not names:
        raise UserError(f"attacks= lists no attack; choose some of: {available}.")
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise UserError(f"Unknown attack(s) {unknown} in attacks=; available: {available}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"attacks= lists {repeated} more than once.")
    attacks = [(n, build_attack(configs[n], spec.arch, spec.key)) for n in names]
    for n, attack in attacks:
        # The statistics are per image and the loop here aims at the true labels: copies
        # (SI, Admix) would count as images, and a targeted loss would aim at the wrong class.
        unsupported = [m for m in ("si", "admix") if getattr(attack, m) is not None]
        unsupported += ["targeted"] if attack.targeted else []
        if unsupported:
            raise UserError(
                f"attack_overrides.{n}: tgr-bench-variance does not support "
                f"{' or '.join(unsupported)} (its statistics are one per image, on untargeted "
                f"attacks). Turn them off for this analysis; DI, TI and PatchOut are supported."
            )
    return attacks


def _family(spec: ModelSpec) -> str:
    family = source_family(spec.arch)
    if family not in BLOCKS:
        what = f"the source {spec.key}" + (f" (family {family})" if family else "")
        raise refuse(what)
    return family


def _identity(
    cfg: Any, spec: ModelSpec, data: DataSpec, attacks: list[tuple[str, Attack]]
) -> dict[str, Any]:
    return {
        "source": spec.identity(),
        "data": data.identity(),
        "shard": list(data.shard_of) if data.shard_of else None,
        "attacks": [{"name": n, "label": a.label, "params": a.params()} for n, a in attacks],
        "seed": int(cfg.get("seed", 0)),
        "precision": str(cfg.get("precision", "fp32")),
    }


def identity(cfg: Any) -> dict[str, Any]:
    """What the analysis is a function of, from resolved values (as record.Identity for a run):
    the default run directory is its short hash, so the same command lands in the same place."""
    spec = ModelSpec.from_cfg(cfg.source)
    data = DataSpec.from_cfg(_container(cfg.data))
    _family(spec)
    return _identity(cfg, spec, data, build_attacks(cfg, spec))


@dataclass
class VariancePlan:
    out_dir: Path
    config: dict[str, Any]
    runtime: Runtime
    identity: dict[str, Any]
    source: ModelSpec
    family: str
    weights: Weights
    attacks: list[tuple[str, Attack]]
    data_spec: DataSpec
    data: ImageSet
    time_plain: bool


def make_plan(cfg: Any, out_dir: Path) -> VariancePlan:
    """Every input error surfaces here, before anything is built or written."""
    runtime = Runtime.from_cfg(cfg)
    spec = ModelSpec.from_cfg(cfg.source)
    family = _family(spec)
    attacks = build_attacks(cfg, spec)
    check_model_name(spec)
    data_spec = DataSpec.from_cfg(_container(cfg.data))
    data = load_dataset(data_spec)
    for _, attack in attacks:
        attack.check_data(*data.size)
    time_plain = cfg.get("time_plain", True)
    if not isinstance(time_plain, bool):
        raise UserError(f"time_plain={time_plain!r}: use true or false.")
    return VariancePlan(
        out_dir=out_dir,
        config=_container(cfg),
        runtime=runtime,
        identity=_identity(cfg, spec, data_spec, attacks),
        source=spec,
        family=family,
        weights=resolve_weights(spec, cfg.get("tf2torch_dir")),
        attacks=attacks,
        data_spec=data_spec,
        data=data,
        time_plain=time_plain,
    )


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # between attacks only: the timings must be whole
    return time.perf_counter()


def analyse_attack(
    name: str,
    attack: Attack,
    model: torch.nn.Module,
    recorder: GradientRecorder,
    data: ImageSet,
    seeds: list[int],
    runtime: Runtime,
    time_plain: bool,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor | None], dict[str, Any]]:
    """Run `attack`'s own loop over every image with the recorder on. Returns the per-image
    values ({statistic: (blocks, images) or (images,)}) and what variance.json records of it."""
    device = runtime.device
    parts: dict[str, list[torch.Tensor]] = {"scale_free_var": [], "raw_var": [], "input_cos": []}
    seconds, first = 0.0, None
    task = progress.add_task(f"{name}", total=len(data)) if progress else None
    with attack.source_context(model):  # TGR/PNA/SGM: their hooks, proven by their probe
        chunks = batches(data.pixels, range(len(data)), runtime.batch_size)
        for i, (idx, decoded) in enumerate(chunks):
            clean = decoded.to(device)
            x, y = clean.float() / 255.0, data.labels[idx].to(device)
            batch_seeds = [seeds[j] for j in idx]
            try:
                start = _clock(device)
                with recorder.recording(attack):
                    adv = attack.perturb(model, x, y, batch_seeds)
                stats = recorder.take()
                recorded = _clock(device) - start
                plain = None
                if i == 0 and time_plain:
                    start = _clock(device)
                    plain = attack.perturb(model, x, y, batch_seeds)
                    plain_s = _clock(device) - start
            except torch.cuda.OutOfMemoryError:
                raise UserError(
                    f"{name} on a batch of {len(idx)} images does not fit in GPU memory; "
                    f"lower batch_size=."
                ) from None
            seconds += recorded
            parts["scale_free_var"].append(stats.scale_free_var)
            parts["raw_var"].append(stats.raw_var)
            if stats.input_cos is not None:
                parts["input_cos"].append(stats.input_cos)
            if plain is not None:
                same = torch.equal(
                    quantize(adv, clean, attack.eps_levels),
                    quantize(plain, clean, attack.eps_levels),
                )
                if not same:
                    log.warning("%s: images with and without recording differ", name)
                first = {
                    "images": len(idx),
                    "recorded_s": round(recorded, 4),
                    "plain_s": round(plain_s, 4),
                    "ratio": round(recorded / plain_s, 4) if plain_s > 0 else None,
                    "identical_images": same,
                }
            if progress is not None and task is not None:
                progress.advance(task, len(idx))
    values: dict[str, torch.Tensor | None] = {
        "scale_free_var": torch.cat(parts["scale_free_var"], dim=1),
        "raw_var": torch.cat(parts["raw_var"], dim=1),
        "input_cos": torch.cat(parts["input_cos"]) if parts["input_cos"] else None,
    }
    info = {
        "name": name,
        "label": attack.label,
        "reference": attack.reference,
        "params": attack.params(),
        "hooks": attack.stats(),  # TGR's fired counts include the timing pass, when made
        "images": len(data),
        "seconds": round(seconds, 3),
        "first_batch": first,
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
    recorded = sum(t["recorded_s"] for t in timed)
    plain = sum(t["plain_s"] for t in timed)
    return {
        "device": device.type,
        "analysis_s": round(sum(a["seconds"] for a in attacks), 3),
        # The same attacks on their first batch, with and without the recorder.
        "first_batch_recorded_s": round(recorded, 4) if timed else None,
        "first_batch_plain_s": round(plain, 4) if timed else None,
        "relative_to_crafting": round(recorded / plain, 4) if timed and plain > 0 else None,
    }


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _complete(out_dir: Path, key: str, data_sha256: str) -> dict[str, Any] | None:
    path = out_dir / RECORD
    if not path.is_file() or not all((out_dir / f).is_file() for f in FILES):
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    same = record.get("identity_sha256") == key and record.get("data", {}).get("sha256") == (
        data_sha256
    )
    return record if same and record.get("status") == "complete" else None


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate, run every attack with the recorder, write the tables, the plot and
    variance.json into the run directory; returns the record (variance.json's content)."""
    console = Console(stderr=True)
    plan = make_plan(cfg, _out_dir(output_dir))
    rt, out = plan.runtime, plan.out_dir
    key = digest(plan.identity)
    done = _complete(out, key, plan.data.digest)
    if done is not None:
        console.print(f"[green]already complete:[/green] {out} (same identity); nothing to do")
        return done
    record: dict[str, Any] = {
        "status": "running",
        "started": provenance.now(),
        "finished": None,
        "error": None,
        "identity": plan.identity,
        "identity_sha256": key,
        "config": plan.config,
        "seed": rt.seed,
        "versions": provenance.versions(),
        "git_commit": provenance.git_commit(),
        "device": provenance.device_info(rt.device),
    }
    record["determinism"] = rt.apply()
    loaded = build_model(plan.source, plan.weights, rt.device, rt.seed)
    model = loaded.model.set_speed(rt.precision)
    blocks = source_blocks(model, plan.family)
    data = plan.data
    record["data"] = {
        "root": data.root,
        "layout": data.layout,
        "n_images": len(data),
        "sha256": data.digest,
        "shard": data.shard,
    }
    if data.layout == "synthetic" and plan.data_spec.labels == "source":
        # Random-weight smoke models know no ImageNet: label each image with the source's
        # clean prediction, as the smoke run of tgr-bench does.
        data = data.with_labels(predict(model, data.pixels, rt.eval_batch_size, rt.device))
    record["source"] = {
        **loaded.provenance(),
        "family": plan.family,
        "blocks": [name for name, _ in blocks],
    }
    record["images"] = list(data.stems)
    out.mkdir(parents=True, exist_ok=True)
    _save(out, record)
    recorder = GradientRecorder(blocks, model.net)
    seeds = image_seeds(data.stems, rt.seed)
    per_image, attacks = {}, []
    try:
        if plan.time_plain:
            warm_up(model, data, rt)
        with _progress(console) as progress:
            for name, attack in plan.attacks:
                values, info = analyse_attack(
                    name, attack, model, recorder, data, seeds, rt, plan.time_plain, progress
                )
                per_image[name] = values
                attacks.append(info)
        record["attacks"] = attacks
        record["cost"] = _cost(attacks, rt.device)
        frame = long_frame(per_image, [name for name, _ in blocks])
        title = f"Gradient variance inside {plan.source.key}: {len(data)} images"
        files = write_all(frame, out, title)
        record["files"] = [p.name for p in files]
        record["status"] = "complete"
    except BaseException as e:
        record["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        record["finished"] = provenance.now()
        with contextlib.suppress(Exception):
            _save(out, record)
    print_table(wide(frame, "scale_free_var"), f"{title} (scale-free variance per block)", console)
    cost = record["cost"]
    if cost["relative_to_crafting"] is not None:
        console.print(
            f"recording cost: {cost['relative_to_crafting']:.2f}x the time of the same attacks "
            f"without it (first batch of each)"
        )
    console.print(f"[green]done:[/green] {', '.join(record['files'])} in {out}")
    return record


def _save(out: Path, record: dict[str, Any]) -> None:
    atomic_write(out / RECORD, json.dumps(record, indent=2, default=str).encode())
