"""One run: validate everything, craft adversarial PNGs on the source, evaluate the targets,
write results. `run(cfg)` is what the CLI calls and what tests call directly."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tgr_bench import provenance
from tgr_bench.atomic import atomic_write
from tgr_bench.attacks import Attack, build_attack
from tgr_bench.data import ImageSet, load_adversarial, load_dataset
from tgr_bench.errors import UserError
from tgr_bench.evaluate import metrics, predict
from tgr_bench.images import encode_png, quantize
from tgr_bench.models import (
    LoadedModel,
    MissingCheckpoint,
    ModelSpec,
    Weights,
    build_model,
    check_model_name,
    resolve_weights,
)
from tgr_bench.report import format_params, print_table, results_frame, write_results
from tgr_bench.resume import MANIFEST, Manifest, run_lock

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


def image_seeds(stems: list[str], seed: int) -> torch.Tensor:
    """One seed per image from its name and the run seed: random draws of an image never depend
    on which other images share its batch."""
    return torch.tensor(
        [zlib.crc32(s.encode()) ^ (seed & 0xFFFFFFFF) for s in stems], dtype=torch.int64
    )


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def craft(
    attack: Attack,
    source: LoadedModel,
    data: ImageSet,
    manifest: Manifest,
    images_dir: Path,
    batch_size: int,
    device: torch.device,
    seed: int,
    console: Console,
) -> dict[str, Any]:
    """Attack every image not yet saved and verified, writing `<stem>.png` into images_dir.

    Call inside `attack.source_context(source.model)`. Each PNG is renamed into place before its
    manifest line is written, so a kill at any moment loses at most the batch in flight.
    """
    images_dir.mkdir(parents=True, exist_ok=True)
    manifest.start()
    done = manifest.verified(images_dir, data.stems)
    todo = [i for i, stem in enumerate(data.stems) if stem not in done]
    if done:
        log.info("Resuming: %d of %d images already saved and verified", len(done), len(data))
    seeds = image_seeds(data.stems, seed)
    with _progress(console) as progress:
        task = progress.add_task(
            f"crafting {attack.label} on {source.spec.key}", total=len(data), completed=len(done)
        )
        for start in range(0, len(todo), batch_size):
            idx = torch.tensor(todo[start : start + batch_size])
            clean = data.images[idx].to(device)
            adv = attack.perturb(
                source.model, clean.float() / 255.0, data.labels[idx].to(device), seeds[idx]
            )
            for i, img in zip(
                idx.tolist(), quantize(adv, clean, attack.eps_levels).cpu(), strict=True
            ):
                png = encode_png(img)
                atomic_write(images_dir / f"{data.stems[i]}.png", png)
                manifest.add(data.stems[i], png)
            progress.advance(task, len(idx))
    return {"attacked": len(todo), "resumed": len(done), **attack.stats()}


def evaluate_targets(
    targets: list[tuple[ModelSpec, Any]],
    data: ImageSet,
    adv_images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    seed: int,
    console: Console,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], pd.DataFrame]:
    """Load each target once, predict clean and adversarial images; return metrics rows, target
    provenance, and per-image predictions (what shards merge and cells trace back to)."""
    rows, loaded, per_image = [], [], []
    with _progress(console) as progress:
        for spec, weights in targets:
            if weights is None:
                rows.append(
                    {
                        "target": spec.key,
                        "target_model": spec.model,
                        "n": 0,
                        "status": "missing checkpoint",
                    }
                )
                continue
            task = progress.add_task(f"evaluating {spec.key}", total=2 * len(data))
            target = build_model(spec, weights, device, seed)

            def step(n: int, task: Any = task) -> None:
                progress.advance(task, n)

            clean_pred = predict(target.model, data.images, batch_size, device, step)
            adv_pred = predict(target.model, adv_images, batch_size, device, step)
            rows.append(
                {
                    "target": spec.key,
                    "target_model": spec.model,
                    "status": "ok",
                    **metrics(data.labels, clean_pred, adv_pred),
                }
            )
            loaded.append(target.provenance())
            per_image.append(
                pd.DataFrame(
                    {
                        "stem": data.stems,
                        "label": data.labels.tolist(),
                        "target": spec.key,
                        "clean_pred": clean_pred.tolist(),
                        "adv_pred": adv_pred.tolist(),
                    }
                )
            )
            del target
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    columns = ["stem", "label", "target", "clean_pred", "adv_pred"]
    return rows, loaded, pd.concat(per_image) if per_image else pd.DataFrame(columns=columns)


def _identity(cfg: DictConfig, data: ImageSet, attack: Attack, source: Weights) -> dict:
    """What the saved images are a function of: a resumed run must match it exactly."""
    data_hash = hashlib.sha256(data.images.numpy().tobytes())
    data_hash.update(data.labels.numpy().tobytes())
    data_hash.update("\n".join(data.stems).encode())
    return {
        "source": OmegaConf.to_container(cfg.source, resolve=True),
        "source_weights_sha256": source.sha256,
        "attack": {"name": attack.label, **attack.params()},
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "data_sha256": data_hash.hexdigest(),
        "seed": int(cfg.get("seed", 0)),
    }


def determinism(device: torch.device) -> dict[str, Any]:
    """Flags for byte-identical reruns on one device; exact fp32 (no TF32) everywhere."""
    flags: dict[str, Any] = {"tf32": False}
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
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


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate, craft, evaluate, write results.csv / results.md / run.json; return run.json."""
    started = provenance.now()
    console = Console(stderr=True)
    out_dir = _output_dir(cfg, output_dir)

    # Everything that can be wrong with the input is checked before anything is written.
    device = resolve_device(cfg.get("device"))
    batch_size = _positive_int(cfg, "batch_size")
    eval_batch_size = _positive_int(cfg, "eval_batch_size")
    seed = int(cfg.get("seed", 0))
    adv_dir = cfg.get("adv_dir")
    attack = None if adv_dir else build_attack(cfg.attack)
    source_spec = None if adv_dir else ModelSpec.from_cfg(cfg.source)
    target_specs = _target_specs(cfg)
    for spec in ([source_spec] if source_spec else []) + target_specs:
        check_model_name(spec)
    data = load_dataset(cfg.data)
    if adv_dir:
        adv_images = load_adversarial(adv_dir, data)
        if not target_specs:
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
        "config": OmegaConf.to_container(cfg, resolve=True),
        "seed": seed,
        "versions": provenance.versions(),
        "git_commit": provenance.git_commit(),
        "device": provenance.device_info(device),
        "determinism": determinism(device),
        "started": started,
        "n_images": len(data),
        "data": {"root": data.root, "layout": data.layout, "shard": data.shard},
    }

    crafting = attack is not None and source_spec is not None and source_weights is not None
    with contextlib.ExitStack() as attacking:
        if crafting:
            source = build_model(source_spec, source_weights, device, seed)
            if source_weights.kind == "random" and not source_spec.model.startswith("test_"):
                log.warning("Source %s has random weights (pretrained=false)", source_spec.key)
            record["source"] = source.provenance()
            if data.layout == "synthetic" and cfg.data.get("labels") == "source":
                # Random-weight smoke models know no ImageNet: label each synthetic image with
                # the source's clean prediction so the white-box success rate means something.
                data.labels = predict(source.model, data.images, eval_batch_size, device)
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
                record["crafting"] = craft(
                    attack, source, data, manifest, images_dir, batch_size, device, seed, console
                )
                attacking.close()  # leaves the source context, which checks the fired counts
                record["crafting"].update(attack.stats())
                del source
                adv_images = load_adversarial(images_dir, data)  # evaluate what was saved
                source_key, attack_name = source_spec.key, attack.label
                params = format_params(attack.params())
            else:
                source_key, attack_name, params = "external", "external", f"adv_dir={adv_dir}"
                record["adv_dir"] = str(Path(adv_dir).resolve())
                record["crafting"] = {"attacked": 0, "resumed": 0}
            diff = (adv_images.int() - data.images.int()).abs()
            record["crafting"]["linf_levels_max"] = int(diff.amax()) if diff.numel() else 0

            rows, loaded, predictions = evaluate_targets(
                list(zip(target_specs, target_weights, strict=True)),
                data,
                adv_images,
                eval_batch_size,
                device,
                seed,
                console,
            )
            for row in rows:
                row.update(
                    source=source_key,
                    attack=attack_name,
                    params=params,
                    white_box=row["target"] == source_key,
                )
            record["targets"] = loaded
            df = results_frame(rows)
            if rows:
                write_results(df, out_dir)
                atomic_write(out_dir / "predictions.csv", predictions.to_csv(index=False).encode())
                print_table(df, f"{attack_name} on {source_key}: {len(data)} images", console)
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
