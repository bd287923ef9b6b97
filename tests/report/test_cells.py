"""Cells: one identity per cell, shards merged, runs on other data or precision in rows of their
own, duplicates refused naming both directories, directories without a record skipped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.report.fake import fake_run, identity, ok
from tgr_bench.errors import UserError
from tgr_bench.report.cells import collect
from tgr_bench.report.tables import paper_table


def test_shards_merge_to_the_unsharded_numbers(tmp_path: Path):
    root = tmp_path / "sharded"
    fake_run(root, "s0", identity("vit_base", "mi", shard=(0, 2)), [ok("pit_b", 3, n=5)])
    fake_run(root, "s1", identity("vit_base", "mi", shard=(1, 2)), [ok("pit_b", 1, n=4)])
    cells = collect([root])
    assert len(cells) == 1 and cells.iloc[0].n == 9 and cells.iloc[0].asr == pytest.approx(400 / 9)
    assert cells.iloc[0].status == "ok"
    half = tmp_path / "half"
    fake_run(half, "s0", identity("vit_base", "mi", shard=(0, 2)), [ok("pit_b", 3, n=5)])
    assert collect([half]).iloc[0].status == "incomplete"


def test_admix_shards_merge_only_over_one_partner_pool(tmp_path: Path):
    """Admix's images depend on the whole data set: shards made on two versions of it are not
    parts of one run."""
    same, other = tmp_path / "same", tmp_path / "other"
    for root, second in ((same, "p1"), (other, "p2")):
        fake_run(
            root, "s0", identity("vit_base", "mi", shard=(0, 2)), [ok("pit_b", 3, n=5)], pool="p1"
        )
        fake_run(
            root, "s1", identity("vit_base", "mi", shard=(1, 2)), [ok("pit_b", 1, n=4)], pool=second
        )
    assert collect([same]).iloc[0].n == 9
    with pytest.raises(UserError, match="mixed in different pools of clean images"):
        collect([other])


def test_a_pilot_on_fewer_images_is_a_row_of_its_own(tmp_path: Path):
    fake_run(tmp_path, "full", identity("vit_base", "mi"), [ok("pit_b", 400, n=1000)])
    fake_run(tmp_path, "pilot", identity("vit_base", "mi", data={"limit": 100}), [ok("pit_b", 2)])
    cells = collect([tmp_path])
    assert sorted(cells.n) == [10, 1000]  # never summed, never one replacing the other
    table = paper_table(cells)
    assert sorted(zip(table.attack, table.pit_b, strict=True)) == [
        ("mi [data.limit=100]", "20.0"),
        ("mi [data.limit=None]", "40.0"),
    ]


def test_precisions_are_rows_of_their_own_not_shards(tmp_path: Path):
    fake_run(tmp_path, "fp32", identity("vit_base", "mi"), [ok("pit_b", 4, n=1000)])
    fake_run(tmp_path, "bf16", identity("vit_base", "mi", precision="bf16"), [ok("pit_b", 5)])
    table = paper_table(collect([tmp_path]))
    assert sorted(table.attack) == ["mi [precision=bf16]", "mi [precision=fp32]"]


def test_a_copied_run_directory_is_refused_naming_both(tmp_path: Path):
    a = fake_run(tmp_path, "a", identity("vit_base", "mi"), [ok("pit_b", 4)])
    shutil.copytree(a, tmp_path / "copy_of_a")
    with pytest.raises(UserError, match=r"Two run directories .*/a and .*/copy_of_a"):
        collect([tmp_path])


def test_the_same_shard_twice_is_refused(tmp_path: Path):
    fake_run(tmp_path, "x", identity("vit_base", "mi", shard=(0, 2)), [ok("pit_b", 4)])
    fake_run(tmp_path, "y", identity("vit_base", "mi", shard=(0, 2)), [ok("pit_b", 5)])
    with pytest.raises(UserError, match="shard 0 of 2 .*/x and .*/y"):
        collect([tmp_path])


def test_a_directory_without_a_record_is_skipped_with_one_line(tmp_path: Path):
    fake_run(tmp_path, "good", identity("vit_base", "mi"), [ok("pit_b", 4)])
    typo = tmp_path / "typo"  # what a failed command leaves: Hydra's files and the log
    (typo / ".hydra").mkdir(parents=True)
    (typo / ".hydra" / "config.yaml").write_text("attack: {name: mi, k: abc}\n")
    (typo / "cli.log").write_text("error: attack.k='abc'\n")
    lines: list[str] = []
    cells = collect([tmp_path], note=lines.append)
    assert len(cells) == 1 and cells.iloc[0].status == "ok"
    assert len(lines) == 1 and "skipped" in lines[0] and str(typo) in lines[0]
    assert "cli.log" in lines[0]


def test_a_failed_run_superseded_by_a_complete_one_is_noted(tmp_path: Path):
    ident = identity("vit_base", "mi")
    fake_run(tmp_path, "died", ident, None, targets=["pit_b"])
    fake_run(tmp_path, "done", ident, [ok("pit_b", 4)])
    lines: list[str] = []
    cells = collect([tmp_path], note=lines.append)
    assert cells.iloc[0].status == "ok" and cells.iloc[0].run_dirs.endswith("done")
    assert any("died" in line and "superseded" in line for line in lines)


def test_two_weight_files_of_one_target_are_two_columns(tmp_path: Path):
    """The same images evaluated on two weight files of pit_b: both kept, never mixed."""
    ident = identity("vit_base", "mi")
    fake_run(tmp_path, "hub", ident, [ok("pit_b", 4), ok("deit_b", 1)], sha="a" * 64)
    fake_run(tmp_path, "other", ident, [ok("pit_b", 7)], sha="b" * 64)
    cells = collect([tmp_path])
    assert sorted(cells.column) == ["deit_b", "pit_b [hub aaaaaaaa]", "pit_b [hub bbbbbbbb]"]
    table = paper_table(cells)
    assert (table["pit_b [hub aaaaaaaa]"].tolist(), table["pit_b [hub bbbbbbbb]"].tolist()) == (
        ["40.0"],
        ["70.0"],
    )
