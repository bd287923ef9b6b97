"""Adversarial image sets to evaluate: a run's own images, or folders from anywhere, each with the
identity of the run that crafted it when it has a run record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tgr_bench.aims import read_aims
from tgr_bench.data import ImageSet, adversarial_pixels
from tgr_bench.errors import UserError
from tgr_bench.hashing import digest
from tgr_bench.pixels import Pixels
from tgr_bench.record import IMAGES_DIR, AdvSetInfo, RunRecord


@dataclass
class AdvSet:
    info: AdvSetInfo
    pixels: Pixels  # aligned with the clean set, decoded on demand
    aims: torch.Tensor | None = None  # the classes a targeted attack aimed at


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
    sets = []
    for info in infos:
        aims = None
        if info.params.get("targeted"):
            aims = read_aims(Path(info.folder).parent, data.stems)
        sets.append(AdvSet(info, adversarial_pixels(info.folder, data), aims))
    return sets
