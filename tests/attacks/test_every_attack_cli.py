"""Every attack preset on every source family, through the console script's entry point (the
slow tier: each is a whole run; the attacks' own files test them in the fast one)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest


@pytest.mark.slow
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
        ("att", "test_cait", ()),
        ("gns", "test_visformer", ("attack.hfa.n=2",)),
        ("vdc", "test_pit", ()),
        # The tiny PiT lacks the released block list: the run names the blocks to use.
        ("fpr", "test_pit", ("attack.attn_blocks=[transformers.0.blocks.1]",)),
        ("ll2s", "test_vit", ("attack.num_scale=2", "attack.num_robust_tokens=8")),
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
