"""Pixels on demand: image files are checked cheaply up front and decoded per batch, on worker
threads, ahead of the device; nothing holds a whole data set of pixels in memory.

A set of N images costs a small record per image (its path and its file's sha256); pixels exist
only for the batches in flight (the one on the device plus `prefetch` decoded ahead).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from tgr_bench.errors import UserError

# PIL decodes and zlib inflates outside the GIL: threads overlap decoding with the device.
WORKERS = max(2, min(8, os.cpu_count() or 2))
PREFETCH = 2  # batches decoded ahead of the one being used


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="decode")
    return _POOL


@dataclass(frozen=True)
class FileInfo:
    """What the up-front check learns of a file: enough to refuse it before any work."""

    size: tuple[int, int]  # (height, width)
    sha256: str


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_mode(mode: str, data: bytes, path: Path) -> None:
    """8-bit RGB only. PIL opens a 16-bit-per-channel PNG as mode RGB and keeps the high byte
    of each value, so its IHDR bit depth (byte 24) is read here."""
    sixteen = data.startswith(PNG_SIGNATURE) and len(data) > 24 and data[24] == 16
    if mode != "RGB" or sixteen:
        what = "16 bits per channel" if mode == "RGB" else f"mode {mode!r}"
        raise UserError(
            f"Image {path} has {what}; tgr-bench attacks 8-bit RGB images. Convert it (e.g. "
            f"PIL: Image.open(p).convert('RGB').save(p), or to 8 bits with your image tool)."
        )


def _not_empty(data: bytes, path: Path) -> None:
    if not data:
        raise UserError(f"Image {path} is empty (0 bytes). Replace or remove the file.")


def _decode(data: bytes, path: Path) -> torch.Tensor:
    _not_empty(data, path)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        _check_mode(im.mode, data, path)
        w, h = im.size
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return pixels.view(h, w, 3).permute(2, 0, 1).contiguous()


def read_image(path: Path) -> torch.Tensor:
    """An 8-bit RGB image as a (3,H,W) uint8 tensor; anything else is a clear error."""
    try:
        data = Path(path).read_bytes()
        return _decode(data, Path(path))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"Cannot read image {path}: {e}. Replace or remove the file.") from e


def inspect_file(path: Path) -> FileInfo:
    """Header, mode and integrity of an image file without decoding its pixels: PNG chunk
    checksums (a truncated or damaged file fails), a JPEG's end-of-image marker (a JPEG
    without it, and any other format, is decoded in full once), and the file's sha256 (what
    resumed and merged runs compare)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read image {path}: {e}. Replace or remove the file.") from e
    _not_empty(data, Path(path))
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode, (w, h), fmt = im.mode, im.size, im.format
            if mode == "RGB":
                if fmt == "PNG":
                    im.verify()
                elif fmt != "JPEG" or not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
                    im.load()
    except Exception as e:
        raise UserError(f"Cannot read image {path}: {e}. Replace or remove the file.") from e
    _check_mode(mode, data, path)
    return FileInfo((h, w), hashlib.sha256(data).hexdigest())


def inspect_files(paths: Sequence[Path]) -> list[FileInfo]:
    return list(_pool().map(inspect_file, paths))


class Pixels:
    """Decodes the images of a set by index."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, idx: Sequence[int]) -> torch.Tensor:
        """(len(idx), 3, H, W) uint8."""
        raise NotImplementedError

    def subset(self, idx: Sequence[int]) -> Pixels:
        raise NotImplementedError


class FilePixels(Pixels):
    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, idx: Sequence[int]) -> torch.Tensor:
        files = [self.paths[i] for i in idx]
        decoded = (
            [read_image(p) for p in files] if len(files) < 2 else _pool().map(read_image, files)
        )
        return torch.stack(list(decoded))

    def subset(self, idx: Sequence[int]) -> FilePixels:
        return FilePixels([self.paths[i] for i in idx])


class TensorPixels(Pixels):
    """Pixels already in memory (benchmarks, small tests)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def load(self, idx: Sequence[int]) -> torch.Tensor:
        return self.images[list(idx)]

    def subset(self, idx: Sequence[int]) -> TensorPixels:
        return TensorPixels(self.images[list(idx)])


class SyntheticPixels(Pixels):
    """Smooth random images: each image from its own 3x8x8 grid of random values, upsampled
    bicubically; the grids are kept (768 bytes per image), the pixels made on demand."""

    def __init__(self, low: torch.Tensor, size: int) -> None:
        self.low = low
        self.size = size

    def __len__(self) -> int:
        return len(self.low)

    def load(self, idx: Sequence[int]) -> torch.Tensor:
        up = F.interpolate(self.low[list(idx)], size=(self.size, self.size), mode="bicubic")
        return (up.clamp(0, 1) * 255).round().to(torch.uint8)

    def subset(self, idx: Sequence[int]) -> SyntheticPixels:
        return SyntheticPixels(self.low[list(idx)], self.size)


def batches(
    pixels: Pixels, idx: Sequence[int], batch_size: int, prefetch: int = PREFETCH
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, uint8 pixels) for consecutive chunks of `idx`, decoded `prefetch` chunks ahead
    on a background thread, so the caller's device work and the decoding overlap."""
    chunks = [list(idx[s : s + batch_size]) for s in range(0, len(idx), batch_size)]
    if not chunks:
        return
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    try:
        pending: list[Future[torch.Tensor]] = [
            ahead.submit(pixels.load, c) for c in chunks[: prefetch + 1]
        ]
        for i, chunk in enumerate(chunks):
            images = pending.pop(0).result()
            if i + prefetch + 1 < len(chunks):
                pending.append(ahead.submit(pixels.load, chunks[i + prefetch + 1]))
            yield chunk, images
    finally:
        # A caller that stops early (an error, Ctrl-C) does not wait for decodes it won't use.
        ahead.shutdown(wait=True, cancel_futures=True)
