"""Randomness comes from the run seed and the image name only."""

from __future__ import annotations

from pathlib import Path

from tgr_bench.pipeline import run


def test_same_seed_same_pngs_other_seed_other_pngs(make_cfg, tmp_path: Path):
    common = (
        "experiment=smoke",
        "attack=vmi",
        "attack.steps=2",
        "attack.n_samples=2",
        "data.n=2",
        "targets=none",
    )
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(make_cfg(*common, f"seed={seed}"), output_dir=tmp_path / name)
    a, b, c = (sorted((tmp_path / n / "images").iterdir()) for n in "abc")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
