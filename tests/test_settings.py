"""Runtime settings: the opt-in precision modes, determinism flags and batch_size=auto."""

from __future__ import annotations

import pytest
import torch

from tgr_bench.errors import UserError
from tgr_bench.pipeline import run


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_speed_modes_run_and_are_recorded(make_cfg, tmp_path, precision):
    record = run(
        make_cfg(
            "experiment=smoke", "data.n=2", "attack=tgr", "attack.steps=2", f"precision={precision}"
        ),
        output_dir=tmp_path,
    )
    assert record.determinism["precision"] == precision
    assert len(list((tmp_path / "images").iterdir())) == 2
    assert torch.backends.cuda.matmul.allow_tf32 == (precision == "tf32")
    run(
        make_cfg("experiment=smoke", "data.n=1", "attack.steps=1", "targets=none"),
        output_dir=tmp_path / "fp32",
    )
    assert torch.backends.cuda.matmul.allow_tf32 is False  # the default is exact fp32 again


def test_unknown_precision(make_cfg, tmp_path):
    with pytest.raises(UserError, match="precision"):
        run(make_cfg("experiment=smoke", "precision=fp16"), output_dir=tmp_path)


def test_batch_size_auto(make_cfg, tmp_path):
    record = run(
        make_cfg(
            "experiment=smoke", "data.n=3", "attack.steps=1", "targets=none", "batch_size=auto"
        ),
        output_dir=tmp_path,
    )
    assert record.crafting.batch_size == 16  # CPU: fixed start, halved only on GPU OOM
