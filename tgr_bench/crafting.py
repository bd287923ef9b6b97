"""Crafting: batches attacked on the device while worker threads encode and save the PNGs."""

from __future__ import annotations

import logging
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from rich.progress import Progress

from tgr_bench.atomic import atomic_write
from tgr_bench.attacks import Attack
from tgr_bench.data import ImageSet
from tgr_bench.errors import UserError
from tgr_bench.images import encode_png, quantize
from tgr_bench.models import LoadedModel
from tgr_bench.record import CraftStats
from tgr_bench.resume import Manifest

log = logging.getLogger(__name__)


def image_seeds(stems: list[str], seed: int) -> list[int]:
    """One seed per image from its name and the run seed: random draws of an image never depend
    on which other images share its batch."""
    return [zlib.crc32(s.encode()) ^ (seed & 0xFFFFFFFF) for s in stems]


class PngWriter:
    """Encode and atomically write PNGs on worker threads, then add them to the manifest: the
    device never waits for zlib or the disk. The first error is raised on the next call."""

    def __init__(self, images_dir: Path, manifest: Manifest, workers: int = 2) -> None:
        self.images_dir = images_dir
        self.manifest = manifest
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self.lock = threading.Lock()
        self.pending: list[Future[None]] = []

    def _write(self, stem: str, image: torch.Tensor) -> None:
        png = encode_png(image)
        atomic_write(self.images_dir / f"{stem}.png", png)
        with self.lock:  # a manifest line only after its PNG is in place
            self.manifest.add(stem, png)

    def submit(self, stem: str, image: torch.Tensor) -> None:
        self.raise_errors()
        self.pending.append(self.pool.submit(self._write, stem, image))

    def raise_errors(self) -> None:
        still = []
        for f in self.pending:
            if f.done():
                f.result()  # re-raises the worker's exception here
            else:
                still.append(f)
        self.pending = still

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def craft(
    *,
    attack: Attack,
    source: LoadedModel,
    data: ImageSet,
    manifest: Manifest,
    images_dir: Path,
    batch_size: int,
    device: torch.device,
    seed: int,
    progress: Progress,
) -> CraftStats:
    """Attack every image not yet saved and verified, writing `<stem>.png` into images_dir.

    Call inside `attack.source_context(source.model)`. A batch that runs out of GPU memory is
    retried at half the size (results do not depend on the batch). Each PNG is renamed into
    place before its manifest line is written: a kill at any moment loses at most the images
    in flight.
    """
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob(".*.tmp"):  # a killed run's unfinished writes (we hold the lock)
        stale.unlink()
    manifest.start()
    done = manifest.verified(images_dir, data.stems)
    todo = [i for i, stem in enumerate(data.stems) if stem not in done]
    if done:
        log.info("Resuming: %d of %d images already saved and verified", len(done), len(data))
    seeds = image_seeds(data.stems, seed)
    task = progress.add_task(
        f"crafting {attack.label} on {source.spec.key}", total=len(data), completed=len(done)
    )
    writer = PngWriter(images_dir, manifest)
    pin = device.type == "cuda"
    try:
        start = 0
        while start < len(todo):
            idx = todo[start : start + batch_size]
            clean_cpu = data.images[idx]
            clean = (clean_cpu.pin_memory() if pin else clean_cpu).to(device, non_blocking=True)
            try:
                adv = attack.perturb(
                    source.model,
                    clean.float() / 255.0,
                    data.labels[idx].to(device),
                    [seeds[i] for i in idx],
                )
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise UserError(
                        f"{source.spec.key} with {attack.label} does not fit in GPU memory even "
                        f"at batch size 1; free the GPU or use a smaller source."
                    ) from None
                batch_size = max(1, batch_size // 2)
                torch.cuda.empty_cache()
                log.warning("Out of GPU memory: crafting batch size lowered to %d", batch_size)
                continue
            for i, img in zip(idx, quantize(adv, clean, attack.eps_levels).cpu(), strict=True):
                writer.submit(data.stems[i], img)
            progress.advance(task, len(idx))
            start += len(idx)
    finally:
        writer.close()
    return CraftStats(attacked=len(todo), resumed=len(done), batch_size=batch_size)
