"""What every defense shares: its settings, its citation, and the per-image keys of the randomized
ones.

An input defense acts on the stored 8-bit images, before the target model's own resize and
normalization: `defense(x, keys)` takes (B,3,H,W) float pixels in [0,1] and returns pixels in
[0,1] (R&P returns a larger canvas, which the target model resizes like any other input). A
randomized defense draws everything from each image's own integer key (the image's seed, from the
run seed and its file name: `tgr_bench.crafting.image_seeds`), never from a generator shared by
the batch, so an image's result does not depend on which other images share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from tgr_bench.errors import UserError, number


class Defense:
    """A defense's name, its citation with the ImageNet settings, and its settings."""

    name: ClassVar[str]
    reference: ClassVar[str]
    randomized: ClassVar[bool] = False
    # Settings that never enter a column's name: a weight file (recorded by its hash), a speed.
    unlabelled: ClassVar[tuple[str, ...]] = ("weights",)

    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def label(self) -> str:
        """The name, with the settings that differ from the paper's in brackets
        (`jpeg[quality=50]`): results under other settings never share a column."""
        from tgr_bench.defenses.settings import defense_defaults

        default = defense_defaults()[self.name]
        changed = [
            f"{k}={getattr(self, k)}"
            for k, v in default.items()
            if k not in self.unlabelled and getattr(self, k) != v
        ]
        return self.name + (f"[{','.join(changed)}]" if changed else "")


class InputDefense(Defense):
    """A transform of the stored pixels: `defense(x, keys=None) -> Tensor`, without gradient."""

    def __call__(self, x: torch.Tensor, keys: Sequence[int] | None = None) -> torch.Tensor:
        check_images(x)
        drawn = need_keys(self.name, keys, len(x)) if self.randomized else []
        with torch.no_grad():
            return self.apply(x, drawn)

    def apply(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        raise NotImplementedError


def check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(
            f"a defense takes float RGB images (B,3,H,W) in [0,1]; got {tuple(x.shape)} {x.dtype}."
        )


def need_keys(name: str, keys: Sequence[int] | None, n: int) -> list[int]:
    """One integer key per image: a randomized defense never falls back to a shared generator."""
    if keys is None:
        raise ValueError(
            f"the {name} defense is randomized: pass one integer key per image "
            f"(tgr_bench.crafting.image_seeds), so that each image's draw is its own."
        )
    drawn = [int(k) for k in keys]
    if len(drawn) != n:
        raise ValueError(f"the {name} defense got {len(drawn)} keys for {n} images.")
    return drawn


def in_range(setting: str, value: object, low: float, high: float, what: str) -> float:
    """`value` as a float in [low, high], or a one-line error naming the setting and the range."""
    v = number(setting, value)
    if not low <= v <= high:
        raise UserError(f"{setting}={value!r}: choose {what} in [{low:g}, {high:g}].")
    return v


def whole_in(setting: str, value: object, low: int, high: int, what: str) -> int:
    """`value` as a whole number in [low, high], or a one-line error naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{setting}={value!r}: choose {what}, a whole number in [{low}, {high}].")
    return value


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B,H,W,3) uint8 pixels on the host: the 8-bit grid the images were stored on."""
    levels = (x.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8)
    return levels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8(pixels: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) pixels k/255 on like's device and dtype, as the evaluation decodes PNGs."""
    out = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return out.to(like.device, non_blocking=True).to(like.dtype).div_(255.0)
