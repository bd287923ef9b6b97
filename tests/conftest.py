"""Shared fixtures: Hydra composition of the shipped configs, tiny real timm models, image sets."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from tgr_bench.config import compose

# Never let a test reach for the network: weights come from files the tests write.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Keep the clean-prediction cache of the test runs out of the user's home.
os.environ.setdefault("TGR_BENCH_CACHE", tempfile.mkdtemp(prefix="tgr-bench-cache-"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def make_cfg() -> Callable[..., DictConfig]:
    def _make(*overrides: str) -> DictConfig:
        return compose(list(overrides))

    return _make


def write_images(
    folder: Path, n: int, size: int = 64, seed: int = 0, ext: str = ".png"
) -> list[str]:
    """Real image files with smooth random content; returns their stems."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    stems = []
    for i in range(n):
        low = torch.rand(3, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(size, size), mode="bilinear")[0]
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        stem = f"ILSVRC2012_val_{i + 1:08d}"
        Image.fromarray(arr).save(folder / f"{stem}{ext}")
        stems.append(stem)
    return stems


@pytest.fixture
def csv_set(tmp_path: Path) -> Path:
    root = tmp_path / "csvset"
    stems = write_images(root, 5)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for i, s in enumerate(stems):
            w.writerow([f"{s}.png", (37 * i) % 1000])
    return root


@pytest.fixture
def json_set(tmp_path: Path) -> Path:
    """The TGR authors' layout: clean_resized_images/ with the json label file one level above."""
    repo = tmp_path / "tgr_repo"
    stems = write_images(repo / "clean_resized_images", 5)
    table = {
        f"{s}.JPEG": {"class_id": (37 * i) % 1000, "class_name": f"c{i}"}
        for i, s in enumerate(stems)
    }
    (repo / "image_name_to_class_id_and_name.json").write_text(json.dumps(table))
    return repo / "clean_resized_images"


@pytest.fixture(scope="session")
def npy_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Full-size random weight files for the two keys the file tests read (an Inception and a
    ResNet-v2), in the converted `.npy` layout under their released names (written once per
    session: about 200 MB)."""
    from tgr_bench.tfslim import FILES
    from tgr_bench.tfslim.testing import random_weights, write_npy

    folder = tmp_path_factory.mktemp("tfslim")
    return {
        k: write_npy(folder / FILES[k].released_name, random_weights(k, seed=7))
        for k in ("inc_v3", "res_v2_50")
    }


def cli(*args: str) -> list[str]:
    """The installed console script next to this interpreter (for the tests that need a process
    of its own: signals, kills, the installed entry points)."""
    exe = Path(sys.executable).with_name("tgr-bench")
    return [str(exe), *args]


@dataclass
class Result:
    """A console script's exit code and output, named as subprocess.CompletedProcess names them."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def tgr(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path):
    """Run `tgr-bench` (or `prog=`: tgr-bench-variance, tgr-bench-report) in this process,
    exactly as its entry point runs it (the command line checks, Hydra, the run, the exit code),
    from `cwd`
    (default tmp_path). A few times faster than a fresh process: the imports are paid once."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from tgr_bench import cli as tgr_cli
    from tgr_bench.report import cli as report_cli
    from tgr_bench.variance import cli as variance_cli

    mains = {
        "tgr-bench": tgr_cli.main,
        "tgr-bench-variance": variance_cli.main,
        "tgr-bench-report": report_cli.main,
    }

    def call(*args: str, prog: str = "tgr-bench", cwd: Path | None = None) -> Result:
        monkeypatch.chdir(cwd or tmp_path)
        monkeypatch.setattr(sys, "argv", [prog, *args])
        handler = signal.getsignal(signal.SIGTERM)
        capsys.readouterr()
        code = 0
        try:
            mains[prog]()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            signal.signal(signal.SIGTERM, handler)
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None
            _close_job_logs()
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return call


def _close_job_logs() -> None:
    """Hydra's job log (cli.log) handler of a finished in-process run: closed, so the next run
    never writes into it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
