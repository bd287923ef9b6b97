"""Crafting: batches attacked on the device while worker threads encode and save the PNGs."""

from __future__ import annotations

import hashlib
import logging
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from rich.progress import Progress

from tgr_bench.atomic import atomic_write
from tgr_bench.attacks import MIFGSM
from tgr_bench.data import ImageSet
from tgr_bench.errors import UserError
from tgr_bench.images import PNG_COMPRESS_LEVEL, encode_png, quantize_with_linf
from tgr_bench.models import LoadedModel
from tgr_bench.pixels import WORKERS as WRITERS
from tgr_bench.pixels import batches
from tgr_bench.record import CraftStats
from tgr_bench.resume import Manifest

log = logging.getLogger(__name__)


def image_seeds(stems: list[str], seed: int) -> list[int]:
    """One seed per image from its name and the run seed: random draws of an image never depend
    on which other images share its batch."""
    return [zlib.crc32(s.encode()) ^ (seed & 0xFFFFFFFF) for s in stems]


class PngWriter:
    """Encode and write PNGs on worker threads, off the device's critical path, then record them
    in the manifest. At most `max_pending` images wait (backpressure: a slow disk slows the
    attack down instead of filling memory). Manifest lines are appended in groups, each only
    after its PNGs are renamed into place; a kill loses at most the unrecorded ones, which the
    re-run crafts again. The first error is raised on the next call."""

    def __init__(
        self,
        images_dir: Path,
        manifest: Manifest,
        workers: int = WRITERS,
        max_pending: int = 64,
        record_every: int = 16,
    ) -> None:
        self.images_dir = images_dir
        self.manifest = manifest
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_pending)
        self.record_every = record_every
        self.pending: list[Future[None]] = []
        self.inflight = 0  # submitted, not yet saved
        self.written: list[tuple[str, str]] = []  # (stem, sha256) saved, not yet recorded

    def _write(self, stem: str, image: torch.Tensor) -> None:
        saved = False
        try:
            png = encode_png(image)
            # No fsync: resume re-checks every PNG against its manifest hash, so a file lost
            # to a crash is crafted again; the rename keeps a partial file from ever showing.
            atomic_write(self.images_dir / f"{stem}.png", png, durable=False)
            sha = hashlib.sha256(png).hexdigest()
            with self.lock:
                # Leaving and testing in one critical section: two writers finishing together
                # must not each see the other still in flight and both skip the record.
                self.inflight -= 1
                saved = True
                self.written.append((stem, sha))
                # A group, or everything saved so far when nothing else is being written.
                if len(self.written) >= self.record_every or self.inflight == 0:
                    self._record()
        finally:
            if not saved:
                with self.lock:
                    self.inflight -= 1
            self.slots.release()

    def _record(self) -> None:
        self.manifest.add_many(self.written)
        self.written = []

    def submit(self, stem: str, image: torch.Tensor) -> None:
        self.raise_errors()
        self.slots.acquire()
        with self.lock:
            self.inflight += 1
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
            with self.lock:
                if self.written:
                    self._record()


def _todo(manifest: Manifest, images_dir: Path, data: ImageSet, stats: CraftStats) -> list[int]:
    """The images not yet saved and verified; says what resumes and what was edited."""
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob(".*.tmp"):  # a killed run's unfinished writes (we hold the lock)
        stale.unlink()
    manifest.start()
    done = manifest.verified(images_dir, data.stems)
    if done:
        log.info("Resuming: %d of %d images already saved and verified", len(done), len(data))
    changed = sorted(set(manifest.done) & set(data.stems) - done)
    if changed:
        log.warning(
            "%d saved images no longer match their recorded hash (edited or damaged, e.g. "
            "%s.png): crafting them again",
            len(changed),
            changed[0],
        )
    stats.resumed, stats.attacked = len(done), 0
    stats.png_compress_level = PNG_COMPRESS_LEVEL
    return [i for i, stem in enumerate(data.stems) if stem not in done]


def _attack(
    attack: MIFGSM,
    source: LoadedModel,
    data: ImageSet,
    idx: list[int],
    clean: torch.Tensor,
    seeds: list[int],
) -> tuple[torch.Tensor, int]:
    """The quantized adversarial pixels of the images `idx` (clean: their uint8 pixels on the
    device) and their largest distance to the clean ones, in levels."""
    device = clean.device
    # A targeted attack descends toward its aims; Admix needs each image's place in the whole
    # data set to draw its partners among the others.
    aim = data.aims if attack.targeted else data.labels
    ids = [data.pool_index[i] for i in idx] if data.pool_index else None
    adv = attack.perturb(
        source.model,
        clean.float() / 255.0,
        aim[idx].to(device, non_blocking=True),
        [seeds[i] for i in idx],
        ids=ids,
    )
    return quantize_with_linf(adv, clean, attack.eps_levels)


def _halved(batch_size: int, what: str) -> int:
    """The crafting batch after an out-of-memory error (which changes no image's result)."""
    if batch_size == 1:
        raise UserError(
            f"{what} does not fit in GPU memory even at batch size 1; free the GPU or use a "
            f"smaller source."
        ) from None
    torch.cuda.empty_cache()
    log.warning("Out of GPU memory: crafting batch size lowered to %d", batch_size // 2)
    return max(1, batch_size // 2)


def craft(
    *,
    attack: MIFGSM,
    source: LoadedModel,
    data: ImageSet,
    manifest: Manifest,
    images_dir: Path,
    batch_size: int,
    device: torch.device,
    seed: int,
    progress: Progress,
    stats: CraftStats,
) -> None:
    """Attack every image not yet saved and verified, writing `<stem>.png` into images_dir;
    `stats` counts as it goes (an interrupted run's record says what it did).

    Call inside `attack.source_context(source.model)`. Clean batches are decoded ahead on
    worker threads; a batch that runs out of GPU memory is retried in halves (results do not
    depend on the batch). Each PNG is renamed into place before its manifest line is written:
    a kill at any moment loses at most the images in flight.
    """
    todo = _todo(manifest, images_dir, data, stats)
    seeds = image_seeds(data.stems, seed)
    label = f"crafting {attack.label} on {source.spec.key}"
    task = progress.add_task(label, total=len(data), completed=stats.resumed)
    writer = PngWriter(images_dir, manifest, max_pending=max(64, 2 * batch_size))
    pin = device.type == "cuda"
    stats.batch_size = batch_size
    try:
        for chunk, decoded in batches(data.pixels, todo, batch_size):
            start = 0
            while start < len(chunk):  # the chunk in pieces of batch_size (halved on OOM)
                idx = chunk[start : start + batch_size]
                clean_cpu = decoded[start : start + len(idx)]
                clean = (clean_cpu.pin_memory() if pin else clean_cpu).to(device, non_blocking=True)
                try:
                    saved, linf = _attack(attack, source, data, idx, clean, seeds)
                except torch.cuda.OutOfMemoryError:
                    stats.batch_size = batch_size = _halved(
                        batch_size, f"{source.spec.key} with {attack.label}"
                    )
                    continue
                stats.linf_levels_max = max(stats.linf_levels_max or 0, linf)
                for i, img in zip(idx, saved.cpu(), strict=True):
                    writer.submit(data.stems[i], img)
                progress.advance(task, len(idx))
                start += len(idx)
                stats.attacked += len(idx)
    finally:
        writer.close()
