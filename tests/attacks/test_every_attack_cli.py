"""Every attack preset on every source family, through the console script's entry point."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest


@pytest.mark.parametrize(
    "attack,source",
    [
        ("vmi", "test_vit"),
        ("sgm", "test_pit"),
        ("sgm", "test_resnet"),
        ("pna", "test_cait"),
        ("pna_patchout", "test_visformer"),
        ("tgr_patchout", "test_deit"),
    ],
)
def test_every_attack_runs_through_the_cli(tgr, tmp_path: Path, attack, source):
    out = tmp_path / "run"
    r = tgr(
        "experiment=smoke",
        f"attack={attack}",
        f"source={source}",
        "data.n=2",
        "attack.steps=2",
        "targets=smoke",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "results.csv")
    assert set(df.attack) == {attack} and set(df.source) == {source}
    assert len(list((out / "images").glob("*.png"))) == 2
