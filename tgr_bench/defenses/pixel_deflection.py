"""Pixel deflection (Prakash et al., CVPR 2018): local pixel swaps, then wavelet denoising."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from tgr_bench.attacks.draws import mix, randint, uniform
from tgr_bench.defenses.base import InputDefense, in_range, whole_in
from tgr_bench.defenses.wavelet import denoise_ycbcr
from tgr_bench.errors import UserError

PD_TAG = 0x5044  # keeps pixel deflection's draws apart from every other draw of an image
MAX_TRIES = 1000  # candidate pixels per deflection before a guide map is called degenerate

Guide = Callable[[torch.Tensor], torch.Tensor]  # (B,3,H,W) pixels -> (B,H,W) maps in [0,1]
Deflection = tuple[int, int, int, int, int]  # channel, row, column, source row, source column


@dataclass(frozen=True)
class PixelDeflection(InputDefense):
    """`deflections` times: a candidate pixel (row, column) drawn uniformly, skipped with
    probability map[row, column], else its value in one colour channel replaced by the current
    value of a pixel at offset (dy, dx), each uniform in [-window, window], redrawn until the
    source lies inside the image (an offset of 0 leaves the pixel as it is). Channels take turns
    0, 1, 2, 0, ... over candidates, as in the released code; the swaps apply in order, so a
    later one may copy an earlier one's result. Then the wavelet denoiser of wavelet.py
    (BayesShrink soft thresholding of a Haar transform of each rescaled YCbCr channel) at noise
    level `sigma`; sigma = 0 leaves the deflected image as it is. The output is not rounded to
    8 bits (the released code classified the float result).

    ImageNet settings (the released code's defaults, on 224 x 224 ImageNet inputs): 200
    deflections, window 10, denoiser sigma 0.04 (the defaults here). The paper guides the draws
    by a robust activation map (R-CAM, `guide=ActivationGuide(...)`); the default is the
    released code's map-free mode (`-disable_map`, every candidate deflected): no second
    network whose choice, or whose kinship with an attack's source models, would become part
    of the defense. Two departures
    from the released code: a source may lie in row or column 0 (the code's bounds test `> 0`
    excluded them) and exactly `deflections` swaps are made (the code finished its turn over
    the three channels, making 201 of 200)."""

    deflections: int = 200
    window: int = 10
    sigma: float = 0.04
    guide: Guide | None = field(default=None, compare=False, repr=False)

    name: ClassVar[str] = "pd"
    randomized: ClassVar[bool] = True
    reference: ClassVar[str] = (
        "Pixel deflection: Prakash et al., Deflecting Adversarial Attacks with Pixel "
        "Deflection, CVPR 2018 (released ImageNet settings: 200 deflections, window 10, "
        "BayesShrink sigma 0.04)"
    )

    def __post_init__(self) -> None:
        whole_in("defense.pd.deflections", self.deflections, 1, 1_000_000, "the swaps per image")
        whole_in("defense.pd.window", self.window, 1, 10_000, "the swap distance (ImageNet: 10)")
        in_range("defense.pd.sigma", self.sigma, 0.0, 1.0, "the denoiser's noise level")
        if self.guide is not None and not callable(self.guide):
            raise UserError("defense.pd.guide: give a callable map of images, or nothing.")

    def params(self) -> dict[str, Any]:
        return {
            "pd_deflections": self.deflections,
            "pd_window": self.window,
            "pd_sigma": float(self.sigma),
            "pd_map": getattr(self.guide, "name", "custom") if self.guide else "uniform",
        }

    def apply(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        maps = None
        if self.guide is not None:
            # One copy of the maps to the host per batch: the draws are decided there.
            maps = self.guide(x).detach().float().cpu().numpy()
        deflected = self.deflect(x, keys, maps)
        return denoise_ycbcr(deflected, self.sigma) if self.sigma > 0 else deflected

    def draws(self, key: int, shape: tuple[int, int, int], skip: np.ndarray | None) -> list:
        """The image's deflections from its key: (channel, row, column, source row, source
        column) in the order they apply; skip is its (H,W) map of skip probabilities."""
        channels, h, w = shape
        out: list[Deflection] = []
        t = 0
        while len(out) < self.deflections:
            if t >= MAX_TRIES * self.deflections:
                raise UserError("defense.pd: the guide map skips every pixel; check the guide.")
            row, col = randint(mix(key, PD_TAG, t, 0), 0, h), randint(mix(key, PD_TAG, t, 1), 0, w)
            if skip is None or uniform(mix(key, PD_TAG, t, 2)) >= skip[row, col]:
                out.append((t % channels, row, col, *self.source(key, t, row, col, h, w)))
            t += 1
        return out

    def source(self, key: int, t: int, row: int, col: int, h: int, w: int) -> tuple[int, int]:
        for attempt in range(MAX_TRIES):
            dy = randint(mix(key, PD_TAG, t, 3, attempt), -self.window, self.window + 1)
            dx = randint(mix(key, PD_TAG, t, 4, attempt), -self.window, self.window + 1)
            if 0 <= row + dy < h and 0 <= col + dx < w:
                return row + dy, col + dx
        return row, col  # only a window far larger than the image gets here

    def deflect(self, x: torch.Tensor, keys: list[int], maps: np.ndarray | None) -> torch.Tensor:
        """The swaps of every image, applied in order, swap d of all images in one step."""
        b, c, h, w = x.shape
        plans = [
            self.draws(key, (c, h, w), None if maps is None else maps[i])
            for i, key in enumerate(keys)
        ]
        table = torch.tensor(plans, dtype=torch.long).permute(1, 0, 2)  # (deflections, B, 5)
        ch, row, col, src_row, src_col = table.to(x.device, non_blocking=True).unbind(-1)
        dst = (ch * h + row) * w + col
        src = (ch * h + src_row) * w + src_col
        flat = x.reshape(b, -1).clone()
        images = torch.arange(b, device=x.device)
        for d in range(self.deflections):
            flat[images, dst[d]] = flat[images, src[d]]
        return flat.view_as(x)


def robust_activation_map(
    features: torch.Tensor,
    weight: torch.Tensor,
    logits: torch.Tensor,
    size: tuple[int, int],
    top_k: int = 7,
) -> torch.Tensor:
    """R-CAM of (B,K,h,w) last-convolution features under a global-pool linear head of weight
    (classes, K): the class activation maps (the features weighted by a class's row) of the
    top_k classes by logit, each upsampled (bilinear) to size and rescaled to [0, 1], merged
    from the k-th class up, m = 1.2 * map_k, then m = (m + map_j) / 2 for j = k-1 .. 1 (the top
    class weighs most), and m rescaled to [0, 1]: the authors' released map code (top_k 7; all
    classes when there are fewer)."""
    top_k = min(top_k, logits.shape[1])
    top = logits.topk(top_k, dim=1).indices  # (B, k), the top class first
    cams = torch.einsum("bkc,bchw->bkhw", weight[top].to(features.dtype), features)
    cams = unit_range(F.interpolate(cams, size=size, mode="bilinear", align_corners=False))
    merged = 1.2 * cams[:, -1]
    for j in range(top_k - 2, -1, -1):
        merged = (merged + cams[:, j]) / 2
    return unit_range(merged.unsqueeze(1)).squeeze(1)


def unit_range(m: torch.Tensor) -> torch.Tensor:
    """Each (h, w) map rescaled to [0, 1] by its minimum and maximum (a flat map becomes 0)."""
    low = m.amin(dim=(-2, -1), keepdim=True)
    span = m.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (m - low) / torch.where(span > 0, span, 1.0), 0.0)


class ActivationGuide:
    """The R-CAM guide of pixel deflection, from a classifier with a global-average-pool linear
    head (a timm ResNet, for instance) wrapped as a PixelModel: the paper's map with an ImageNet
    network in place of the authors' own guide network. It sees the image being defended."""

    name = "rcam"

    def __init__(self, model: Any, top_k: int = 7) -> None:
        self.model = model
        self.top_k = whole_in("defense.pd.top_k", top_k, 1, 1000, "the classes merged")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        model, net = self.model, self.model.net
        with torch.no_grad():
            inp = x
            if x.shape[-1] != model.input_size or x.shape[-2] != model.input_size:
                size = (model.input_size, model.input_size)
                inp = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            features = net.forward_features((inp - model.mean) / model.std)
            if features.dim() != 4:
                raise UserError(
                    "defense.pd guide: R-CAM needs a convolutional network with a global-pool "
                    "linear head (such as resnet50); this one has no spatial feature map."
                )
            logits = net.forward_head(features)
            weight = net.get_classifier().weight
            return robust_activation_map(features, weight, logits, x.shape[-2:], self.top_k)
