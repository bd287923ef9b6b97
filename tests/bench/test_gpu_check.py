"""The GPU check's --quick mode: the same code paths as on a GPU, tiny models on the CPU, run
through the shell script a GPU machine runs, so neither can rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_check_writes_every_section(tmp_path: Path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert {"device", "crafting", "tgr_over_mi", "evaluation", "determinism"} <= set(data)
    assert data["skipped"] == [] and data["profile"] == "quick"
    assert set(data["crafting"]) == {"mi", "vmi", "sgm", "pna", "tgr", "tgr_patchout"}
    for per_precision in data["crafting"].values():
        assert set(per_precision) == {"fp32", "tf32", "bf16"}
        for case in per_precision.values():
            assert case["images_per_s"] > 0 and case["peak_memory_mb"] > 0
    assert set(data["tgr_over_mi"]) == {"fp32", "tf32", "bf16"}
    assert set(data["families"]) == {"vit", "deit", "pit", "cait", "visformer"}
    assert all(row["batch_speedup"] > 0 for row in data["families"].values())
    assert set(data["evaluation"]) == {"test_pit", "test_pit_near", "test_pit_far"}  # smoke
    assert data["evaluation"]["test_pit"]["fused_attention"] is True  # targets keep the kernel
    assert data["paper_workload"]["images"] == 1000
    assert set(data["modifiers"]) == {"mi_di_ti", "tgr_di_ti"}
    assert set(data["successors"]) == {"att", "gns", "vdc", "fpr", "ll2s"}
    assert all(r["over_mi"] > 0 for r in data["successors"].values())
    assert all(r["over_mi"] > 0 and r["images_per_s"] > 0 for r in data["modifiers"].values())
    for attack in ("tgr", "mi"):
        assert data["determinism"][attack]["identical"] is True
        assert data["determinism"][attack]["images"] == 2
    md = (out / "gpu_check.md").read_text()
    headings = ("## Crafting", "## TGR per source family", "## Evaluation", "## Determinism")
    for heading in (*headings, "## Transfer modifiers", "## The attacks after TGR"):
        assert heading in md


@pytest.mark.slow
@pytest.mark.parametrize("words", [["OUT", "--help"], ["--help", "--out", "OUT"]])
def test_the_output_folder_is_the_first_word_or_out_anywhere(words: list[str], tmp_path: Path):
    args = [str(tmp_path / w) if w == "OUT" else w for w in words]
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 0 and "--quick" in r.stdout, r.stderr[-2000:]
