"""The Haar transform and the BayesShrink denoiser of pixel deflection: hand values, a separable
reference written from PyWavelets' conventions, and the denoiser's properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tgr_bench.defenses.wavelet import (
    bayes_shrink,
    bayes_threshold,
    denoise_ycbcr,
    haar_forward,
    haar_inverse,
    haar_levels,
)

R2 = math.sqrt(2.0)


def dwt1(x: list[float]) -> tuple[list[float], list[float]]:
    """PyWavelets' 'db1' on a list in 'symmetric' mode: an odd list repeats its last sample;
    pairs (x0, x1), (x2, x3), ... give (x0 + x1)/sqrt2 and (x0 - x1)/sqrt2 (the sign of a detail
    does not matter to a soft threshold)."""
    if len(x) % 2:
        x = [*x, x[-1]]
    pairs = list(zip(x[::2], x[1::2], strict=True))
    return [(a + b) / R2 for a, b in pairs], [(a - b) / R2 for a, b in pairs]


def idwt1(a: list[float], d: list[float]) -> list[float]:
    out = []
    for s, t in zip(a, d, strict=True):
        out += [(s + t) / R2, (s - t) / R2]
    return out


def transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(column) for column in zip(*m, strict=True)]


def dwt2(x: list[list[float]]):
    """Along rows, then along columns: the approximation and the three details."""
    rows = [dwt1(row) for row in x]
    lo, hi = [r[0] for r in rows], [r[1] for r in rows]

    def down_columns(m):
        columns = [dwt1(c) for c in transpose(m)]
        return transpose([c[0] for c in columns]), transpose([c[1] for c in columns])

    ll, lh = down_columns(lo)
    hl, hh = down_columns(hi)
    return ll, (hl, lh, hh)


def idwt2(ll, details, shape):
    hl, lh, hh = details

    def up_columns(a, d):
        return transpose([idwt1(p, q) for p, q in zip(transpose(a), transpose(d), strict=True)])

    lo, hi = up_columns(ll, lh), up_columns(hl, hh)
    full = [idwt1(p, q) for p, q in zip(lo, hi, strict=True)]
    return [row[: shape[1]] for row in full[: shape[0]]]


def shrink_reference(x: list[list[float]], sigma: float, levels: int) -> list[list[float]]:
    var = sigma**2
    eps = 2.0**-52
    stack, approx = [], x
    for _ in range(levels):
        shape = (len(approx), len(approx[0]))
        approx, details = dwt2(approx)
        kept = []
        for band in details:
            flat = [v for row in band for v in row]
            t = var / math.sqrt(max(sum(v * v for v in flat) / len(flat) - var, eps))
            kept.append([[math.copysign(max(abs(v) - t, 0.0), v) for v in row] for row in band])
        stack.append((shape, kept))
    for shape, kept in reversed(stack):
        approx = idwt2(approx, kept, shape)
    return approx


def test_haar_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    approx, (h, v, d) = haar_forward(x)
    assert approx.item() == 5.0 and h.item() == -1.0 and v.item() == -2.0 and d.item() == 0.0


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (5, 4), (13, 6)])
def test_haar_inverts_exactly_and_keeps_energy_on_even_sides(shape):
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    approx, details = haar_forward(x)
    assert torch.allclose(haar_inverse(approx, details, shape), x, atol=1e-12)
    if shape[0] % 2 == 0 and shape[1] % 2 == 0:
        energy = approx.square().sum() + sum(d.square().sum() for d in details)
        assert torch.allclose(energy, x.square().sum())


def test_levels_are_scikit_images_default():
    assert haar_levels(224, 224) == 4  # PyWavelets' maximum for 224 is 7
    assert haar_levels(299, 299) == 5
    assert haar_levels(16, 40) == 1 and haar_levels(4, 4) == 1


def test_bayes_threshold_by_hand():
    band = torch.tensor([[3.0, -1.0], [1.0, -3.0]], dtype=torch.float64)  # mean square 5
    assert bayes_threshold(band, 1.0).item() == pytest.approx(1 / 2)
    assert bayes_threshold(band, 9.0).item() == pytest.approx(9 / math.sqrt(2.0**-52))


@pytest.mark.parametrize(("shape", "levels"), [((16, 16), 2), ((11, 14), 3), ((9, 9), 1)])
def test_bayes_shrink_equals_the_separable_reference(shape, levels):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.tensor(shrink_reference(x.tolist(), 0.1, levels), dtype=torch.float64)
    assert torch.allclose(bayes_shrink(x, 0.1, levels), expected, atol=1e-12)


def test_bayes_shrink_keeps_what_has_no_detail_and_never_adds_energy():
    blocks = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flat_on_the_grid = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)  # 32 x 32
    assert torch.allclose(bayes_shrink(flat_on_the_grid, 0.1, 4), flat_on_the_grid, atol=1e-12)
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = bayes_shrink(x, 0.1, 4)
    assert (out.square().sum((1, 2)) < x.square().sum((1, 2))).all()


def smooth_image(size: int = 32, seed: int = 0) -> torch.Tensor:
    low = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(size, size), mode="bilinear") * 0.8 + 0.1


def test_denoiser_leaves_a_constant_image_as_it_is():
    x = torch.full((2, 3, 24, 24), 0.3)
    x[1, 1] = 0.7
    assert torch.allclose(denoise_ycbcr(x, 0.04), x, atol=1e-6)


def test_denoiser_removes_noise_from_a_smooth_image():
    clean = smooth_image(64)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    noisy = (clean + 0.05 * noise).clamp(0, 1)
    out = denoise_ycbcr(noisy, 0.04)
    assert out.shape == noisy.shape and out.dtype == noisy.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - clean).square().mean() < 0.5 * (noisy - clean).square().mean()
