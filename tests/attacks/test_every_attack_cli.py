"""Every attack preset on every source family, through the installed console script."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import cli


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
def test_every_attack_runs_through_the_cli(tmp_path: Path, attack, source):
    out = tmp_path / "run"
    r = subprocess.run(
        cli(
            "experiment=smoke",
            f"attack={attack}",
            f"source={source}",
            "data.n=2",
            "attack.steps=2",
            "targets=smoke",
            f"hydra.run.dir={out}",
        ),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "results.csv")
    assert set(df.attack) == {attack} and set(df.source) == {source}
    assert len(list((out / "images").glob("*.png"))) == 2
