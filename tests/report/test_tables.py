"""The paper's layout: row order and labels, white-box marks, group averages, Markdown and LaTeX."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.fake import fake_run, identity, ok
from tgr_bench.report.cells import collect
from tgr_bench.report.tables import markdown, paper_table
from tgr_bench.report.writers import to_latex

TARGETS = ("vit_base", "pit_b", "deit_b", "inc_v3", "res_v2_101")
MISSING = ("res_v2_101", 0, 0, 0, 0, "missing checkpoint")


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    fake_run(
        root,
        "a",
        identity("vit_base", "mi"),
        [ok("vit_base", 10), ok("pit_b", 4), ok("deit_b", 6), ok("inc_v3", 3), MISSING],
    )
    for k, base in ((1, 7), (2, 5)):
        fake_run(
            root,
            f"tgr_k{k}",
            identity("vit_base", "tgr", {"k": k}),
            [
                ok("vit_base", 10),
                ok("pit_b", base),
                ok("deit_b", base + 2),
                ok("inc_v3", base - 1),
                MISSING,
            ],
        )
    fake_run(root, "pna_dead", identity("vit_base", "pna"), None, targets=list(TARGETS))
    return root


def test_runs_with_modifiers_follow_their_attack(tmp_path: Path):
    """The `make tricks` table: each attack, then its runs with DI/TI, fewest modifiers first;
    unknown attacks last."""
    labels = ["tgr_di_ti", "zeta", "mi_ti", "tgr_patchout_di", "mi", "pna_di", "tgr", "mi_di"]
    for label in labels:
        fake_run(tmp_path, label, identity("vit_base", label), [ok("pit_b", 3)])
    table = paper_table(collect([tmp_path]))
    assert table.attack.tolist() == [
        *("mi", "mi_di", "mi_ti", "pna_di", "tgr", "tgr_di_ti", "tgr_patchout_di", "zeta")
    ]


def test_paper_table_text(runs: Path):
    table = paper_table(collect([runs]))
    assert list(table.columns) == [
        "source",
        "attack",
        *TARGETS,
        "avg ViTs",
        "avg CNNs",
        "run_dirs",
    ]
    assert table.attack.tolist() == ["mi", "pna", "tgr k=1", "tgr k=2"]  # the paper's order
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
    pna = table[table.attack == "pna"].iloc[0]  # a failed run keeps its label, never None
    assert pna["vit_base"] == "failed" and pna["avg ViTs"] == "-"
    assert pna["run_dirs"].endswith("pna_dead")
    md = markdown(table)
    assert "| vit_base | mi | 100.0* | 40.0 | 60.0 | 30.0 | n/a | 50.0 | 30.0 (1/2) |" in md
    assert "white-box" in md and "pna_dead" in md
    tex = to_latex(table.drop(columns="run_dirs"))
    assert (
        r"vit\_base & tgr k=2 & 100.0$^*$ & 50.0 & 70.0 & 40.0 & n/a & 60.0 & 40.0 (1/2) \\" in tex
    )


def test_defended_columns_sit_under_their_defense_with_an_average_each(tmp_path: Path):
    fake_run(
        tmp_path,
        "mi",
        identity("vit_base", "mi"),
        [
            *(ok("vit_base", 10), ok("pit_b", 4), ok("inc_v3", 2)),
            *(ok("vit_base+jpeg", 9), ok("pit_b+jpeg", 3), ok("inc_v3+jpeg", 1)),
            ok("pit_b+rp", 6),
        ],
    )
    table = paper_table(collect([tmp_path]))
    columns = [c for c in table.columns if c not in ("source", "attack", "run_dirs")]
    assert columns == [
        *("vit_base", "pit_b", "inc_v3", "avg ViTs", "avg CNNs"),
        *("vit_base+jpeg", "pit_b+jpeg", "inc_v3+jpeg", "avg +jpeg"),
        *("pit_b+rp", "avg +rp"),
    ]
    row = table.iloc[0]
    assert row["vit_base+jpeg"] == "90.0*"  # the source under a defense is still white-box
    assert row["avg +jpeg"] == "20.0" and row["avg +rp"] == "60.0" and row["avg ViTs"] == "40.0"


def test_the_console_prints_labels_literally(tmp_path: Path, capsys):
    from tgr_bench.report.cli import main as report

    for seed in (0, 1):
        fake_run(tmp_path, f"s{seed}", identity("vit_base", "mi", seed=seed), [ok("pit_b", 3)])
    report([str(tmp_path)])
    out = capsys.readouterr().out
    assert "mi [seed=0]" in out and "mi [seed=1]" in out


def test_groups_without_such_targets_are_refused(tmp_path: Path, capsys):
    from tgr_bench.report.cli import main as report

    fake_run(tmp_path, "mi", identity("vit_base", "mi"), [ok("inc_v3", 3)])
    with pytest.raises(SystemExit) as e:
        report([str(tmp_path), "--groups", "vits"])
    assert e.value.code == 2
    assert "no target of that group; their targets are in cnns" in capsys.readouterr().err
