"""Standard normal noise as a pure function of (row seed, element index), built on the device.

Row r of a noise tensor is a function of its own 64-bit seed only: element e is the SplitMix64
output number e // 2 + 1 of that seed, turned into two normals by the Box-Muller transform (the
cosine one for even e, the sine one for odd e). No generator state is shared between rows or
carried between calls, so a row's noise is the same whatever rows share its tensor and however
the rows are chunked, and all rows are made in one batched computation on any device. The
integers are exact on every device; the float transform may differ in the last bit between
devices.
"""

from __future__ import annotations

import math

import torch

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it (torch has no unsigned 64-bit arithmetic)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def finalize(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function of int64 states (wrapping arithmetic)."""
    z = (z ^ _shift(z, 30)).mul_(signed(MIX1))
    z = (z ^ _shift(z, 27)).mul_(signed(MIX2))
    return z ^ _shift(z, 31)


def splitmix(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(R, count) int64: outputs 1..count of SplitMix64 from each int64 seed (read as unsigned
    64-bit patterns)."""
    steps = torch.arange(1, count + 1, dtype=torch.int64, device=seeds.device)
    return finalize(steps.mul(signed(GOLDEN)).unsqueeze(0) + seeds.unsqueeze(1))


def stream_seeds(base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Output index + 1 of each base seed's SplitMix64 stream: the seed of draw `index` of the
    owner of `base`, made on the device from (base, index) alone."""
    return finalize(base + (index + 1) * signed(GOLDEN))


def normals(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(R, count) float32 standard normals, row r from seeds[r] alone (module docstring)."""
    bits = splitmix(seeds, (count + 1) // 2)
    # Two 24-bit uniforms per output: u1 in (0, 1] (no log of 0), u2 in [0, 1).
    u1 = (_shift(bits, 40) + 1).float().mul_(2.0**-24)
    u2 = (_shift(bits, 16) & 0xFFFFFF).float().mul_(2.0**-24)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2 * math.pi) * u2
    pairs = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    return pairs.flatten(-2)[:, :count]
