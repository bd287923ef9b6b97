"""Every attack preset on every source family, through the console script's entry point."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest


@pytest.mark.parametrize(
    "attack,source,extra",
    [
        ("vmi", "test_vit", ()),
        ("sgm", "test_pit", ()),
        # SGM leaves each stage's first unit alone: the tiny ResNet gets a second unit per stage.
        ("sgm", "test_resnet", ("+source.kwargs.layers=[2,2,2,2]",)),
        ("pna", "test_cait", ()),
        ("pna_patchout", "test_visformer", ()),
        ("tgr_patchout", "test_deit", ()),
        # The successors: their own files test them in depth; here, the whole command.
        pytest.param("att", "test_cait", (), marks=pytest.mark.slow),
        pytest.param("gns", "test_visformer", ("attack.hfa.n=2",), marks=pytest.mark.slow),
        pytest.param("vdc", "test_pit", (), marks=pytest.mark.slow),
        # The tiny PiT lacks the released block list: the run names the blocks to use.
        pytest.param(
            "fpr",
            "test_pit",
            ("attack.attn_blocks=[transformers.0.blocks.1]",),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "ll2s",
            "test_vit",
            ("attack.num_scale=2", "attack.num_robust_tokens=8"),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_every_attack_runs_through_the_cli(tgr, tmp_path: Path, attack, source, extra):
    out = tmp_path / "run"
    r = tgr(
        "experiment=smoke",
        f"attack={attack}",
        f"source={source}",
        "data.n=2",
        "attack.steps=2",
        "targets=smoke",
        f"hydra.run.dir={out}",
        *extra,
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "results.csv")
    assert set(df.attack) == {attack} and set(df.source) == {source}
    assert len(list((out / "images").glob("*.png"))) == 2
