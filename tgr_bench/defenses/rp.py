"""Random resizing and padding, R&P (Xie et al., ICLR 2018)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tgr_bench.attacks.draws import mix, randint
from tgr_bench.defenses.base import InputDefense, in_range
from tgr_bench.errors import UserError

RP_TAG = 0x5250  # keeps R&P's draws apart from the attacks' and the other defenses' draws
RESIZE_MODES = ("nearest", "bilinear")


@dataclass(frozen=True)
class RandomResizePad(InputDefense):
    """Each S x S image resized to r x r, r uniform in [round(S * min_scale), C) with
    C = round(S * max_scale), then placed at a uniform offset (top, left), each in [0, C - r],
    on a C x C canvas filled with `fill`. The output is C x C: the target model resizes it to its
    input like any other image.

    The paper's ImageNet setting takes 299 x 299 inputs to r in [299, 331) and pads to 331 x 331
    ((331 - r + 1)^2 placements per size); the defaults keep its ratios, min_scale = 1 and
    max_scale = 331/299, which give exactly that at S = 299 and, at the stored S = 224, r in
    [224, 248) on a 248 x 248 canvas. The released code resizes with nearest neighbour (the
    default `mode`) and pads zeros in the network's [-1, 1] input, which is mid-grey 0.5 in
    [0, 1] pixels (the default `fill`); its challenge entry drew r from [310, 331) instead
    (min_scale = 310/299). Every draw is the image's own (its key)."""

    min_scale: float = 1.0
    max_scale: float = 331 / 299
    fill: float = 0.5
    mode: str = "nearest"

    name: ClassVar[str] = "rp"
    randomized: ClassVar[bool] = True
    reference: ClassVar[str] = (
        "R&P: Xie et al., Mitigating Adversarial Effects Through Randomization, ICLR 2018 "
        "(ImageNet: 299 resized to [299, 331), padded to 331)"
    )

    def __post_init__(self) -> None:
        low = in_range("defense.rp.min_scale", self.min_scale, 0.1, 4.0, "the smallest resize")
        high = in_range("defense.rp.max_scale", self.max_scale, 0.1, 4.0, "the canvas scale")
        if high <= low:
            raise UserError(
                f"defense.rp.max_scale={self.max_scale} must exceed defense.rp.min_scale="
                f"{self.min_scale} (the paper's 331/299 and 1)."
            )
        in_range("defense.rp.fill", self.fill, 0.0, 1.0, "the padding value")
        if self.mode not in RESIZE_MODES:
            raise UserError(f"defense.rp.mode={self.mode!r}: choose one of {RESIZE_MODES}.")

    def params(self) -> dict[str, Any]:
        return {
            "rp_min_scale": float(self.min_scale),
            "rp_max_scale": float(self.max_scale),
            "rp_fill": float(self.fill),
            "rp_mode": self.mode,
        }

    def sizes(self, size: int) -> tuple[int, int]:
        """(smallest resize, canvas side) for S = size; the resize is drawn below the canvas."""
        low, canvas = round(size * self.min_scale), round(size * self.max_scale)
        if canvas <= low or low < 1:
            raise UserError(
                f"defense.rp scales {self.min_scale} and {self.max_scale} leave no size to draw "
                f"for {size}-pixel images (resize [{low}, {canvas})): widen the range."
            )
        return low, canvas

    def draw(self, key: int, size: int) -> tuple[int, int, int]:
        """(r, top, left) of one image from its key."""
        low, canvas = self.sizes(size)
        r = randint(mix(key, RP_TAG, 1), low, canvas)
        top = randint(mix(key, RP_TAG, 2), 0, canvas - r + 1)
        left = randint(mix(key, RP_TAG, 3), 0, canvas - r + 1)
        return r, top, left

    def apply(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        b, c, h, w = x.shape
        if h != w:
            raise UserError(f"defense.rp needs square images; this data set stores {h}x{w}.")
        canvas = self.sizes(w)[1]
        groups: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for i, key in enumerate(keys):
            r, top, left = self.draw(key, w)
            groups[r].append((i, top, left))
        out = x.new_full((b, c, canvas, canvas), float(self.fill))
        for r, placed in groups.items():
            # The images that drew the same size are resized together.
            index = torch.tensor([i for i, _, _ in placed]).to(x.device, non_blocking=True)
            resized = self.resize(x.index_select(0, index), r)
            for (i, top, left), image in zip(placed, resized, strict=True):
                out[i, :, top : top + r, left : left + r] = image
        return out

    def resize(self, x: torch.Tensor, r: int) -> torch.Tensor:
        if self.mode == "nearest":  # source pixel floor(i * S / r), as TF1's resize_images
            return F.interpolate(x, size=(r, r), mode="nearest")
        return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
