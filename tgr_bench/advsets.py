"""Adversarial image sets to evaluate: a run's own images, or folders from anywhere, each with the
identity of the run that crafted it when it has a run record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tgr_bench.data import ImageSet, adversarial_pixels
from tgr_bench.errors import UserError
from tgr_bench.images import linf_levels
from tgr_bench.pixels import Pixels, batches
from tgr_bench.record import IMAGES_DIR, AdvSetInfo, RunRecord, digest


@dataclass
class AdvSet:
    info: AdvSetInfo
    pixels: Pixels  # aligned with the clean set, decoded on demand
    targets: torch.Tensor | None = None  # a targeted attack's target labels


def describe_folder(folder: str | Path) -> AdvSetInfo:
    """Provenance of a folder of adversarial PNGs: a tgr-bench run's `images/` keeps its run's
    identity, source and attack; any other folder is `external`, named after the folder."""
    path = Path(folder).expanduser().resolve()
    if path.name == IMAGES_DIR:
        try:
            record = RunRecord.load(path.parent)
        except UserError:
            record = None
        if record is not None and record.attack is not None:
            ident = record.identity
            return AdvSetInfo(
                run_id=ident.run_id,
                folder=str(path),
                source=str((ident.source or {}).get("key", "external")),
                attack=str(record.attack["label"]),
                params=dict(ident.params),
                identity=ident,
                defaults=dict(record.attack.get("defaults") or {}),
            )
    return AdvSetInfo(
        run_id=f"external-{digest(str(path))[:12]}",
        folder=str(path),
        source="external",
        attack=path.name,
        params={"adv_dir": str(path)},
    )


def load_sets(infos: list[AdvSetInfo], data: ImageSet) -> list[AdvSet]:
    """Every folder checked against the clean set (present, readable, same size); the folder
    of a targeted run brings its run's target labels."""
    from tgr_bench.targets import read_targets

    sets = []
    for info in infos:
        targets = None
        if info.params.get("targeted"):
            targets = read_targets(Path(info.folder).parent, data.stems)
        sets.append(AdvSet(info, adversarial_pixels(info.folder, data), targets))
    return sets


def linf_levels_max(data: ImageSet, sets: list[AdvSet], batch_size: int = 64) -> int:
    """The largest |adversarial - clean| over every pixel of every set, read back from the
    files: the saved PNGs, not what the attack meant to save, are checked against eps."""
    worst = 0
    for s in sets:
        adv = batches(s.pixels, range(len(data)), batch_size)
        for (_, clean), (_, saved) in zip(
            batches(data.pixels, range(len(data)), batch_size), adv, strict=True
        ):
            worst = max(worst, linf_levels(saved, clean))
    return worst
