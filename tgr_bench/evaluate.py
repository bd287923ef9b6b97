"""Transfer evaluation: predictions of a target on stored 8-bit images, and the paper's metrics."""

from __future__ import annotations

import gc
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.progress import Progress

from tgr_bench import metrics
from tgr_bench.advsets import AdvSet
from tgr_bench.atomic import atomic_write
from tgr_bench.data import ImageSet
from tgr_bench.hashing import digest
from tgr_bench.models import LoadedModel, ModelSpec, WeightFile, build_model
from tgr_bench.predict import predict
from tgr_bench.record import format_params


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
        return digest(content)

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


PREDICTION_COLUMNS = [
    "run_id", "source", "attack", "stem", "label", "target", "target_sha256",
    "clean_pred", "adv_pred", "target_label",
]  # fmt: skip


@dataclass
class Evaluation:
    """What evaluating sets on targets produced: metric rows (the columns of
    record.RESULT_COLUMNS, one per set and target), target provenance, per-image predictions."""

    rows: list[dict[str, Any]]
    loaded: list[dict[str, Any]]
    per_image: list[pd.DataFrame]

    def predictions(self) -> pd.DataFrame:
        if not self.per_image:
            return pd.DataFrame(columns=PREDICTION_COLUMNS)
        return pd.concat(self.per_image)


def _origin(s: AdvSet) -> dict[str, Any]:
    return {
        "run_id": s.info.run_id,
        "source": s.info.source,
        "attack": s.info.attack,
        "params": format_params(s.info.params),
    }


def _columns_of(spec: ModelSpec, weights: WeightFile | None) -> dict[str, Any]:
    return {
        "target": spec.key,
        "target_model": spec.model,
        "target_weights": weights.kind if weights else None,
        "target_sha256": weights.sha256 if weights else None,
    }


def _missing(spec: ModelSpec, adv_sets: list[AdvSet]) -> list[dict[str, Any]]:
    """Rows of a target whose weights were not given: the cell shows as missing, not 0."""
    base = _columns_of(spec, None)
    return [
        {**base, **_origin(s), "white_box": spec.key == s.info.source, "n": 0,
         "status": "missing checkpoint"}
        for s in adv_sets
    ]  # fmt: skip


def _load_target(
    spec: ModelSpec, weights: WeightFile, device: torch.device, seed: int, precision: str
) -> LoadedModel:
    target = build_model(spec, weights, device, seed)
    # Convolutional targets run channels-last on the GPU; attention models keep NCHW input.
    is_cnn = not any(hasattr(m, "fused_attn") for m in target.model.modules())
    target.model.set_speed(precision, channels_last=device.type == "cuda" and is_cnn)
    return target


def _clean_predictions(
    target: LoadedModel, data: ImageSet, cache: CleanCache, step: Any, **how: Any
) -> tuple[torch.Tensor, str]:
    """The target's clean predictions, from the cache when this target, data and device had
    them before; returns them and the cache key."""
    spec, weights = target.spec, target.weights
    extra = {
        "kwargs": spec.kwargs,
        "precision": how["precision"],
        "seed": how["seed"] if weights.kind == "random" else None,
    }
    key = CleanCache.key(target.provenance(), data.digest, how["device"], extra)
    clean_pred = cache.get(key, len(data))
    if clean_pred is None:
        clean_pred = predict(target.model, data.pixels, how["batch_size"], how["device"], step)
        cache.put(key, clean_pred)
    else:
        step(len(data))
    return clean_pred, key


def _per_image(
    s: AdvSet, data: ImageSet, target: LoadedModel, clean: torch.Tensor, adv: torch.Tensor
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": s.info.run_id,
            "source": s.info.source,
            "attack": s.info.attack,
            "stem": data.stems,
            "label": data.labels.tolist(),
            "target": target.spec.key,
            "target_sha256": target.weights.sha256,
            "clean_pred": clean.tolist(),
            "adv_pred": adv.tolist(),
            "target_label": None if s.aims is None else s.aims.tolist(),
        }
    )


def _evaluate_target(
    target: LoadedModel,
    data: ImageSet,
    adv_sets: list[AdvSet],
    out: Evaluation,
    cache: CleanCache,
    progress: Progress,
    **how: Any,
) -> None:
    """Every set on one resident target: clean predictions once, then each set's."""
    spec = target.spec
    task = progress.add_task(f"evaluating {spec.key}", total=(1 + len(adv_sets)) * len(data))

    def step(n: int) -> None:
        progress.advance(task, n)

    clean_pred, key = _clean_predictions(target, data, cache, step, **how)
    base = _columns_of(spec, target.weights)
    for s in adv_sets:
        adv_pred = predict(target.model, s.pixels, how["batch_size"], how["device"], step)
        c = metrics.counts(data.labels, clean_pred, adv_pred, s.aims)
        white_box = spec.key == s.info.source
        out.rows.append(
            {**base, **_origin(s), "white_box": white_box, "status": "ok", **c} | metrics.rates(c)
        )
        out.per_image.append(_per_image(s, data, target, clean_pred, adv_pred))
    out.loaded.append(
        {**target.provenance(), "clean_cache_key": key, "channels_last": target.model.channels_last}
    )


def evaluate_sets(
    *,
    targets: list[tuple[ModelSpec, WeightFile | None]],
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
    out = Evaluation([], [], [])
    how = {"batch_size": batch_size, "device": device, "seed": seed, "precision": precision}
    for spec, weights in targets:
        if weights is None:
            out.rows += _missing(spec, adv_sets)
            continue
        target = _load_target(spec, weights, device, seed, precision)
        _evaluate_target(target, data, adv_sets, out, cache, progress, **how)
        del target
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out.rows, out.loaded, out.predictions()
