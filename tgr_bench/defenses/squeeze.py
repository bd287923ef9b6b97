"""Feature squeezing (Xu et al., NDSS 2018): colour bit-depth reduction and median smoothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tgr_bench.defenses.base import InputDefense, whole_in

SQUEEZING = (
    "Feature squeezing: Xu et al., Feature Squeezing: Detecting Adversarial Examples in Deep "
    "Neural Networks, NDSS 2018"
)


@dataclass(frozen=True)
class BitDepth(InputDefense):
    """Colour bit-depth reduction to `bits` bits per channel: x' = rint(x * (2^bits - 1)) /
    (2^bits - 1), rint rounding halves to even (numpy's rint in the released code; torch.round
    does the same). For ImageNet the paper's joint detector and its released configuration use
    5 bits (the default); on 8-bit inputs no value falls on a half, so the rounding rule never
    decides."""

    bits: int = 5

    name: ClassVar[str] = "bit_depth"
    reference: ClassVar[str] = f"{SQUEEZING} (ImageNet: 5-bit depth)"

    def __post_init__(self) -> None:
        whole_in("defense.bit_depth.bits", self.bits, 1, 8, "the bits per channel (ImageNet: 5)")

    def params(self) -> dict[str, Any]:
        return {"bit_depth_bits": self.bits}

    def apply(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        levels = 2**self.bits - 1
        return torch.round(x * levels) / levels


@dataclass(frozen=True)
class Median(InputDefense):
    """Median smoothing over a `size` x `size` window per colour channel, exactly as
    scipy.ndimage.median_filter(x, size=(1, size, size, 1), mode='reflect') in the released code:
    the window of output pixel i covers inputs i - size//2 .. i + (size-1)//2 (an even window
    reaches one pixel further up and left), borders are mirrored with the edge pixel repeated
    (d c b a | a b c d), and an even count takes the upper of the two middle values (rank
    size*size // 2 of the sorted window, no averaging). ImageNet: 2 x 2 (the default)."""

    size: int = 2

    name: ClassVar[str] = "median"
    reference: ClassVar[str] = f"{SQUEEZING} (ImageNet: 2x2 median smoothing)"

    def __post_init__(self) -> None:
        whole_in("defense.median.size", self.size, 1, 31, "the window side (ImageNet: 2)")

    def params(self) -> dict[str, Any]:
        return {"median_size": self.size}

    def apply(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        s = self.size
        before, after = s // 2, (s - 1) // 2
        rows = mirror_index(x.shape[-2], before, after, x.device)
        cols = mirror_index(x.shape[-1], before, after, x.device)
        padded = x.index_select(-2, rows).index_select(-1, cols)
        windows = padded.unfold(2, s, 1).unfold(3, s, 1)  # (B, C, H, W, s, s)
        flat = windows.reshape(*windows.shape[:4], s * s)
        return flat.kthvalue(s * s // 2 + 1, dim=-1).values


def mirror_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices of positions -before .. n+after-1 under scipy's 'reflect' mode: the signal
    mirrored about its edges, edge sample included, repeated with period 2n."""
    pos = torch.arange(-before, n + after, device=device) % (2 * n)
    return torch.where(pos < n, pos, 2 * n - 1 - pos)
