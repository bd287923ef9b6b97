"""The installed `tgr-bench` console script and `python -m tgr_bench`, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import cli

ROOT = Path(__file__).resolve().parents[1]


def sh(
    args: list[str], env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_smoke_through_the_console_script(tmp_path: Path):
    out = tmp_path / "run"
    r = sh(cli("experiment=smoke", f"hydra.run.dir={out}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list((out / "images").glob("*.png"))) == 8
    df = pd.read_csv(out / "results.csv")
    assert df.target.tolist() == ["test_vit", "test_convnext", "test_efficientnet"]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert "asr_on_correct" in r.stderr  # the rich table
    assert (out / ".hydra" / "config.yaml").is_file()


def test_python_dash_m_and_targets_none(tmp_path: Path):
    out = tmp_path / "run"
    args = [
        "experiment=smoke",
        "data.n=2",
        "attack.steps=1",
        "targets=none",
        f"hydra.run.dir={out}",
    ]
    r = sh([sys.executable, "-m", "tgr_bench", *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "synthetic_0000.png",
        "synthetic_0001.png",
    ]
    assert not (out / "results.csv").exists()


def test_multirun_sweep_gives_one_run_per_value(tmp_path: Path):
    sweep = tmp_path / "sweep"
    r = sh(
        cli(
            "-m",
            "experiment=smoke",
            "data.n=2",
            "targets=none",
            "attack.steps=1,2",
            f"hydra.sweep.dir={sweep}",
        ),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "run.json").exists())
    steps = [json.loads((p / "run.json").read_text())["config"]["attack"]["steps"] for p in runs]
    assert steps == [1, 2]


def test_bad_input_is_one_clear_paragraph(tmp_path: Path):
    out = tmp_path / "run"
    r = sh(
        cli("data.root=/no/such/folder", "source=test_vit", "targets=none", f"hydra.run.dir={out}"),
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert "tgr-bench: error: Data folder /no/such/folder does not exist" in r.stderr
    assert "experiment=smoke" in r.stderr
    assert not (out / "results.csv").exists() and not (out / "run.json").exists()
    assert "does not exist" in (out / "cli.log").read_text()  # the job log records it too


@pytest.mark.parametrize("override,listed", [("attack=nope", "mi"), ("source=nope", "vit_base")])
def test_unknown_choice_lists_valid_ones(tmp_path: Path, override: str, listed: str):
    r = sh(cli("experiment=smoke", override), cwd=tmp_path)
    assert r.returncode != 0
    assert "Available options" in r.stderr and listed in r.stderr
    assert "Traceback" not in r.stderr


def test_no_network_stops_within_seconds(tmp_path: Path):
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }  # unreachable even where network exists
    t0 = time.monotonic()
    args = ["source=vit_base", "targets=none", "data=synthetic", f"hydra.run.dir={tmp_path / 'r'}"]
    r = sh(cli(*args), env=env, cwd=tmp_path)
    assert time.monotonic() - t0 < 60
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "vit_base_patch16_224.augreg_in21k_ft_in1k" in r.stderr and "checkpoint=" in r.stderr


def test_wheel_ships_the_configs(tmp_path: Path):
    """A non-editable install finds conf/ inside the package."""
    r = sh(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ]
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("tgr_bench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "tgr_bench/conf/config.yaml",
        "tgr_bench/conf/source/vit_base.yaml",
        "tgr_bench/conf/targets/paper.yaml",
        "tgr_bench/conf/experiment/smoke.yaml",
    ):
        assert needed in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import tgr_bench, hydra\n"
        "from hydra import compose, initialize_config_module\n"
        f"assert tgr_bench.__file__.startswith({str(site)!r}), tgr_bench.__file__\n"
        "with initialize_config_module('tgr_bench.conf', version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['experiment=smoke'])\n"
        "print(cfg.source.model, len(cfg.targets))\n"
    )
    r = sh([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["test_vit.r160_in1k", "3"]
