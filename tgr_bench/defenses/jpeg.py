"""JPEG re-compression of the stored images, encoded and decoded in memory by PIL."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from tgr_bench.defenses.base import InputDefense, from_uint8, to_uint8, whole_in


@dataclass(frozen=True)
class Jpeg(InputDefense):
    """Each image rounded to the 8-bit grid, saved as a JPEG by PIL at `quality` with PIL's other
    defaults (baseline, 4:2:0 chroma subsampling, standard tables scaled by quality, no
    optimization), decoded again, and returned as k/255.

    JPEG re-compression against adversarial images was first studied by Dziugaite et al. (2016,
    arXiv:1608.00853) on ImageNet at quality 75; Guo et al. (ICLR 2018) made it a standard input
    transformation baseline, with PIL's encoder at quality 75 (the default here). The decoded
    bytes depend on the libjpeg build shipped with Pillow; every image is encoded on its own.
    """

    quality: int = 75

    name: ClassVar[str] = "jpeg"
    reference: ClassVar[str] = (
        "JPEG compression: Dziugaite et al., A study of the effect of JPG compression on "
        "adversarial images, arXiv:1608.00853, 2016 (ImageNet, quality 75); Guo et al., "
        "Countering Adversarial Images using Input Transformations, ICLR 2018 (quality 75)"
    )

    def __post_init__(self) -> None:
        whole_in("defense.jpeg.quality", self.quality, 1, 100, "a JPEG quality (the papers' 75)")

    def params(self) -> dict[str, Any]:
        return {"jpeg_quality": self.quality}

    def apply(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        pixels = to_uint8(x)
        # PIL releases the GIL while it encodes and decodes, so threads run images in parallel.
        decoded = list(_pool().map(partial(roundtrip, quality=self.quality), pixels))
        return from_uint8(np.stack(decoded), x)


def roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """One (H,W,3) uint8 image through PIL's JPEG encoder and decoder, in memory."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.array(decoded.convert("RGB"))


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="jpeg")
