"""Feature squeezing: bit depth against exact rational arithmetic, median against a slow reference
written from scipy.ndimage.median_filter's definition (mode='reflect', origin 0)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from tgr_bench.defenses import BitDepth, Median
from tgr_bench.errors import UserError


def round_half_even(q: Fraction) -> int:
    low = math.floor(q)
    rest = q - low
    if rest != Fraction(1, 2):
        return low + (rest > Fraction(1, 2))
    return low + (low % 2)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_depth_on_every_8bit_level_equals_the_exact_formula(bits):
    levels = 2**bits - 1
    x = (torch.arange(256, dtype=torch.float32) / 255).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    wanted = [round_half_even(Fraction(k * levels, 255)) for k in range(256)]
    expected = torch.tensor(wanted, dtype=torch.float32) / levels
    assert torch.equal(BitDepth(bits=bits)(x.contiguous())[0, 0, 0], expected)


def test_bit_depth_values_by_hand():
    x = torch.tensor([0.0, 0.5, 0.52, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4).contiguous()
    # 0.5 * 31 = 15.5 rounds to 16 (even), 0.52 * 31 = 16.12 to 16; with one bit 0.5 rounds to 0.
    assert torch.equal(BitDepth(bits=5)(x)[0, 0, 0], torch.tensor([0.0, 16 / 31, 16 / 31, 1.0]))
    assert torch.equal(BitDepth(bits=1)(x)[0, 0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.equal(BitDepth(bits=2)(x)[0, 0, 0], torch.tensor([0.0, 2 / 3, 2 / 3, 1.0]))


def test_eight_bits_leave_stored_pixels_as_they_are():
    x = torch.randint(0, 256, (2, 3, 5, 6)).float() / 255
    assert torch.equal(BitDepth(bits=8)(x), x)


def reflect(i: int, n: int) -> int:
    """scipy 'reflect': ... c b a | a b c ... | c b a ..., period 2n."""
    i %= 2 * n
    return i if i < n else 2 * n - 1 - i


def median_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel by pixel: the window of output i spans i - size//2 .. i - size//2 + size - 1 (the
    footprint's centre is at size // 2), and the result is the sorted window's element
    size*size // 2 (scipy's rank for 'median', the upper middle of an even count)."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    for n in range(b):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    values = sorted(
                        float(
                            x[n, ch, reflect(i - size // 2 + di, h), reflect(j - size // 2 + dj, w)]
                        )
                        for di in range(size)
                        for dj in range(size)
                    )
                    out[n, ch, i, j] = values[size * size // 2]
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_median_equals_the_scipy_reference(size):
    x = torch.randint(0, 256, (2, 3, 5, 7), generator=torch.Generator().manual_seed(size)) / 255
    assert torch.equal(Median(size=size)(x), median_reference(x, size))


def test_median_2x2_by_hand():
    # Output (i, j) is the upper median of rows i-1..i, columns j-1..j; row and column -1
    # mirror row and column 0.
    grid = torch.tensor([[1.0, 5.0, 3.0], [7.0, 2.0, 9.0], [4.0, 8.0, 6.0]]) / 10
    x = grid.expand(1, 3, 3, 3).contiguous()
    expected = torch.tensor([[1.0, 5.0, 5.0], [7.0, 5.0, 5.0], [7.0, 7.0, 8.0]]) / 10
    assert torch.equal(Median()(x)[0, 0], expected)


def test_median_windows_larger_than_the_image_mirror_periodically():
    x = torch.randint(0, 256, (1, 3, 2, 3), generator=torch.Generator().manual_seed(9)) / 255
    assert torch.equal(Median(size=6)(x), median_reference(x, 6))


@pytest.mark.parametrize(
    ("cls", "setting", "value"),
    [
        (BitDepth, "bits", 0),
        (BitDepth, "bits", 9),
        (BitDepth, "bits", 4.0),
        (Median, "size", 0),
        (Median, "size", 32),
        (Median, "size", True),
    ],
)
def test_squeezers_refuse_settings_out_of_range(cls, setting, value):
    with pytest.raises(UserError, match=rf"defense\.\w+\.{setting}={value!r}.*whole number in"):
        cls(**{setting: value})
