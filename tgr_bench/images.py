"""Adversarial images to 8-bit PNGs that provably stay within eps of the clean pixels."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from PIL import Image

from tgr_bench.atomic import atomic_write


def quantize(adv: torch.Tensor, clean: torch.Tensor, eps_levels: float) -> torch.Tensor:
    """Round [0,1] pixels to the nearest 8-bit level, then project onto the eps ball.

    Rounding can step past eps (a perturbation of 16 levels plus float error rounds to 17), so
    the projection after rounding is part of the contract; the final check is not an assumption.
    """
    budget = math.floor(eps_levels + 1e-6)  # whole levels a PNG can move within eps
    levels = (adv.float() * 255.0).round()
    c = clean.to(levels.device, torch.float32)
    levels = torch.minimum(torch.maximum(levels, c - budget), c + budget).clamp(0, 255)
    out = levels.to(torch.uint8)
    worst = int((out.int() - c.int()).abs().amax()) if out.numel() else 0
    if worst > budget:
        raise AssertionError(f"quantized image exceeds eps: {worst} > {budget} levels")
    return out


def encode_png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write (3,H,W) uint8 as PNG atomically: a crash never leaves a partial file at `path`."""
    atomic_write(path, encode_png(image))
