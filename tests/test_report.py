"""tgr-bench-report on hand-made run directories, and on a real smoke multirun."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import cli
from tgr_bench.aggregate import collect
from tgr_bench.report_cli import main as report
from tgr_bench.tables import paper_table, to_latex, to_markdown

TARGETS = {k: {"key": k} for k in ("vit_base", "pit_b", "deit_b", "inc_v3", "res_v2_101")}


def fake_run(
    root: Path,
    name: str,
    source: str,
    attack: dict,
    results: list[tuple] | None,
    data: dict | None = None,
) -> Path:
    """A run directory as tgr-bench leaves it; results None: the run died before finishing."""
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    config = {
        "source": {"key": source},
        "attack": {"eps": 16, "steps": 10, "alpha": None, "decay": 1.0, **attack},
        "targets": TARGETS,
        "data": data or {"kind": "folder", "root": "/data"},
        "seed": 0,
        "adv_dir": None,
    }
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if results is not None:
        rows = [
            {
                "source": source,
                "attack": attack["name"],
                "params": "",
                "target": t,
                "target_model": "",
                "white_box": t == source,
                "n": n,
                "asr": None,
                "clean_acc": None,
                "asr_on_correct": None,
                "n_fooled": f,
                "n_clean_correct": c,
                "n_fooled_on_correct": fc,
                "status": status,
            }
            for t, n, f, c, fc, status in results
        ]
        pd.DataFrame(rows).to_csv(d / "results.csv", index=False)
        (d / "run.json").write_text(json.dumps({"status": "complete"}))
    return d


def ok(target: str, fooled: int, n: int = 10) -> tuple:
    return (target, n, fooled, n, fooled, "ok")


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    fake_run(
        root,
        "a",
        "vit_base",
        {"name": "mi"},
        [
            ok("vit_base", 10),
            ok("pit_b", 4),
            ok("deit_b", 6),
            ok("inc_v3", 3),
            ("res_v2_101", 0, 0, 0, 0, "missing checkpoint"),
        ],
    )
    for k, base in ((1, 7), (2, 5)):
        fake_run(
            root,
            f"tgr_k{k}",
            "vit_base",
            {"name": "tgr", "k": k},
            [
                ok("vit_base", 10),
                ok("pit_b", base),
                ok("deit_b", base + 2),
                ok("inc_v3", base - 1),
                ("res_v2_101", 0, 0, 0, 0, "missing checkpoint"),
            ],
        )
    fake_run(root, "pna_dead", "vit_base", {"name": "pna"}, None)
    return root


def test_paper_table_text(runs: Path):
    table = paper_table(collect([runs]))
    assert list(table.columns) == [
        "source",
        "attack",
        "vit_base",
        "pit_b",
        "deit_b",
        "inc_v3",
        "res_v2_101",
        "avg ViTs",
        "avg CNNs",
        "run_dirs",
    ]
    rows = {r.attack: r for r in table.itertuples(index=False)}
    assert list(rows) == ["mi", "pna", "tgr k=1", "tgr k=2"]  # the paper's order
    mi = table.iloc[0].tolist()
    assert mi[:9] == [
        "vit_base",
        "mi",
        "100.0*",
        "40.0",
        "60.0",
        "30.0",
        "n/a",
        "50.0",
        "30.0 (1/2)",
    ]
    tgr1 = table[table.attack == "tgr k=1"].iloc[0]
    assert (tgr1["pit_b"], tgr1["avg ViTs"], tgr1["avg CNNs"]) == ("70.0", "80.0", "60.0 (1/2)")
    pna = table[table.attack == "pna"].iloc[0]
    assert pna["vit_base"] == "failed" and pna["avg ViTs"] == "-"
    assert pna["run_dirs"].endswith("pna_dead")
    md = to_markdown(table)
    assert "| vit_base | mi | 100.0* | 40.0 | 60.0 | 30.0 | n/a | 50.0 | 30.0 (1/2) |" in md
    assert "white-box" in md and "pna_dead" in md
    tex = to_latex(table)
    assert (
        r"vit\_base & tgr k=2 & 100.0$^*$ & 50.0 & 70.0 & 40.0 & n/a & 60.0 & 40.0 (1/2) \\" in tex
    )


def test_shards_merge_to_the_unsharded_numbers(tmp_path: Path):
    root = tmp_path / "sharded"
    data = {"kind": "folder", "root": "/data", "num_shards": 2}
    fake_run(root, "s0", "vit_base", {"name": "mi"}, [ok("pit_b", 3, n=5)], {**data, "shard": 0})
    fake_run(root, "s1", "vit_base", {"name": "mi"}, [ok("pit_b", 1, n=4)], {**data, "shard": 1})
    cells = collect([root])
    assert len(cells) == 1 and cells.iloc[0].n == 9 and cells.iloc[0].asr == pytest.approx(400 / 9)
    fake_run(
        tmp_path / "half",
        "s0",
        "vit_base",
        {"name": "mi"},
        [ok("pit_b", 3, n=5)],
        {**data, "shard": 0},
    )
    assert collect([tmp_path / "half"]).iloc[0].status == "incomplete"


def test_report_cli_writes_files(runs: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    report([str(runs), "--out", str(out), "--groups", "vits"])
    assert "inc_v3" not in (out / "table.md").read_text()
    assert pd.read_csv(out / "table.csv").attack.tolist() == ["mi", "pna", "tgr k=1", "tgr k=2"]
    cells = pd.read_csv(out / "table_cells.csv")
    assert cells.run_dirs.str.contains("tgr_k2").any()  # every cell traces to its run
    with pytest.raises(SystemExit):
        report([str(tmp_path / "nothing")])
    assert "does not exist" in capsys.readouterr().err


def test_plots_are_written(runs: Path, tmp_path: Path):
    report([str(runs), "--out", str(tmp_path), "--sweep", "k"])
    for name in ("sweep_k.png", "sweep_k.pdf"):
        assert (tmp_path / name).stat().st_size > 5000
    comp = tmp_path / "comp"
    for i, comps in enumerate((["attn"], ["attn", "qkv"], ["attn", "qkv", "mlp"])):
        fake_run(
            comp,
            f"c{i}",
            "vit_base",
            {"name": "tgr", "components": comps},
            [ok("pit_b", 3 + i), ok("inc_v3", 2 + i)],
        )
    report([str(comp), "--out", str(tmp_path / "c"), "--components"])
    assert (tmp_path / "c" / "components.png").stat().st_size > 5000


def test_smoke_multirun_over_k_gives_one_row_per_k(tmp_path: Path):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        cli(
            "-m",
            "experiment=smoke",
            "attack=tgr",
            "attack.k=1,2",
            "data.n=2",
            "attack.steps=2",
            f"hydra.sweep.dir={sweep}",
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    exe = Path(cli()[0]).with_name("tgr-bench-report")
    r = subprocess.run(
        [str(exe), str(sweep), "--out", str(tmp_path / "rep"), "--sweep", "k"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "rep" / "table.csv")
    assert table.attack.tolist() == ["tgr k=1", "tgr k=2"]
    assert (table.test_vit == "100.0*").all()
    assert (tmp_path / "rep" / "sweep_k.png").is_file()


def test_an_evaluation_of_many_folders_reports_each_folder(make_cfg, tmp_path: Path):
    from tgr_bench.pipeline import run

    common = ("experiment=smoke", "data.n=2", "attack.steps=1", "data.labels=random")
    for attack in ("mi", "pna"):
        run(make_cfg(*common, f"attack={attack}", "targets=none"), output_dir=tmp_path / attack)
    evaluation = tmp_path / "eval"
    r = subprocess.run(
        cli(
            *common,
            f"adv_dir=[{tmp_path / 'mi' / 'images'},{tmp_path / 'pna' / 'images'}]",
            f"hydra.run.dir={evaluation}",
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    table = paper_table(collect([evaluation]))
    assert table.attack.tolist() == ["mi", "pna"] and set(table.source) == {"test_vit"}


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
