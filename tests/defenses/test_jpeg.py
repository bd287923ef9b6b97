"""JPEG: the defense's output equals PIL's own round trip of the same 8-bit pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tgr_bench.defenses import Jpeg
from tgr_bench.errors import UserError


def images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def pil_roundtrip(pixels: torch.Tensor, quality: int) -> torch.Tensor:
    """The reference: PIL directly, one image at a time, on the same uint8 bytes."""
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buffer.getvalue())))))
    return torch.stack(out).permute(0, 3, 1, 2)


@pytest.mark.parametrize("quality", [75, 20, 95])
def test_jpeg_equals_pil_on_the_same_bytes(quality):
    pixels = images(3)
    out = Jpeg(quality=quality)(pixels.float() / 255)
    assert torch.equal((out * 255).round().to(torch.uint8), pil_roundtrip(pixels, quality))
    assert torch.equal(out, (out * 255).round() / 255)  # on the 8-bit grid, as k / 255


def test_jpeg_changes_the_image_and_quality_matters():
    x = images(2).float() / 255
    q75, q20 = Jpeg()(x), Jpeg(quality=20)(x)
    assert not torch.equal(q75, x)
    assert (q20 - x).abs().mean() > (q75 - x).abs().mean()


def test_jpeg_is_deterministic_and_per_image():
    x = images(3, seed=1).float() / 255
    together = Jpeg()(x, keys=[5, 6, 7])
    alone = torch.cat([Jpeg()(x[i : i + 1]) for i in range(3)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("quality", [0, 101, 75.0, True, "75"])
def test_jpeg_refuses_a_quality_outside_1_to_100(quality):
    with pytest.raises(UserError, match=r"defense\.jpeg\.quality.*\[1, 100\]"):
        Jpeg(quality=quality)
