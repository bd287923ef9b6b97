"""Wavelet denoising with BayesShrink soft thresholding in YCbCr, written in torch.

It computes what pixel deflection's released code computes with scikit-image 0.14's
`denoise_wavelet(img, sigma=0.04, mode='soft', multichannel=True, convert2ycbcr=True,
method='BayesShrink')` (wavelet 'db1', that is Haar; PyWavelets' 'symmetric' border mode):

1. RGB to YCbCr (ITU-R BT.601, Y in [16, 235]); each YCbCr channel of each image is rescaled to
   [0, 1] by its own minimum and maximum (a channel without range is left as it is);
2. on each rescaled channel, L levels of the orthonormal 2-D Haar transform, L = max(floor(log2
   min(H, W)) - 3, 1) (4 for 224 x 224); an odd side repeats its last row or column first;
3. each detail sub-band d of each level is soft-thresholded, sign(d) max(|d| - t, 0), at its
   BayesShrink threshold t = sigma^2 / sqrt(max(mean(d^2) - sigma^2, eps)), eps the float64
   machine epsilon; sigma is the noise level in the rescaled channel (scikit-image 0.14 applies
   the user's sigma there; later releases rescale it first);
4. the inverse transform, clipped to [0, 1] (scikit-image clips each rescaled channel), the
   channel's range restored, YCbCr back to RGB, and the result clipped to [0, 1].

Everything runs in float64, batched over images and channels.
"""

from __future__ import annotations

import torch

# scikit-image's rgb2ycbcr matrix for [0, 1] RGB; its offsets (16, 128, 128) cancel in the
# per-channel rescaling, so they are left out.
YCBCR_FROM_RGB = (
    (65.481, 128.553, 24.966),
    (-37.797, -74.203, 112.0),
    (112.0, -93.786, -18.214),
)


def haar_levels(height: int, width: int) -> int:
    """scikit-image's default depth: PyWavelets' maximum level for 'db1' less 3, at least 1."""
    deepest = min(height, width).bit_length() - 1  # floor(log2(side))
    return max(deepest - 3, 1)


def haar_forward(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One level of the orthonormal 2-D Haar transform of (..., H, W): the approximation and the
    three detail sub-bands, each (..., ceil(H/2), ceil(W/2))."""
    if x.shape[-2] % 2:  # PyWavelets' symmetric extension: the last row again
        x = torch.cat([x, x[..., -1:, :]], dim=-2)
    if x.shape[-1] % 2:
        x = torch.cat([x, x[..., -1:]], dim=-1)
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    approx = (a + b + c + d) / 2
    details = ((a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2)
    return approx, details


def haar_inverse(
    approx: torch.Tensor, details: tuple[torch.Tensor, ...], size: tuple[int, int]
) -> torch.Tensor:
    """The inverse of haar_forward, cropped to the (H, W) it was taken from."""
    h, v, dd = details
    a = (approx + h + v + dd) / 2
    b = (approx - h + v - dd) / 2
    c = (approx + h - v - dd) / 2
    d = (approx - h - v + dd) / 2
    top = torch.stack([a, b], dim=-1).flatten(-2)  # even rows: a b a b ...
    bottom = torch.stack([c, d], dim=-1).flatten(-2)
    out = torch.stack([top, bottom], dim=-2).flatten(-3, -2)
    return out[..., : size[0], : size[1]]


def bayes_threshold(band: torch.Tensor, var: float) -> torch.Tensor:
    """BayesShrink's threshold of each (..., h, w) sub-band, for zero-mean details."""
    signal = band.square().mean(dim=(-2, -1), keepdim=True) - var
    eps = torch.finfo(band.dtype).eps
    return var / signal.clamp(min=eps).sqrt()


def soft(band: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return band.sign() * (band.abs() - threshold).clamp(min=0)


def bayes_shrink(x: torch.Tensor, sigma: float, levels: int) -> torch.Tensor:
    """Haar wavelet denoising of (..., H, W) channels: every detail sub-band soft-thresholded at
    its own BayesShrink threshold, the approximation kept."""
    var = float(sigma) ** 2
    sizes, kept = [], []
    approx = x
    for _ in range(levels):
        sizes.append((approx.shape[-2], approx.shape[-1]))
        approx, details = haar_forward(approx)
        kept.append(tuple(soft(d, bayes_threshold(d, var)) for d in details))
    for size, details in zip(reversed(sizes), reversed(kept), strict=True):
        approx = haar_inverse(approx, details, size)
    return approx


def denoise_ycbcr(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] denoised as the module docstring says; returned in x's dtype."""
    matrix = torch.tensor(YCBCR_FROM_RGB, dtype=torch.float64, device=x.device)
    ycc = torch.einsum("ij,bjhw->bihw", matrix, x.double())
    low = ycc.amin(dim=(-2, -1), keepdim=True)
    span = ycc.amax(dim=(-2, -1), keepdim=True) - low
    flat = span > 0
    unit = (ycc - low) / torch.where(flat, span, torch.ones_like(span))
    shrunk = bayes_shrink(unit, sigma, haar_levels(*x.shape[-2:])).clamp(0, 1)
    ycc = torch.where(flat, shrunk * span + low, ycc)
    rgb = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(matrix), ycc)
    return rgb.clamp(0, 1).to(x.dtype)
