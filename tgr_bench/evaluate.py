"""Transfer evaluation: predictions of a target on stored 8-bit images, and the paper's metrics."""

from __future__ import annotations

import gc
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.progress import Progress
from torch import nn

from tgr_bench import metrics
from tgr_bench.advsets import AdvSet
from tgr_bench.atomic import atomic_write
from tgr_bench.data import ImageSet
from tgr_bench.models import ModelSpec, Weights, build_model
from tgr_bench.pixels import Pixels, batches
from tgr_bench.record import format_params


def predict(
    model: nn.Module,
    pixels: Pixels,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    rank: str = "top",
) -> torch.Tensor:
    """Top-1 ImageNet class of every image of `pixels` (decoded batch by batch, ahead of the
    device), computed in inference mode, returned on CPU: argmax of the logits minus the
    model's label_offset, so a TF-slim network's background logit predicts -1, a wrong answer.
    `rank="least"`: the least likely of the 1000 ImageNet classes instead (the background
    logit excluded). A batch that runs out of GPU memory is retried in halves (what
    `eval_batch_size=auto` relies on)."""
    offset = int(getattr(model, "label_offset", 0))

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if rank == "least":
            return logits[:, offset:].argmin(dim=1)
        return logits.argmax(dim=1) - offset

    preds = []
    device = torch.device(device)
    pin = device.type == "cuda"
    with torch.inference_mode():
        for _, decoded in batches(pixels, range(len(pixels)), batch_size):
            start = 0
            while start < len(decoded):
                part = decoded[start : start + batch_size]
                x = (part.pin_memory() if pin else part).to(device, non_blocking=True)
                try:
                    preds.append(pick(model(x.float().div_(255.0))))
                except torch.cuda.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    torch.cuda.empty_cache()
                    continue
                start += len(part)
                if on_batch is not None:
                    on_batch(len(part))
    return torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.int64)


class CleanCache:
    """Clean predictions per (target weights, preprocessing, data, device): the same for every
    attack on that data, so a table of 20 runs computes them once per target."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root).expanduser() / "clean" if root else None

    @staticmethod
    def key(
        provenance: dict[str, Any], data_digest: str, device: torch.device, extra: dict[str, Any]
    ) -> str:
        content = {
            "model": provenance,
            "data": data_digest,
            "device": device.type,
            "torch": torch.__version__,
            **extra,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str, n: int) -> torch.Tensor | None:
        if self.root is None or not (self.root / f"{key}.pt").is_file():
            return None
        try:
            preds = torch.load(self.root / f"{key}.pt", weights_only=True)
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return None
        return preds if isinstance(preds, torch.Tensor) and preds.shape == (n,) else None

    def put(self, key: str, preds: torch.Tensor) -> None:
        if self.root is None:
            return
        buf = io.BytesIO()
        torch.save(preds.clone(), buf)
        atomic_write(self.root / f"{key}.pt", buf.getvalue())


def evaluate_sets(
    *,
    targets: list[tuple[ModelSpec, Weights | None]],
    data: ImageSet,
    adv_sets: list[AdvSet],
    batch_size: int,
    device: torch.device,
    seed: int,
    cache: CleanCache,
    progress: Progress,
    precision: str = "fp32",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], pd.DataFrame]:
    """Load each target once and predict every adversarial set while it is resident.

    Returns metric rows (one per set and target, the columns of record.RESULT_COLUMNS), target
    provenance, and per-image predictions (what table cells trace back to).
    """
    rows, loaded, per_image = [], [], []
    for spec, weights in targets:
        base = {
            "target": spec.key,
            "target_model": spec.model,
            "target_weights": weights.kind if weights else None,
            "target_sha256": weights.sha256 if weights else None,
        }
        if weights is None:
            rows += [
                {
                    **base,
                    **_origin(s),
                    "white_box": spec.key == s.info.source,
                    "n": 0,
                    "status": "missing checkpoint",
                }
                for s in adv_sets
            ]
            continue
        task = progress.add_task(f"evaluating {spec.key}", total=(1 + len(adv_sets)) * len(data))
        target = build_model(spec, weights, device, seed)
        # Convolutional targets run channels-last on the GPU; attention models keep NCHW input.
        is_cnn = not any(hasattr(m, "fused_attn") for m in target.model.modules())
        target.model.set_speed(precision, channels_last=device.type == "cuda" and is_cnn)

        def step(n: int, task: Any = task) -> None:
            progress.advance(task, n)

        key = CleanCache.key(
            target.provenance(),
            data.digest,
            device,
            {
                "kwargs": spec.kwargs,
                "precision": precision,
                "seed": seed if weights.kind == "random" else None,
            },
        )
        clean_pred = cache.get(key, len(data))
        if clean_pred is None:
            clean_pred = predict(target.model, data.pixels, batch_size, device, step)
            cache.put(key, clean_pred)
        else:
            step(len(data))
        for s in adv_sets:
            adv_pred = predict(target.model, s.pixels, batch_size, device, step)
            c = metrics.counts(data.labels, clean_pred, adv_pred, s.targets)
            white_box = spec.key == s.info.source
            rows.append(
                {**base, **_origin(s), "white_box": white_box, "status": "ok", **c}
                | metrics.rates(c)
            )
            per_image.append(
                pd.DataFrame(
                    {
                        "run_id": s.info.run_id,
                        "source": s.info.source,
                        "attack": s.info.attack,
                        "stem": data.stems,
                        "label": data.labels.tolist(),
                        "target": spec.key,
                        "target_sha256": weights.sha256,
                        "clean_pred": clean_pred.tolist(),
                        "adv_pred": adv_pred.tolist(),
                        "target_label": None if s.targets is None else s.targets.tolist(),
                    }
                )
            )
        loaded.append(
            {
                **target.provenance(),
                "clean_cache_key": key,
                "channels_last": target.model.channels_last,
            }
        )
        del target
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    columns = [
        "run_id", "source", "attack", "stem", "label", "target", "target_sha256",
        "clean_pred", "adv_pred", "target_label",
    ]  # fmt: skip
    return rows, loaded, pd.concat(per_image) if per_image else pd.DataFrame(columns=columns)


def _origin(s: AdvSet) -> dict[str, Any]:
    return {
        "run_id": s.info.run_id,
        "source": s.info.source,
        "attack": s.info.attack,
        "params": format_params(s.info.params),
    }
