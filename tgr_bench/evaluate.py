"""Transfer evaluation: predictions of a target on stored 8-bit images, and the paper's metrics."""

from __future__ import annotations

import gc
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.progress import Progress

from tgr_bench import metrics
from tgr_bench.advsets import AdvSet
from tgr_bench.atomic import atomic_write
from tgr_bench.crafting import image_seeds
from tgr_bench.data import ImageSet
from tgr_bench.defenses import ABSTAIN, Defense
from tgr_bench.hashing import digest
from tgr_bench.models import LoadedModel, ModelSpec, WeightFile, build_model
from tgr_bench.predict import predict
from tgr_bench.record import DEFENDED, format_params


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


def _missing(
    spec: ModelSpec, adv_sets: list[AdvSet], column: str | None = None
) -> list[dict[str, Any]]:
    """Rows of a target whose weights were not given: the cell shows as missing, not 0."""
    base = {**_columns_of(spec, None), "target": column or spec.key}
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
    spec, weights, defense = target.spec, target.weights, how.get("defense")
    randomized = defense is not None and defense.randomized
    extra = {
        "kwargs": spec.kwargs,
        "precision": how["precision"],
        "seed": how["seed"] if weights.kind == "random" or randomized else None,
    }
    if defense is not None:  # the predictions through a defense are cached apart
        extra["defense"] = {"name": defense.name, "params": defense.params()}
    key = CleanCache.key(target.provenance(), data.digest, how["device"], extra)
    clean_pred = cache.get(key, len(data))
    if clean_pred is None:
        clean_pred = _predict(target, data.pixels, step, **how)
        cache.put(key, clean_pred)
    else:
        step(len(data))
    return clean_pred, key


def _predict(target: LoadedModel, pixels: Any, step: Any, **how: Any) -> torch.Tensor:
    """The target's predictions of `pixels`, through the run's defense when one is given."""
    return predict(
        target.model,
        pixels,
        how["batch_size"],
        how["device"],
        step,
        defense=how.get("defense"),
        keys=how.get("keys"),
    )


def _per_image(
    s: AdvSet,
    data: ImageSet,
    target: LoadedModel,
    clean: torch.Tensor,
    adv: torch.Tensor,
    column: str,
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": s.info.run_id,
            "source": s.info.source,
            "attack": s.info.attack,
            "stem": data.stems,
            "label": data.labels.tolist(),
            "target": column,
            "target_sha256": target.weights.sha256,
            "clean_pred": clean.tolist(),
            "adv_pred": adv.tolist(),
            "target_label": None if s.aims is None else s.aims.tolist(),
        }
    )


def column_of(key: str, defense: Defense | None) -> str:
    """The results' target name: the catalogue key, `key+<defense>` through a defense (with
    its settings where they differ from the paper's: `key+jpeg[quality=50]`)."""
    return key if defense is None else f"{key}{DEFENDED}{defense.label()}"


def _defense_columns(
    defense: Defense | None, clean: torch.Tensor, adv: torch.Tensor
) -> dict[str, Any]:
    """What a row says about its defense: its name and settings, and for smoothing how many
    images it abstained on (counted as not correct and as fooled: docs/defenses.md)."""
    if defense is None:
        return {}
    n = len(clean)
    abstained = clean_abstained = 0
    # Only a prediction rule abstains: an input defense's -1 is a TF-slim background answer.
    if hasattr(defense, "predict"):
        abstained, clean_abstained = int((adv == ABSTAIN).sum()), int((clean == ABSTAIN).sum())
    return {
        "defense": defense.name,
        "defense_params": format_params(defense.params()),
        "n_abstained": abstained,
        "n_clean_abstained": clean_abstained,
        "abstain_rate": 100.0 * abstained / n if n else math.nan,
        "clean_abstain_rate": 100.0 * clean_abstained / n if n else math.nan,
    }


def _evaluate_target(
    target: LoadedModel,
    data: ImageSet,
    adv_sets: list[AdvSet],
    out: Evaluation,
    cache: CleanCache,
    progress: Progress,
    **how: Any,
) -> None:
    """Every set on one resident target (through how["defense"] when given): clean predictions
    once, then each set's."""
    spec, defense = target.spec, how.get("defense")
    column = column_of(spec.key, defense)
    task = progress.add_task(f"evaluating {column}", total=(1 + len(adv_sets)) * len(data))

    def step(n: int) -> None:
        progress.advance(task, n)

    clean_pred, key = _clean_predictions(target, data, cache, step, **how)
    base = {**_columns_of(spec, target.weights), "target": column}
    for s in adv_sets:
        adv_pred = _predict(target, s.pixels, step, **how)
        c = metrics.counts(data.labels, clean_pred, adv_pred, s.aims)
        white_box = spec.key == s.info.source
        out.rows.append(
            {**base, **_origin(s), "white_box": white_box, "status": "ok", **c}
            | metrics.rates(c)
            | _defense_columns(defense, clean_pred, adv_pred)
        )
        out.per_image.append(_per_image(s, data, target, clean_pred, adv_pred, column))
    provenance = {**target.provenance(), "clean_cache_key": key}
    if defense is not None:
        provenance |= {"key": column, "defense": defense.name, "defense_params": defense.params(),
                       "defense_reference": defense.reference}  # fmt: skip
    out.loaded.append({**provenance, "channels_last": target.model.channels_last})


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
    defenses: Sequence[Defense] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], pd.DataFrame]:
    """Load each target once and predict every adversarial set while it is resident: as it is,
    then through each of `defenses` (a target `key+<defense>` each).

    Returns metric rows (one per set and target, the columns of record.RESULT_COLUMNS, and the
    defense columns of results.DEFENSE_COLUMNS for a defended target), target provenance, and
    per-image predictions (what table cells trace back to).
    """
    out = Evaluation([], [], [])
    how = {"batch_size": batch_size, "device": device, "seed": seed, "precision": precision}
    # One key per image, from its name and the run seed, shared by the clean and the
    # adversarial image: a randomized defense draws the same for both.
    keys = image_seeds(data.stems, seed)
    for spec, weights in targets:
        if weights is None:
            out.rows += _missing(spec, adv_sets)
            for d in defenses:
                out.rows += _missing(spec, adv_sets, column_of(spec.key, d))
            continue
        target = _load_target(spec, weights, device, seed, precision)
        _evaluate_target(target, data, adv_sets, out, cache, progress, **how)
        for d in defenses:
            _evaluate_target(target, data, adv_sets, out, cache, progress,
                             defense=d, keys=keys, **how)  # fmt: skip
        del target
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out.rows, out.loaded, out.predictions()
