"""Ablation plots: success rate against a swept value, and the component bar chart."""

from __future__ import annotations

from pathlib import Path

from tests.report.fake import fake_run, identity, ok
from tgr_bench.report.cells import collect
from tgr_bench.report.cli import main as report
from tgr_bench.report.plots import recorded_default


def test_sweep_plot_marks_the_recorded_default(tmp_path: Path):
    runs = tmp_path / "runs"
    fake_run(runs, "mi", identity("vit_base", "mi"), [ok("pit_b", 3), ok("inc_v3", 2)])
    for k in (1, 2, 4):
        fake_run(
            runs, f"k{k}", identity("vit_base", "tgr", {"k": k}), [ok("pit_b", k), ok("inc_v3", 1)]
        )
    cells = collect([runs])
    tgr = cells[cells.attack == "tgr"]
    assert recorded_default(tgr, "k") == 1  # from the runs' records, not from attack code
    report([str(runs), "--out", str(tmp_path / "out"), "--sweep", "k"])
    for name in ("sweep_k.png", "sweep_k.pdf"):
        assert (tmp_path / "out" / name).stat().st_size > 5000


def test_component_plot(tmp_path: Path):
    comp = tmp_path / "comp"
    for i, comps in enumerate(("attn", "attn+qkv", "attn+qkv+mlp")):
        fake_run(
            comp,
            f"c{i}",
            identity("vit_base", "tgr", {"components": comps}),
            [ok("pit_b", 3 + i), ok("inc_v3", 2 + i)],
        )
    report([str(comp), "--out", str(tmp_path / "c"), "--components"])
    assert (tmp_path / "c" / "components.png").stat().st_size > 5000


def test_runs_that_differ_elsewhere_are_never_averaged_into_one_bar(tmp_path: Path):
    from tgr_bench.report.plots import apart, group_averages

    for k in (1, 2):
        for comps in ("attn", "attn+qkv"):
            fake_run(
                tmp_path,
                f"{comps}-{k}",
                identity("vit_base", "tgr", {"components": comps, "k": k}),
                [ok("pit_b", 3 * k)],
            )
    avg = group_averages(collect([tmp_path]))
    assert len(avg) == 4 and sorted(avg.asr) == [30.0, 30.0, 60.0, 60.0]
    assert sorted(apart(avg, "components")) == [" [k=1]", " [k=1]", " [k=2]", " [k=2]"]
    report([str(tmp_path), "--out", str(tmp_path / "c"), "--components"])
    assert (tmp_path / "c" / "components.png").stat().st_size > 5000
