"""Input-transformation and gradient-smoothing modifiers of every attack: DI, TI, SI, Admix.

Each is off unless `attack.<name>.enabled=true`; an enabled one names itself in the attack's
label (`tgr_di_ti`) and its settings in `params()`, a disabled one appears nowhere (so a
setting of a modifier that is off never changes a run id). Inside one iteration
(docs/baselines.md section 7): PatchOut's mask, then the SI or Admix copies of each image, then
DI on every copy with its own draw; the attack's backward hooks act in every copy; the input
gradient is the mean over copies; TI smooths it; then the momentum update. Every random draw is
the image's own (draws.py): an image's result never depends on its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tgr_bench.attacks.draws import mix, randint, uniform
from tgr_bench.errors import UserError
from tgr_bench.pixels import Pixels
from tgr_bench.schema import key


@dataclass(frozen=True)
class DI:
    """Diverse inputs (Xie et al., CVPR 2019): with probability p the forward pass sees the image
    resized to r x r, r uniform in [min(S, S*rate), max(S, S*rate)), zero-padded at a random
    offset to the larger square, and resized back to S (bilinear, align_corners=False). S is the
    stored image size: the attack perturbs stored pixels before the model's own resize."""

    enabled: bool = key(False)
    p: float = key(
        0.5, low=0, high=1, help="probability of transforming an input, per image, copy and step"
    )
    rate: float = key(
        1.1,
        low=0,
        high=2,
        low_open=True,
        help="resize to r in [S, S*rate), pad to S*rate, back to S (usually 1.1 to enlarge, "
        "TransferAttack; 0.9 to shrink, torchattacks); the canvas grows with its square",
    )

    def params(self) -> dict[str, Any]:
        return {"di_p": float(self.p), "di_rate": float(self.rate)}

    def check_size(self, height: int, width: int) -> None:
        """Refuse, before any work, a stored size this rate cannot transform: DI would silently
        do nothing (floor(S * rate) == S) or resize to nothing."""
        if height != width:
            raise UserError(
                f"attack.di needs square images; this data set stores {height}x{width}. Resize "
                f"the set to a square size (the protocol's is 224x224)."
            )
        scaled = math.floor(width * self.rate)
        if scaled == width:
            raise UserError(
                f"attack.di.rate={self.rate} leaves {width}-pixel images as they are "
                f"(floor({width} x {self.rate}) = {width}): DI would do nothing. Choose a rate of "
                f"at least {(width + 1) / width:.4g} to enlarge (TransferAttack: 1.1) or at most "
                f"{(width - 1) / width:.4g} to shrink (torchattacks: 0.9)."
            )
        if scaled < 1:
            raise UserError(
                f"attack.di.rate={self.rate} would resize {width}-pixel images to 0 pixels: "
                f"choose a rate of at least {1 / width:.4g} (usually 0.9 or 1.1)."
            )

    def apply(self, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        """x (N,3,S,S) with one draw key per sample; the images that drew the same size are
        transformed together, every other image left as it is."""
        size = x.shape[-1]
        self.check_size(x.shape[-2], size)
        scaled = math.floor(size * self.rate)
        low, high = min(size, scaled), max(size, scaled)
        chosen: dict[int, list[tuple[int, int, int]]] = {}
        for i, k in enumerate(keys):
            if uniform(mix(k, 1)) < self.p:
                r = randint(mix(k, 2), low, high)
                # Offsets in [0, high - r), as the original code and its ports draw them.
                top = randint(mix(k, 3), 0, high - r)
                left = randint(mix(k, 4), 0, high - r)
                chosen.setdefault(r, []).append((i, top, left))
        if not chosen:
            return x
        # All draws in one copy that does not wait for the device (a blocking copy would wait
        # for every queued kernel); each size's rows are then slices of it.
        table = torch.tensor([p for r in chosen for p in chosen[r]], dtype=torch.long)
        table = table.to(x.device, non_blocking=True)
        pos = torch.arange(high, device=x.device)
        # One selection then a split, whose backward is one concatenation (indexing each group
        # out of x would zero-fill a gradient the size of x per group).
        sizes = [len(picks) for picks in chosen.values()]
        selected = x.index_select(0, table[:, 0]).split(sizes)
        groups = zip(chosen, selected, table.split(sizes), strict=True)
        canvases = []
        for r, images, draws in groups:
            n, c = len(images), x.shape[1]
            _, tops, lefts = draws.unbind(1)
            resized = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False)
            # Padding at a per-image offset as two gathers: canvas row i is resized row
            # i - top, or the zero row appended at index r when that falls outside.
            resized = F.pad(resized, (0, 1, 0, 1))
            rows = pos - tops[:, None]
            rows = torch.where((rows >= 0) & (rows < r), rows, r)
            cols = pos - lefts[:, None]
            cols = torch.where((cols >= 0) & (cols < r), cols, r)
            canvas = resized.gather(2, rows[:, None, :, None].expand(n, c, high, r + 1))
            canvases.append(canvas.gather(3, cols[:, None, None, :].expand(n, c, high, high)))
        padded = torch.cat(canvases)
        if high != size:
            padded = F.interpolate(padded, size=(size, size), mode="bilinear", align_corners=False)
        return x.index_copy(0, table[:, 0], padded)


@dataclass(frozen=True)
class TI:
    """Translation invariance (Dong et al., CVPR 2019): the input gradient convolved, per colour
    channel, with a normalized 2-D Gaussian kernel (the outer product of the standard normal pdf
    at linspace(-nsig, nsig, size)), zero padding size // 2, before the momentum update."""

    enabled: bool = key(False)
    size: int = key(15, low=1, help="kernel size, odd (some ViT papers use 7)")
    nsig: float = key(
        3.0, low=0, low_open=True, help="the kernel spans -nsig..nsig standard deviations"
    )

    def check(self, where: str) -> None:
        if self.size % 2 == 0:
            raise UserError(f"{where}.size={self.size}: need an odd kernel size (centred).")

    def params(self) -> dict[str, Any]:
        return {"ti_size": self.size, "ti_nsig": float(self.nsig)}

    def profile(self, like: torch.Tensor) -> torch.Tensor:
        """The normalized 1-D Gaussian whose outer product with itself is the 2-D kernel."""
        # Built on the gradient's device: copying a host-built kernel would wait for the device.
        t = torch.linspace(
            -self.nsig, self.nsig, self.size, dtype=torch.float64, device=like.device
        )
        pdf = torch.exp(-(t**2) / 2)
        return (pdf / pdf.sum()).to(like.dtype)

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        # The kernel is separable: a column pass then a row pass equal the 2-D convolution with
        # zero padding, at 2 * size instead of size^2 multiplications per pixel.
        c, half = grad.shape[1], self.size // 2
        k = self.profile(grad)
        grad = F.conv2d(grad, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(half, 0), groups=c)
        return F.conv2d(grad, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, half), groups=c)


SCALE_SPACES = ("pixels", "model")


def halvings(m: int, like: torch.Tensor) -> torch.Tensor:
    """[1, 1/2, ..., 1/2^(m-1)] made on like's device (exact powers of two): a tensor built from
    host values would be a blocking copy that waits for the device."""
    exponents = torch.arange(m, device=like.device)
    return torch.ldexp(torch.ones(m, dtype=like.dtype, device=like.device), -exponents)


@dataclass(frozen=True)
class SI:
    """Scale invariance (Lin et al., ICLR 2020): the gradient is the mean over i = 0..m-1 of the
    gradients at (x + delta) / 2^i. `space=pixels` scales the [0,1] pixels (TransferAttack,
    torchattacks); `space=model` scales the model's normalized input, as the original code did
    with inputs in [-1, 1]."""

    enabled: bool = key(False)
    m: int = key(5, low=1, help="copies i = 0..m-1")
    space: str = key(
        "pixels",
        options=SCALE_SPACES,
        help="pixels: scale [0,1] pixels | model: scale the model's normalized input",
    )

    def params(self) -> dict[str, Any]:
        return {"si_m": self.m, "si_space": self.space}

    def copies(self, x: torch.Tensor, mean: torch.Tensor | float) -> torch.Tensor:
        """(B, m, 3, H, W): copy i is x / 2^i (pixels) or mean + (x - mean) / 2^i (model)."""
        scales = halvings(self.m, x).view(1, -1, 1, 1, 1)
        if self.space == "pixels":
            return x.unsqueeze(1) * scales
        center = mean if isinstance(mean, float) else mean.view(1, 1, -1, 1, 1)
        return center + (x.unsqueeze(1) - center) * scales


@dataclass(frozen=True)
class Admix:
    """Admix (Wang et al., ICCV 2021): the gradient is the mean over j = 1..m2 and i = 0..m1-1
    of the gradients at (x + delta + eta * x'_j) / 2^i, each x'_j drawn uniformly, per image and
    iteration, from the OTHER clean images of the whole data set as listed before data.limit and
    sharding (not from the batch: merged shards equal the unsharded run). `space=pixels` mixes
    and scales the [0,1] pixels (TransferAttack admix.py), toward black; `space=model` the
    model's normalized input, toward the mean, as the original code did with inputs in [-1, 1]
    (JHL-HUST/Admix mi_admix.py)."""

    enabled: bool = key(False)
    m1: int = key(5, low=1, help="scales")
    m2: int = key(3, low=1, help="partners x'_j, drawn from the other images of the data set")
    eta: float = key(0.2, low=0, high=1, help="the mixing weight")
    space: str = key(
        "pixels",
        options=SCALE_SPACES,
        help="pixels: mix and scale [0,1] pixels | model: the model's normalized input",
    )

    def params(self) -> dict[str, Any]:
        return {
            "admix_m1": self.m1,
            "admix_m2": self.m2,
            "admix_eta": float(self.eta),
            # Shown only when not the default, so that earlier run ids stay valid.
            **({"admix_space": self.space} if self.space != "pixels" else {}),
        }

    def partner_index(self, own: Sequence[int], keys: Sequence[int], pool_size: int) -> list[int]:
        """m2 indices per image into the pool, never the image itself (pool order: the data
        set as listed before data.limit and sharding)."""
        if pool_size < 2:
            raise UserError("attack.admix needs a data set of at least two images to mix.")
        out = []
        for i, k in zip(own, keys, strict=True):
            for j in range(self.m2):
                r = randint(mix(k, 0xAD, j), 0, pool_size - 1)
                out.append(r + (r >= i))
        return out

    def copies(
        self, x: torch.Tensor, partners: torch.Tensor, mean: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """(B, m2 * m1, 3, H, W) from x (B,3,H,W) and partners (B, m2, 3, H, W) in [0,1]: copy
        (j, i) is (x + eta x'_j) / 2^i (pixels) or mean + ((x - mean) + eta (x'_j - mean)) / 2^i
        (model: the same in (p - mean) / std, whose std cancels), with the model's `mean`."""
        scales = halvings(self.m1, x).view(1, 1, -1, 1, 1, 1)
        if self.space == "pixels":
            mixed = x.unsqueeze(1) + self.eta * partners  # (B, m2, ...)
            return (mixed.unsqueeze(2) * scales).flatten(1, 2)
        if mean is None:
            raise ValueError("Admix with space=model needs the model's mean")
        center = mean if isinstance(mean, float) else mean.view(1, 1, -1, 1, 1)
        mixed = (x.unsqueeze(1) - center) + self.eta * (partners - center)  # (B, m2, ...)
        return center + (mixed.unsqueeze(2) * scales).flatten(1, 2)


@dataclass
class PartnerPool:
    """The clean images Admix mixes in: the whole data set, decoded on demand."""

    pixels: Pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def load(self, index: Sequence[int], device: torch.device) -> torch.Tensor:
        decoded = self.pixels.load(index)
        if torch.device(device).type == "cuda":  # a large copy from pageable memory may block
            decoded = decoded.pin_memory()
        return decoded.to(device, non_blocking=True).float().div_(255.0)


MODIFIERS = ("di", "ti", "si", "admix")  # the fixed order of labels: tgr_patchout_di_ti
