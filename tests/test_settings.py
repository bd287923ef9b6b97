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


@pytest.mark.parametrize(
    "override,match",
    [
        ("seed=99999999999999999999999", "need a whole number in 0..2\\^63-1"),
        ("seed=-1", "need a whole number in 0..2\\^63-1"),
        ("cache_dir=FILE", "is a file; pass a folder"),
    ],
)
def test_runtime_and_data_switches_are_checked_before_any_work(make_cfg, tmp_path, override, match):
    (tmp_path / "FILE").write_text("x")
    override = override.replace("FILE", str(tmp_path / "FILE"))
    with pytest.raises(UserError, match=match):
        run(make_cfg("experiment=smoke", override), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["allow_unlabeled", "only_present"])
def test_data_switches_take_true_or_false_only(key):
    from tgr_bench.data import data_spec

    with pytest.raises(UserError, match=f"data.{key}='no': use true or false"):
        data_spec({"kind": "folder", "root": "/data", key: "no"})
