"""Runs that survive: kill and resume, shards, the run-directory lock, hostile input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import cli, write_images
from tgr_bench import atomic
from tgr_bench.data import read_image
from tgr_bench.errors import UserError
from tgr_bench.pipeline import run
from tgr_bench.record import MANIFEST, RESULTS_CSV, RunRecord
from tgr_bench.resume import run_lock

SMOKE = ("experiment=smoke", "data.n=10", "batch_size=1", "attack.steps=10")


def files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "images").iterdir())}


def manifest_entries(run_dir: Path) -> int:
    path = run_dir / MANIFEST
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


@pytest.mark.slow
def test_sigkill_mid_crafting_then_resume_equals_an_uninterrupted_run(tgr, tmp_path: Path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        cli(*SMOKE, f"hydra.run.dir={killed}"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while manifest_entries(killed) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = manifest_entries(killed)
    assert 3 <= done_before < 10, "the kill must land mid-crafting"
    assert not (killed / RESULTS_CSV).exists()
    assert RunRecord.load(killed).status == "running"  # a killed run never looks complete
    for png in (killed / "images").glob("*.png"):  # atomic renames: no PNG is partial
        read_image(png)

    r = tgr(*SMOKE, f"hydra.run.dir={killed}")
    assert r.returncode == 0, r.stderr
    record = RunRecord.load(killed)
    assert record.status == "complete"
    assert record.crafting.resumed == done_before
    assert record.crafting.attacked == 10 - done_before

    r = tgr(*SMOKE, f"hydra.run.dir={clean}")
    assert r.returncode == 0, r.stderr
    assert files(killed) == files(clean)  # leftover temporary files included: none
    assert (killed / "results.csv").read_bytes() == (clean / "results.csv").read_bytes()
    assert (killed / "predictions.csv").read_bytes() == (clean / "predictions.csv").read_bytes()


def test_unverified_images_are_crafted_again(make_cfg, tmp_path: Path):
    cfg = make_cfg("experiment=smoke", "data.n=4", "attack.steps=2", "targets=none")
    run(cfg, output_dir=tmp_path / "a")
    first = files(tmp_path / "a")
    images = tmp_path / "a" / "images"
    (images / "synthetic_0001.png").write_bytes(first["synthetic_0001.png"][:50])  # truncated
    (images / "synthetic_0002.png").unlink()
    (images / ".synthetic_0002.png.x1y2.tmp").write_bytes(b"half a png")  # a killed write
    record = run(cfg, output_dir=tmp_path / "a")
    assert (record.crafting.resumed, record.crafting.attacked) == (2, 2)
    assert files(tmp_path / "a") == first


def test_resuming_with_other_settings_is_refused(make_cfg, tmp_path: Path):
    run(
        make_cfg("experiment=smoke", "data.n=2", "attack.steps=2", "targets=none"),
        output_dir=tmp_path,
    )
    record_bytes = (tmp_path / "run.json").read_bytes()
    with pytest.raises(UserError, match="another configuration .*differs in: params"):
        run(
            make_cfg("experiment=smoke", "data.n=2", "attack.steps=3", "targets=none"),
            output_dir=tmp_path,
        )
    # The refusal leaves the record of the images that are there untouched.
    assert (tmp_path / "run.json").read_bytes() == record_bytes
    # Settings that cannot change an image (batch size, targets) resume fine.
    record = run(
        make_cfg("experiment=smoke", "data.n=2", "attack.steps=2", "batch_size=1"),
        output_dir=tmp_path,
    )
    assert record.crafting.resumed == 2 and (tmp_path / "results.csv").exists()


def test_same_command_same_default_directory(tgr, tmp_path: Path):
    args = ("experiment=smoke", "data.n=2", "attack.steps=1", "targets=none")
    outs = []
    for extra in ((), (), ("attack.steps=2",)):
        r = tgr(*args, *extra)
        assert r.returncode == 0, r.stderr
        outs.append(sorted(str(p) for p in (tmp_path / "outputs").rglob("run.json")))
    assert len(outs[0]) == len(outs[1]) == 1 and len(outs[2]) == 2


@pytest.mark.slow
def test_shards_craft_every_image_once_and_match_the_unsharded_run(tgr, tmp_path: Path):
    whole, sweep = tmp_path / "whole", tmp_path / "sweep"
    common = ("experiment=smoke", "data.n=7", "attack.steps=3")
    r = tgr(*common, f"hydra.run.dir={whole}")
    assert r.returncode == 0, r.stderr
    r = tgr("-m", *common, "data.num_shards=3", "data.shard=0,1,2", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr
    shards = sorted(p for p in sweep.iterdir() if (p / "run.json").exists())
    assert len(shards) == 3
    merged: dict[str, bytes] = {}
    for s in shards:
        part = files(s)
        assert not set(part) & set(merged)  # each image crafted once
        merged.update(part)
    assert merged == files(whole)
    # Each shard is a run of its own (run_id); everything else per image is the same.
    preds = pd.concat([pd.read_csv(s / "predictions.csv") for s in shards]).drop(columns="run_id")
    key = ["target", "stem"]
    whole_preds = pd.read_csv(whole / "predictions.csv").drop(columns="run_id")
    want = whole_preds.sort_values(key, ignore_index=True)
    assert preds.sort_values(key, ignore_index=True).equals(want)
    counts = sum(
        pd.read_csv(s / "results.csv")[["n", "n_fooled", "n_clean_correct"]] for s in shards
    )
    assert counts.equals(pd.read_csv(whole / "results.csv")[["n", "n_fooled", "n_clean_correct"]])


def test_bad_shard_settings(make_cfg, tmp_path: Path):
    for overrides, match in (
        (["data.num_shards=0"], "num_shards"),
        (["data.num_shards=2", "data.shard=2"], "shard"),
        (["data.n=4", "data.num_shards=8", "data.shard=6"], "holds no images: use at most 4"),
    ):
        with pytest.raises(UserError, match=match):
            run(make_cfg("experiment=smoke", *overrides), output_dir=tmp_path / "x")


def test_second_run_on_the_same_directory_is_refused(make_cfg, tmp_path: Path):
    cfg = make_cfg("experiment=smoke", "data.n=2", "attack.steps=1", "targets=none")
    with run_lock(tmp_path), pytest.raises(UserError, match="Another tgr-bench run .* is writing"):
        run(cfg, output_dir=tmp_path)
    assert not (tmp_path / "images").exists()
    run(cfg, output_dir=tmp_path)  # released: the run goes ahead


def test_full_disk_while_saving_leaves_no_result(make_cfg, tmp_path: Path, monkeypatch):
    real = atomic.os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(UserError, match="No space left on device.*Free disk space and re-run"):
        run(make_cfg("experiment=smoke", "data.n=6", "attack.steps=1"), output_dir=tmp_path)
    assert not (tmp_path / "results.csv").exists()
    failed = RunRecord.load(tmp_path)
    assert failed.status != "complete"  # the full disk may keep even the failure unrecorded
    assert not [p for p in (tmp_path / "images").iterdir() if not p.name.endswith(".png")]
    monkeypatch.undo()
    record = run(make_cfg("experiment=smoke", "data.n=6", "attack.steps=1"), output_dir=tmp_path)
    assert record.crafting.resumed + record.crafting.attacked == 6


@pytest.mark.parametrize(
    "mode,match", [("I;16", "mode 'I;16'"), ("RGBA", "mode 'RGBA'"), ("P", "mode 'P'")]
)
def test_non_rgb_images_are_refused_by_name(csv_set: Path, make_cfg, tmp_path: Path, mode, match):
    bad = csv_set / "ILSVRC2012_val_00000004.png"
    Image.new(mode, (64, 64)).save(bad)
    cfg = make_cfg("experiment=smoke", "data=folder", f"data.root={csv_set}")
    with pytest.raises(UserError, match=f"ILSVRC2012_val_00000004.png has {match}"):
        run(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def png_16bit_rgb(path: Path, width: int, height: int) -> None:
    """A valid PNG with 16 bits per channel, written chunk by chunk (PIL cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    row = b"\x00" + b"\x12\x34\xab\xcd\xff\xff" * width  # filter 0, then RGB16 pixels
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def test_16_bit_pngs_are_refused_not_cut_to_8_bits(csv_set: Path, make_cfg, tmp_path: Path):
    """PIL opens them as RGB and keeps each value's high byte."""
    bad = csv_set / "ILSVRC2012_val_00000002.png"
    png_16bit_rgb(bad, 64, 64)
    assert Image.open(bad).mode == "RGB"
    with pytest.raises(UserError, match="00000002.png has 16 bits per channel"):
        read_image(bad)
    cfg = make_cfg("experiment=smoke", "data=folder", f"data.root={csv_set}")
    with pytest.raises(UserError, match="00000002.png has 16 bits per channel"):
        run(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_jpeg_truncated_and_empty_folder(tmp_path: Path, make_cfg):
    root = tmp_path / "jpg"
    write_images(root, 3, ext=".jpg")
    (root / "labels.csv").write_text(
        "filename,label\n" + "".join(f"ILSVRC2012_val_{i:08d}.jpg,{i}\n" for i in (1, 2, 3))
    )
    victim = root / "ILSVRC2012_val_00000002.jpg"
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    with pytest.raises(UserError, match="ILSVRC2012_val_00000002.jpg"):
        run(make_cfg("experiment=smoke", "data=folder", f"data.root={root}"), tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "labels.csv").write_text("filename,label\n")
    with pytest.raises(UserError, match="No images"):
        run(make_cfg("experiment=smoke", "data=folder", f"data.root={empty}"), tmp_path / "o")


def test_extra_label_entries_are_reported(json_set: Path, make_cfg, tmp_path: Path, caplog):
    path = json_set.parent / "image_name_to_class_id_and_name.json"
    table = json.loads(path.read_text())
    table["ILSVRC2012_val_00099999.JPEG"] = {"class_id": 3, "class_name": "x"}
    path.write_text(json.dumps(table))
    with caplog.at_level("WARNING"):
        run(
            make_cfg(
                "experiment=smoke",
                "data=folder",
                f"data.root={json_set}",
                "targets=none",
                "attack.steps=1",
            ),
            output_dir=tmp_path,
        )
    assert "1 label entries have no image" in caplog.text


def test_run_json_records_determinism_settings(make_cfg, tmp_path: Path):
    record = run(
        make_cfg("experiment=smoke", "data.n=1", "attack.steps=1", "targets=none"),
        output_dir=tmp_path,
    )
    assert record.determinism["tf32"] is False
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_full_disk_while_recording_in_the_manifest(tmp_path: Path, monkeypatch):
    from tgr_bench import resume

    manifest = resume.Manifest(tmp_path / MANIFEST, {"x": 1})
    manifest.start()

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume.os, "fsync", fsync)
    with pytest.raises(UserError, match="No space left on device.*re-run the same command"):
        manifest.add("a", b"png bytes")


def test_a_read_only_folder_is_named_with_its_fix(tmp_path: Path, monkeypatch):
    def replace(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(UserError, match="Read-only file system. The file system is read-only"):
        atomic.atomic_write(tmp_path / "f", b"x")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_a_manifest_left_empty_by_a_failed_first_write_resumes(tmp_path: Path):
    from tgr_bench.resume import Manifest

    (tmp_path / MANIFEST).write_bytes(b"")  # created, then the disk was full
    manifest = Manifest(tmp_path / MANIFEST, {"x": 1})
    manifest.start()
    manifest.add("a", b"png a")
    assert Manifest(tmp_path / MANIFEST, {"x": 1}).done == manifest.done == {
        "a": Manifest.entries(tmp_path / MANIFEST)["a"]
    }


def test_a_line_cut_short_does_not_swallow_the_next_record(tmp_path: Path):
    """Records appended after a cut line start on a line of their own: none is lost on disk."""
    from tgr_bench.resume import Manifest

    first = Manifest(tmp_path / MANIFEST, {"x": 1})
    first.start()
    first.add_many([("a", "1" * 64), ("b", "2" * 64)])
    whole = (tmp_path / MANIFEST).read_bytes()
    (tmp_path / MANIFEST).write_bytes(whole[:-20])  # the last record cut by a kill
    resumed = Manifest(tmp_path / MANIFEST, {"x": 1})
    assert set(resumed.done) == {"a"}  # b is crafted again
    resumed.start()
    resumed.add_many([("b", "2" * 64), ("c", "3" * 64)])
    assert Manifest.entries(tmp_path / MANIFEST) == {"a": "1" * 64, "b": "2" * 64, "c": "3" * 64}
    assert (tmp_path / MANIFEST).read_bytes().startswith(whole.split(b"\n")[0])


def test_a_run_killed_after_its_last_png_resumes_with_nothing_left_to_attack(make_cfg, tmp_path):
    """Killed between the last PNG and the results: the re-run attacks nothing, and the
    hooks' fired-count check (which needs an attack to have run) does not fail the run."""
    cfg = make_cfg("experiment=smoke", "data.n=2", "attack=tgr", "attack.steps=1")
    first = run(cfg, output_dir=tmp_path)
    (tmp_path / "run.json").unlink()
    (tmp_path / RESULTS_CSV).unlink()
    again = run(cfg, output_dir=tmp_path)
    assert (again.crafting.attacked, again.crafting.resumed) == (0, 2)
    assert again.status == "complete" and (tmp_path / RESULTS_CSV).is_file()
    assert first.crafting.hooks["tgr_fired"]["attn"] > 0
