"""tgr-bench-report as users run it: files written, real multiruns and folder evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.report.fake import fake_run, identity, ok
from tgr_bench.report.cells import collect
from tgr_bench.report.cli import main as report
from tgr_bench.report.tables import paper_table


def test_report_cli_writes_files(tmp_path: Path, capsys):
    runs = tmp_path / "runs"
    fake_run(
        runs,
        "mi",
        identity("vit_base", "mi"),
        [ok("vit_base", 10), ok("pit_b", 4), ok("inc_v3", 3)],
    )
    fake_run(runs, "k2", identity("vit_base", "tgr", {"k": 2}), [ok("pit_b", 6), ok("inc_v3", 5)])
    out = tmp_path / "out"
    report([str(runs), "--out", str(out), "--groups", "vits"])
    assert "inc_v3" not in (out / "table.md").read_text()
    assert pd.read_csv(out / "table.csv").attack.tolist() == ["mi", "tgr"]
    cells = pd.read_csv(out / "table_cells.csv")
    assert cells.run_dirs.str.contains("k2").any()  # every cell traces to its run
    with pytest.raises(SystemExit):
        report([str(tmp_path / "nothing")])
    assert "does not exist" in capsys.readouterr().err


def cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: cut(d / "results.csv", 0.6), "has no rows for targets"),
        (lambda d: (d / "results.csv").unlink(), "records a complete run but has no results.csv"),
        (lambda d: (d / "results.csv").write_text(""), "results.csv cannot be read"),
        (lambda d: (d / "results.csv").write_text("a,b\n1,2\n"), "lacks the columns"),
        (lambda d: (d / "run.json").write_text("[1, 2, 3]"), "is not a tgr-bench run record"),
    ],
)
def test_damaged_run_directories_are_named_never_half_reported(
    tmp_path: Path, capsys, damage, message
):
    """A results.csv cut short must not become a table with cells missing."""
    run = fake_run(
        tmp_path / "runs", "a", identity("vit_base", "mi"), [ok("pit_b", 4), ok("inc_v3", 2)]
    )
    damage(run)
    with pytest.raises(SystemExit) as e:
        report([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--groups", "vit"], "no target groups ['vit']; choose among vits, cnns, defended"),
        (["--sweep", "zzz"], "no run in this table has the parameter 'zzz'"),
        (["--out", "FILE"], "is a file; choose a folder"),
        (["--bench", "MISSING"], "not a scripts/bench.py JSON result"),
        (["--bench", "ODD"], "no 'crafting' section"),
        (["--metric", "tsr"], "--metric tsr is the targeted success rate"),
    ],
)
def test_bad_report_options_write_nothing(tmp_path: Path, capsys, args, message):
    runs = tmp_path / "runs"
    fake_run(runs, "a", identity("vit_base", "mi"), [ok("pit_b", 4)])
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "ODD").write_text('{"a": 1}')
    args = [str(tmp_path / a) if a in ("FILE", "MISSING", "ODD") else a for a in args]
    out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    with pytest.raises(SystemExit) as e:
        report([str(runs), *args, *out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_collision_is_a_clean_error(tmp_path: Path, capsys):
    fake_run(tmp_path, "a", identity("vit_base", "mi"), [ok("pit_b", 4)])
    fake_run(tmp_path, "b", identity("vit_base", "mi"), [ok("pit_b", 4)])
    with pytest.raises(SystemExit) as e:
        report([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "tgr-bench-report: error: Two run directories" in err and "Traceback" not in err


@pytest.mark.slow
def test_smoke_multirun_over_k_gives_one_row_per_k(tgr, tmp_path: Path):
    sweep = tmp_path / "sweep"
    r = tgr(
        "-m",
        "experiment=smoke",
        "attack=tgr",
        "attack.k=1,2",
        "data.n=2",
        "attack.steps=2",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode == 0, r.stderr
    report([str(sweep), "--out", str(tmp_path / "rep"), "--sweep", "k"])
    table = pd.read_csv(tmp_path / "rep" / "table.csv")
    assert table.attack.tolist() == ["tgr k=1", "tgr k=2"]
    assert table.test_pit.str.endswith("*").all()  # the source: the white-box column
    assert (table["test_pit_near"] != "").all() and len(table) == 2
    assert (tmp_path / "rep" / "sweep_k.png").is_file()


def test_an_evaluation_of_many_folders_reports_each_folder(make_cfg, tgr, tmp_path: Path):
    from tgr_bench.pipeline import run

    common = ("experiment=smoke", "data.n=2", "attack.steps=1", "data.labels=random")
    for attack in ("mi", "pna"):
        run(make_cfg(*common, f"attack={attack}", "targets=none"), output_dir=tmp_path / attack)
    evaluation = tmp_path / "eval"
    r = tgr(
        *common,
        f"adv_dir=[{tmp_path / 'mi' / 'images'},{tmp_path / 'pna' / 'images'}]",
        f"hydra.run.dir={evaluation}",
    )
    assert r.returncode == 0, r.stderr
    table = paper_table(collect([evaluation]))
    assert table.attack.tolist() == ["mi", "pna"] and set(table.source) == {"test_pit"}


def test_bench_json_is_tabulated(tmp_path: Path):
    bench = {
        "device": "cpu (x86_64, 2 threads)",
        "source": "vit_base",
        "batch_size": 8,
        "precision": "fp32",
        "tgr_over_mi": 1.066,
        "crafting": {"mi": {"images_per_s": 1.18}, "tgr": {"images_per_s": 1.1}},
        "evaluation": {"inc_v3": {"images_per_s": 11.7}},
    }
    (tmp_path / "b.json").write_text(json.dumps(bench))
    report(["--bench", str(tmp_path / "b.json"), "--out", str(tmp_path)])
    assert (
        "| cpu (x86_64, 2 threads) | vit_base | 8 | fp32 | mi 1.18, tgr 1.10 | 1.066 | "
        "inc_v3 11.7 |"
    ) in (tmp_path / "bench.md").read_text()


def test_a_craft_only_run_is_told_how_to_evaluate_it(tgr, tmp_path: Path):
    crafted = tmp_path / "crafted"
    r = tgr(
        "experiment=smoke", "data.n=2", "attack.steps=1", "targets=none", f"hydra.run.dir={crafted}"
    )
    assert r.returncode == 0, r.stderr
    r = tgr(str(crafted), prog="tgr-bench-report")
    assert r.returncode == 2 and "craft-only run (targets=none)" in r.stderr
    assert f"adv_dir={crafted / 'images'}" in r.stderr and "Re-run" not in r.stderr
