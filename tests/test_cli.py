"""The installed `tgr-bench` console script and `python -m tgr_bench`, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import cli
from tgr_bench.pixels import read_image

ROOT = Path(__file__).resolve().parents[1]


def sh(
    args: list[str], env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_smoke_through_the_console_script(tmp_path: Path):
    out = tmp_path / "run"
    r = sh(cli("experiment=smoke", f"hydra.run.dir={out}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list((out / "images").glob("*.png"))) == 32
    df = pd.read_csv(out / "results.csv")
    assert df.target.tolist() == ["test_pit", "test_pit_near", "test_pit_far"]
    # Related targets: most clean images right, and the attack fools some of them, not all.
    assert (df.clean_acc > 50).all() and (df.asr < 100).all() and (df.asr > 0).all()
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert "asr_on_correct" in r.stderr  # the rich table
    assert (out / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
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


def test_multirun_sweep_gives_one_run_per_value(tgr, tmp_path: Path):
    sweep = tmp_path / "sweep"
    r = tgr(
        "-m",
        "experiment=smoke",
        "data.n=2",
        "targets=none",
        "attack.steps=1,2",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode == 0, r.stderr
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "run.json").exists())
    steps = [json.loads((p / "run.json").read_text())["config"]["attack"]["steps"] for p in runs]
    assert steps == [1, 2]


def test_bad_input_is_one_clear_paragraph(tgr, tmp_path: Path):
    out = tmp_path / "run"
    r = tgr("data.root=/no/such/folder", "source=test_vit", "targets=none", f"hydra.run.dir={out}")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert "tgr-bench: error: Data folder /no/such/folder does not exist" in r.stderr
    assert "experiment=smoke" in r.stderr
    assert not (out / "results.csv").exists() and not (out / "run.json").exists()
    assert "does not exist" in (out / "cli.log").read_text()  # the job log records it too


@pytest.mark.parametrize("override,listed", [("attack=nope", "mi"), ("source=nope", "vit_base")])
def test_unknown_choice_lists_valid_ones(tgr, override: str, listed: str):
    r = tgr("experiment=smoke", override)
    assert r.returncode == 2
    assert "no such" in r.stderr and listed in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
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


@pytest.mark.slow
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
        "import tgr_bench\n"
        "from tgr_bench.config import compose\n"
        f"assert tgr_bench.__file__.startswith({str(site)!r}), tgr_bench.__file__\n"
        "cfg = compose(['experiment=smoke'])\n"
        "print(cfg.source.model, len(cfg.targets))\n"
    )
    r = sh([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pit_b_224.in1k", "3"]


def test_numbers_and_budgets_get_one_line_errors(tgr, tmp_path: Path):
    for override, says in (
        ("attack.eps=0.0627", "You probably meant attack.eps=16"),
        ("attack.alpha=0.0063", "You probably meant attack.alpha=1.6"),
        ("attack.eps=abc", "attack.eps='abc' is not a number"),
        ("attack.steps=abc", "attack.steps='abc': need a whole number"),
        ("seed=abc", "seed='abc': need a whole number"),
    ):
        r = tgr("experiment=smoke", override, f"hydra.run.dir={tmp_path / 'r'}")
        assert r.returncode == 2, (override, r.stderr[-500:])
        assert says in r.stderr and "Traceback" not in r.stderr, override


@pytest.mark.parametrize(
    "override,says",
    [
        ("attack=tgrr", "no such attack. Did you mean tgr?"),
        ("source=vit_bas", "no such source. Did you mean vit_base"),
        ("attack.kk=2", "belong to attack=tgr"),
        ("data.limt=3", "Did you mean data.limit?"),
    ],
)
def test_typos_get_the_closest_known_name(tgr, override: str, says: str):
    r = tgr("experiment=smoke", override)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-800:]
    assert "+attack.kk" not in r.stderr and "Traceback" not in r.stderr


def test_help_starts_with_usage(tgr):
    r = tgr("--help")
    assert r.returncode == 0
    assert r.stdout.lstrip().startswith("tgr-bench:") and "Usage:" in r.stdout.split("==")[0]
    assert "tgr-bench experiment=smoke" in r.stdout and "== Config groups" in r.stdout


def test_piped_output_shows_progress_and_one_summary(tgr, tmp_path: Path):
    out = tmp_path / "run"
    r = tgr("experiment=smoke", "data.n=8", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(ln.startswith("crafting mi on test_pit: 8/8") for ln in lines)
    assert any("images/s" in ln for ln in lines if ln.startswith("crafting"))
    assert sum("images: 8 attacked" in ln for ln in lines) == 1  # printed once, not twice
    assert "Run complete" in (out / "cli.log").read_text()  # and recorded in the job log


def manifest_lines(run_dir: Path) -> int:
    path = run_dir / "manifest.jsonl"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,code,what", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")]
)
def test_a_signal_ends_the_run_with_one_line(tmp_path: Path, sig, code: int, what: str):
    out = tmp_path / "run"
    args = ("experiment=smoke", "data.n=40", "batch_size=1", "attack=tgr", "targets=none")
    proc = subprocess.Popen(
        cli(*args, f"hydra.run.dir={out}"), cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while manifest_lines(out) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    saved = manifest_lines(out)
    assert 2 <= saved < 40
    assert f"stopped by {what}: {saved}/40 images saved" in err and "re-run the same command" in err
    assert f"stopped by {what}" in (out / "cli.log").read_text()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    for png in (out / "images").glob("*.png"):  # every recorded image is whole
        read_image(png)
    r = sh(cli(*args, f"hydra.run.dir={out}"), cwd=tmp_path)  # resumes
    assert r.returncode == 0 and f"{saved} resumed" in r.stderr


def test_the_same_sweep_lands_in_the_same_folder_and_resumes(tgr, tmp_path: Path):
    args = ("-m", "experiment=smoke", "data.n=2", "attack.steps=1", "targets=none", "attack=mi,pna")
    first = tgr(*args)
    assert first.returncode == 0, first.stderr
    (sweep,) = (tmp_path / "multirun").iterdir()
    again = tgr(*args)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already complete") == 2  # every job: nothing left to do
    resumed = tgr(*args, "batch_size=1")  # a runtime knob keeps the folder
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in (tmp_path / "multirun").iterdir()] == [sweep.name]
    assert resumed.stderr.count("0 attacked, 2 resumed") == 2


@pytest.mark.slow
def test_evaluating_the_images_a_folder_has(tgr, tmp_path: Path):
    common = ("experiment=smoke", "data.n=4", "attack.steps=1", "data.labels=random")
    crafted = tmp_path / "crafted"
    assert tgr(*common, "targets=none", f"hydra.run.dir={crafted}").returncode == 0
    partial = tmp_path / "partial"
    partial.mkdir()
    for png in sorted((crafted / "images").glob("*.png"))[:3]:
        (partial / png.name).write_bytes(png.read_bytes())
    r = tgr(*common, f"adv_dir={partial}")
    assert r.returncode == 2 and "1 of 4 clean images have no adversarial image" in r.stderr
    assert "data.only_present=true" in r.stderr
    r = tgr(*common, f"adv_dir={partial}", "data.only_present=true")
    assert r.returncode == 0, r.stderr
    assert "evaluated 3 images" in r.stderr and "of 4 clean images" in r.stderr
    (run_dir,) = (tmp_path / "outputs" / "eval" / "external-partial").iterdir()
    assert (pd.read_csv(run_dir / "results.csv").n == 3).all()
    r = tgr(*common, f"adv_dir={crafted / 'images'}")  # a tgr-bench run's folder
    assert r.returncode == 0, r.stderr
    named = [p.name for p in (tmp_path / "outputs" / "eval").iterdir()]
    assert any(n.startswith("test_pit-mi-") for n in named), named


@pytest.mark.parametrize(
    "argv,match",
    [
        (["hydra.run.dir=FILE/run"], "FILE is a file; choose a folder"),
        (["-m", "hydra.sweep.dir=FILE"], "FILE is a file; choose a folder"),
        (["hydra.run.dir="], "an empty or root folder would mix the run's files with others"),
        (["hydra.run.dir=/"], "an empty or root folder"),
        (["-m", "hydra.sweep.dir= "], "an empty or root folder"),
        (["data.root=/data/ré"], "quote it, in the shell: 'data.root=\"/data/ré\"'"),
        (["hydra.run.dir=/tmp/ré"], "Hydra cannot read this value unquoted"),
        (["-m", 'hydra.sweep.dir="~/sweeps"'], "Hydra does not expand ~"),
        (["hydra.run.dir=~/runs/a"], "e.g. hydra.run.dir=$HOME/runs/a"),
    ],
)
def test_settings_that_would_be_ignored_or_crash_hydra_are_refused(tmp_path: Path, argv, match):
    from tgr_bench.cli import check_overrides
    from tgr_bench.errors import UserError

    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    with pytest.raises(UserError, match=re.escape(match.replace("FILE", str(tmp_path / "FILE")))):
        check_overrides(argv)


def test_an_unwritable_output_folder_is_named_before_any_work(
    tgr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access  # root may write anywhere: the check's answer for this folder is set
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    r = tgr("experiment=smoke", f"hydra.run.dir={locked / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{locked} is not writable (permission denied or a read-only mount)" in r.stderr
    r = tgr("--out", str(locked / "tables"), str(tmp_path), prog="tgr-bench-report")
    assert r.returncode == 2 and f"--out={locked / 'tables'}: {locked} is not writable" in r.stderr


@pytest.mark.parametrize(
    "override,says",
    [
        ("attack_overrides.mi.step=1", "Did you mean attack_overrides.mi.steps"),
        ("attack.eps=4", "each set as attack_overrides.<name>.<key>=value"),
    ],
)
def test_variance_typos_and_plain_attack_keys(tgr, tmp_path: Path, override: str, says: str):
    r = tgr("experiment=smoke", "attacks=[mi]", override, prog="tgr-bench-variance")
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "outputs").exists()


def test_list_refuses_unknown_arguments(capsys):
    from tgr_bench.listing import main

    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_attack_settings_with_adv_dir_are_pointed_out(capsys):
    from tgr_bench.cli import check_overrides

    check_overrides(["adv_dir=/x", "attack.targeted=true"])
    assert "note: attack.targeted=true ignored: adv_dir= evaluates" in capsys.readouterr().err
