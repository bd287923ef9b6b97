"""Adversarial images to 8-bit PNGs that provably stay within eps of the clean pixels: the
rounding and projection, the PNG encoding, and the L-inf checks, on the tensors a run saves and
on the files read back."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image

from tgr_bench.atomic import atomic_write
from tgr_bench.pixels import Pixels, batches
from tgr_bench.record import CraftStats


def linf_levels(a: torch.Tensor, b: torch.Tensor) -> int:
    """max |a - b| of two uint8 tensors, in levels (no widening copies, no overflow)."""
    if not a.numel():
        return 0
    return int(torch.maximum(a, b).sub_(torch.minimum(a, b)).amax())


def quantize_with_linf(
    adv: torch.Tensor, clean: torch.Tensor, eps_levels: float
) -> tuple[torch.Tensor, int]:
    """Round [0,1] pixels to the nearest 8-bit level, then project onto the eps ball (and onto
    0..255); returns the uint8 pixels and their largest distance to the clean ones.

    Rounding can step past eps (a perturbation of 16 levels plus float error rounds to 17), so
    the projection after rounding is part of the contract; the final check is not an assumption.
    """
    budget = math.floor(eps_levels + 1e-6)  # whole levels a PNG can move within eps
    levels = adv.float().mul(255.0).round_()
    c = clean.to(levels.device, torch.float32)
    # One clamp to [max(c - budget, 0), min(c + budget, 255)]: the eps ball, then 0..255.
    low, high = c.sub(budget).clamp_(min=0), c.add_(budget).clamp_(max=255)
    out = levels.clamp_(low, high).to(torch.uint8)
    worst = linf_levels(out, clean.to(out.device))
    if worst > budget:
        raise AssertionError(f"quantized image exceeds eps: {worst} > {budget} levels")
    return out, worst


def quantize(adv: torch.Tensor, clean: torch.Tensor, eps_levels: float) -> torch.Tensor:
    return quantize_with_linf(adv, clean, eps_levels)[0]


# zlib level of the saved PNGs (lossless at every level). Measured on 224x224 adversarial images
# (docs/benchmarks.md): levels 1-9 all give about 107-112 KiB, and level 6 (PIL's default)
# costs about 6-8 ms per image against 5 ms at level 1; 6 is the level every saved set and its
# manifest hashes use, so sets made anywhere compare byte for byte. Recorded in run.json.
PNG_COMPRESS_LEVEL = 6


def encode_png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    array = image.permute(1, 2, 0).contiguous().cpu().numpy()
    Image.fromarray(array).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write (3,H,W) uint8 as PNG atomically: a crash never leaves a partial file at `path`."""
    atomic_write(path, encode_png(image))


def linf_levels_max(clean: Pixels, saved: list[Pixels], batch_size: int = 64) -> int:
    """The largest |adversarial - clean| over every pixel of every set, read back from the
    files: the saved PNGs, not what the attack meant to save, are checked against eps."""
    worst = 0
    everything = range(len(clean))
    for pixels in saved:
        pairs = zip(
            batches(clean, everything, batch_size),
            batches(pixels, everything, batch_size),
            strict=True,
        )
        for (_, a), (_, b) in pairs:
            worst = max(worst, linf_levels(b, a))
    return worst


def check_saved(stats: CraftStats, clean: Pixels, saved: list[Pixels], crafted_here: bool) -> None:
    """Record the L-inf distance of images this process did not quantize itself (resumed ones,
    or folders given to evaluate): they are read back and measured."""
    if not crafted_here or stats.resumed:
        stats.linf_levels_max = max(stats.linf_levels_max or 0, linf_levels_max(clean, saved))
