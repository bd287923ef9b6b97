"""One run: validate everything, craft adversarial PNGs on the source, evaluate the targets,
write results. `run(cfg)` is what the CLI calls and what tests call directly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tgr_bench import provenance
from tgr_bench.atomic import atomic_write
from tgr_bench.attacks import Attack, build_attack
from tgr_bench.crafting import craft, resolve_batch_size
from tgr_bench.data import ImageSet, load_adversarial, load_dataset
from tgr_bench.errors import UserError
from tgr_bench.evaluate import AdvSet, CleanCache, evaluate_sets, predict
from tgr_bench.models import (
    MissingCheckpoint,
    ModelSpec,
    Weights,
    build_model,
    check_model_name,
    resolve_weights,
)
from tgr_bench.report import format_params, print_table, results_frame, write_results
from tgr_bench.resume import MANIFEST, Manifest, run_lock, verified

log = logging.getLogger(__name__)

IMAGES_DIR = "images"


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(
            f"device={name!r} is not a torch device (use auto, cpu, cuda, cuda:1)."
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but torch sees no CUDA GPU; use device=cpu.")
    return device


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key}={value!r}: need a whole number >= 1.")
    return value


def _output_dir(cfg: DictConfig, output_dir: str | Path | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise UserError("No output directory: call run(cfg, output_dir=...) or run through tgr-bench.")


def _target_specs(cfg: DictConfig) -> list[ModelSpec]:
    specs = []
    for key, entry in (cfg.get("targets") or {}).items():
        spec = ModelSpec.from_cfg(entry)
        if spec.key != key:  # the dict key is what users override: targets.<key>.checkpoint=...
            spec = ModelSpec.from_cfg({**dict(entry), "key": key})
        specs.append(spec)
    return specs


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def data_digest(data: ImageSet) -> str:
    h = hashlib.sha256(data.images.numpy().tobytes())
    h.update(data.labels.numpy().tobytes())
    h.update("\n".join(data.stems).encode())
    return h.hexdigest()


def _external_sets(folders: list[str], data: ImageSet) -> list[AdvSet]:
    """Adversarial folders from anywhere; a tgr-bench run's images/ keeps its source and attack."""
    sets = []
    for folder in folders:
        path = Path(folder).expanduser()
        source, attack, params = "external", path.name, f"adv_dir={path}"
        record = path.parent / "run.json"
        if path.name == IMAGES_DIR and record.is_file():
            try:
                made = json.loads(record.read_text())
                source, attack = made["source"]["key"], made["attack"]["name"]
                params = format_params(
                    {k: v for k, v in made["attack"].items() if k not in ("name", "reference")}
                )
            except (ValueError, KeyError):
                pass
        sets.append(AdvSet(source, attack, params, load_adversarial(path, data)))
    return sets


def _identity(cfg: DictConfig, data: ImageSet, attack: Attack, source: Weights) -> dict:
    """What the saved images are a function of: a resumed run must match it exactly."""
    return {
        "source": OmegaConf.to_container(cfg.source, resolve=True),
        "source_weights_sha256": source.sha256,
        "attack": {"name": attack.label, **attack.params()},
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "data_sha256": data_digest(data),
        "seed": int(cfg.get("seed", 0)),
        "precision": cfg.get("precision", "fp32"),
    }


PRECISIONS = ("fp32", "tf32", "bf16")


def determinism(device: torch.device, precision: str = "fp32") -> dict[str, Any]:
    """Flags for byte-identical reruns on one device. The default is exact fp32 (no TF32): the
    paper-faithful numbers; tf32 and bf16 are opt-in speed modes."""
    flags: dict[str, Any] = {"precision": precision, "tf32": precision == "tf32"}
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        flags.update(
            cudnn_benchmark=False,
            cudnn_deterministic=True,
            use_deterministic_algorithms="warn_only",
            CUBLAS_WORKSPACE_CONFIG=os.environ["CUBLAS_WORKSPACE_CONFIG"],
        )
    return flags


def _already_complete(
    out_dir: Path, config: dict[str, Any], data: ImageSet, crafting: bool
) -> dict[str, Any] | None:
    """The record of a finished run with exactly this config whose images are all still there
    and verified: re-running it is a no-op."""
    path = out_dir / "run.json"
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
    if not record or record.get("status") != "complete" or record.get("config") != config:
        return None
    if crafting:
        done = Manifest.entries(out_dir / MANIFEST)
        if len(verified(done, out_dir / IMAGES_DIR, data.stems)) != len(data):
            return None
    return record


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate, craft, evaluate, write results.csv / results.md / run.json; return run.json."""
    started = provenance.now()
    console = Console(stderr=True)
    out_dir = _output_dir(cfg, output_dir)

    # Everything that can be wrong with the input is checked before anything is written.
    device = resolve_device(cfg.get("device"))
    batch_size = resolve_batch_size(cfg.get("batch_size"), device)
    precision = cfg.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise UserError(f"precision={precision!r}: choose one of {list(PRECISIONS)}.")
    eval_batch_size = _positive_int(cfg, "eval_batch_size")
    seed = int(cfg.get("seed", 0))
    adv_dirs = cfg.get("adv_dir")
    if isinstance(adv_dirs, str):
        adv_dirs = [adv_dirs]
    adv_dirs = list(adv_dirs) if adv_dirs else []
    attack = None if adv_dirs else build_attack(cfg.attack)
    source_spec = None if adv_dirs else ModelSpec.from_cfg(cfg.source)
    target_specs = _target_specs(cfg)
    for spec in ([source_spec] if source_spec else []) + target_specs:
        check_model_name(spec)
    config = OmegaConf.to_container(cfg, resolve=True)
    data = load_dataset(cfg.data)
    finished = _already_complete(out_dir, config, data, attack is not None)
    if finished is not None:
        console.print(f"[green]already complete:[/green] {out_dir} (same config); nothing to do")
        return finished
    digest = data_digest(data)
    external = _external_sets(adv_dirs, data) if adv_dirs else []
    if adv_dirs and not target_specs:
        raise UserError("adv_dir= evaluates against targets, but targets=none lists none.")
    source_weights = resolve_weights(source_spec) if source_spec else None
    target_weights: list[Weights | None] = []
    for spec in target_specs:
        try:
            target_weights.append(resolve_weights(spec))
        except MissingCheckpoint as e:
            # Weights timm lacks: evaluate the other targets, show this cell as missing (not 0).
            log.warning("Skipping target %s: %s", spec.key, e)
            console.print(f"[yellow]skipping target {spec.key}:[/yellow] {e}")
            target_weights.append(None)

    torch.manual_seed(seed)
    record: dict[str, Any] = {
        "status": "running",
        "config": config,
        "seed": seed,
        "versions": provenance.versions(),
        "git_commit": provenance.git_commit(),
        "device": provenance.device_info(device),
        "determinism": determinism(device, precision),
        "started": started,
        "n_images": len(data),
        "data": {"root": data.root, "layout": data.layout, "shard": data.shard, "sha256": digest},
    }

    crafting = attack is not None and source_spec is not None and source_weights is not None
    with contextlib.ExitStack() as attacking:
        if crafting:
            source = build_model(source_spec, source_weights, device, seed)
            source.model.set_speed(precision)
            if source_weights.kind == "random" and not source_spec.model.startswith("test_"):
                log.warning("Source %s has random weights (pretrained=false)", source_spec.key)
            record["source"] = source.provenance()
            if data.layout == "synthetic" and cfg.data.get("labels") == "source":
                # Random-weight smoke models know no ImageNet: label each synthetic image with
                # the source's clean prediction so the white-box success rate means something.
                data.labels = predict(source.model, data.images, eval_batch_size, device)
                digest = data_digest(data)
            # Checks the source (supported family, every component fires, k fits) before the
            # run directory is touched.
            attacking.enter_context(attack.source_context(source.model))
        with run_lock(out_dir):
            if crafting:
                record["attack"] = {
                    "name": attack.label,
                    "reference": attack.reference,
                    **attack.params(),
                }
                manifest = Manifest(
                    out_dir / MANIFEST, _identity(cfg, data, attack, source_weights)
                )
                images_dir = out_dir / IMAGES_DIR
                with _progress(console) as progress:
                    record["crafting"] = craft(
                        attack,
                        source,
                        data,
                        manifest,
                        images_dir,
                        batch_size,
                        device,
                        seed,
                        progress,
                    )
                attacking.close()  # leaves the source context, which checks the fired counts
                record["crafting"].update(attack.stats())
                del source
                sets = [
                    AdvSet(
                        source_spec.key,
                        attack.label,
                        format_params(attack.params()),
                        load_adversarial(images_dir, data),
                    )
                ]  # evaluate what was saved
            else:
                record["adv_dir"] = [str(Path(d).expanduser().resolve()) for d in adv_dirs]
                record["crafting"] = {"attacked": 0, "resumed": 0}
                sets = external
            record["crafting"]["linf_levels_max"] = max(
                int((s.images.int() - data.images.int()).abs().amax()) for s in sets
            )

            cache = CleanCache(cfg.get("cache_dir"))
            with _progress(console) as progress:
                rows, loaded, predictions = evaluate_sets(
                    list(zip(target_specs, target_weights, strict=True)),
                    data,
                    digest,
                    sets,
                    eval_batch_size,
                    device,
                    seed,
                    cache,
                    progress,
                    precision,
                )
            for row in rows:
                row["white_box"] = row["target"] == row["source"]
            record["targets"] = loaded
            df = results_frame(rows)
            if rows:
                write_results(df, out_dir)
                atomic_write(out_dir / "predictions.csv", predictions.to_csv(index=False).encode())
                for s in sets:
                    part = df[(df.source == s.source) & (df.attack == s.attack)]
                    print_table(part, f"{s.attack} on {s.source}: {len(data)} images", console)
            record["status"] = "complete"
            record["finished"] = provenance.now()
            atomic_write(out_dir / "run.json", json.dumps(record, indent=2, default=str).encode())
    crafted = record["crafting"]
    summary = (
        f"{len(data)} images: {crafted['attacked']} attacked, {crafted['resumed']} "
        f"resumed from an earlier run, 0 failed; results in {out_dir}"
    )
    console.print(f"[green]done:[/green] {summary}")
    log.info("Run complete: %s", summary)
    return record
