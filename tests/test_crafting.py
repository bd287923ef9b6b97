"""Crafting streams: batches decoded ahead, PNGs written with backpressure, and what is saved is
exactly what one in-memory pass of the attack over every image gives."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import torch

from tgr_bench import crafting
from tgr_bench.attacks import build_attack
from tgr_bench.catalogue import model_spec
from tgr_bench.data import load_folder, read_image
from tgr_bench.images import quantize
from tgr_bench.models import WeightFile, build_model
from tgr_bench.pipeline import run
from tgr_bench.record import IMAGES_DIR, MANIFEST, RunRecord
from tgr_bench.resume import Manifest


def test_streamed_run_equals_one_in_memory_batch(make_cfg, tmp_path: Path, csv_set: Path):
    """The pipeline (decode ahead, batches of 2, writer threads) against the attack applied once
    to all five images held in memory: the same PNG pixels, a manifest naming every file by
    its hash, and the eps check recorded."""
    out = tmp_path / "run"
    cfg = make_cfg(
        "experiment=smoke",
        "source=test_vit",
        "attack.eps=16",
        "data=folder",
        f"data.root={csv_set}",
        "attack.steps=3",
        "batch_size=2",
        "targets=none",
    )
    record = run(cfg, output_dir=out)

    data = load_folder(csv_set)
    clean = torch.stack([read_image(csv_set / f"{s}.png") for s in data.stems])
    model = build_model(model_spec("test_vit"), WeightFile("random"), "cpu", seed=0).model
    attack = build_attack({"name": "mi", "steps": 3})
    seeds = crafting.image_seeds(data.stems, 0)
    adv = attack.perturb(model, clean.float() / 255, data.labels, seeds)
    expected = quantize(adv, clean, attack.eps_levels)

    saved = torch.stack([read_image(out / IMAGES_DIR / f"{s}.png") for s in data.stems])
    assert torch.equal(saved, expected)
    entries = Manifest.entries(out / MANIFEST)
    assert sorted(entries) == data.stems
    for stem, digest in entries.items():
        assert hashlib.sha256((out / IMAGES_DIR / f"{stem}.png").read_bytes()).hexdigest() == digest
    header = json.loads((out / MANIFEST).read_text().splitlines()[0])
    assert header["identity"]["data_sha256"] == data.digest
    assert record.crafting.linf_levels_max == int((saved.int() - clean.int()).abs().max())
    assert RunRecord.load(out).crafting.png_compress_level == 6


def test_png_writer_holds_at_most_max_pending_images(tmp_path: Path, monkeypatch):
    """A slow disk slows the producer down instead of piling images up in memory."""
    live, peak, lock = [0], [0], threading.Lock()
    real = crafting.encode_png

    def slow_encode(image):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.02)
        with lock:
            live[0] -= 1
        return real(image)

    monkeypatch.setattr(crafting, "encode_png", slow_encode)
    manifest = Manifest(tmp_path / MANIFEST, {"x": 1})
    manifest.start()
    writer = crafting.PngWriter(tmp_path, manifest, workers=8, max_pending=3, record_every=2)
    waited = []
    for i in range(12):
        t0 = time.perf_counter()
        writer.submit(f"im{i:02d}", torch.full((3, 8, 8), i, dtype=torch.uint8))
        waited.append(time.perf_counter() - t0)
    writer.close()
    assert peak[0] <= 3  # never more than max_pending images in the writer at once
    assert max(waited) > 0.01  # the producer was held back
    assert sorted(Manifest.entries(tmp_path / MANIFEST)) == [f"im{i:02d}" for i in range(12)]
    assert torch.equal(
        read_image(tmp_path / "im07.png"), torch.full((3, 8, 8), 7, dtype=torch.uint8)
    )


class YieldingLock:
    """A lock that lets another thread run right after each release (what a thread switch at
    that moment does): it exposes decisions taken across two critical sections."""

    def __init__(self) -> None:
        self.inner = threading.Lock()

    def __enter__(self) -> None:
        self.inner.acquire()

    def __exit__(self, *exc: object) -> None:
        self.inner.release()
        time.sleep(0.002)


def test_writers_finishing_together_still_record_what_they_saved(tmp_path: Path):
    """Two PNGs saved at the same moment, nothing else in flight: both are in the manifest
    as soon as the writers are idle, not only when the next group or close() comes."""
    for trial in range(10):
        d = tmp_path / str(trial)
        d.mkdir()
        manifest = Manifest(d / MANIFEST, {"x": 1})
        manifest.start()
        writer = crafting.PngWriter(d, manifest, workers=2, record_every=16)
        writer.lock = YieldingLock()
        for i in range(2):
            writer.submit(f"im{i}", torch.full((3, 8, 8), i, dtype=torch.uint8))
        deadline = time.monotonic() + 10
        while writer.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        with writer.lock:  # the last writer's critical section is over
            assert writer.inflight == 0
        assert set(Manifest.entries(d / MANIFEST)) == {"im0", "im1"}
        writer.close()
