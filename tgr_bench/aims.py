"""The classes a targeted attack aims at (its aims), one per image, and their file in a run
directory (targets.csv, column target_label: the names users read).

`attack.target`: `labels` takes the labels.csv `target` column (an error without one); `random`
draws uniformly among the 999 classes other than the image's label, from the image's own seed;
`least_likely` takes the source's least likely class on the clean image (never the background
logit of a 1001-class TF-slim source); `auto` is `labels` when the column exists, else `random`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tgr_bench.atomic import atomic_write
from tgr_bench.attacks.draws import mix, randint
from tgr_bench.data import NUM_CLASSES, ImageSet
from tgr_bench.errors import UserError
from tgr_bench.predict import predict
from tgr_bench.record import TARGETS_CSV


def random_aims(labels: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Per image, a class drawn uniformly among the other 999, from the image's seed."""
    out = []
    for label, seed in zip(labels.tolist(), seeds, strict=True):
        t = randint(mix(seed, 0x7A), 0, NUM_CLASSES - 1)
        out.append(t + (t >= label))
    return torch.tensor(out, dtype=torch.int64)


def least_likely(
    model: nn.Module, data: ImageSet, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The source's least likely ImageNet class on each clean image (never the background
    logit of a 1001-class source), with evaluation's batching and out-of-memory halving."""
    return predict(model, data.pixels, batch_size, device, rank="least")


def choose_aims(
    mode: str,
    data: ImageSet,
    seeds: Sequence[int],
    model: nn.Module,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    column = data.column_aims()
    if mode == "labels" or (mode == "auto" and column is not None):
        if column is None:
            raise UserError(
                "attack.target=labels takes the `target` column of labels.csv, and this data "
                "set has none. Add the column (filename,label,target) or choose attack.target="
                "random or least_likely."
            )
        return column
    if mode == "least_likely":
        return least_likely(model, data, batch_size, device)
    return random_aims(data.labels, seeds)


def write_aims(run_dir: Path, data: ImageSet, aims: torch.Tensor) -> None:
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["stem", "target_label"])
    w.writerows(zip(data.stems, aims.tolist(), strict=True))
    atomic_write(run_dir / TARGETS_CSV, text.getvalue().encode())


def read_aims(run_dir: Path, stems: Sequence[str]) -> torch.Tensor:
    """A targeted run's aims, in the order of `stems`."""
    path = run_dir / TARGETS_CSV
    if not path.is_file():
        raise UserError(f"{run_dir} is a targeted run but holds no {TARGETS_CSV}; re-run it.")
    with open(path, newline="") as f:
        table = {row["stem"]: int(row["target_label"]) for row in csv.DictReader(f)}
    missing = [s for s in stems if s not in table]
    if missing:
        raise UserError(f"{path} has no target for {len(missing)} images, e.g. {missing[:3]}.")
    return torch.tensor([table[s] for s in stems], dtype=torch.int64)
