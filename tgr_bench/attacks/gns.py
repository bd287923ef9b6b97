"""GNS-HFA: Gradient Normalization Scaling and High-Frequency Adaptation (Zhu et al., ICLR 2024),
docs/gns.md. Official code: GitHub LMBTough/GNS-HFA, `methods.py` class `GNS_HFE`, `dct.py`.

GNS edits the source's backward pass at the sites of the `official` rows of the `tgr` table of
architectures.py (the same modules the release hooks): the gradient of the attention scores
and of the MLP output is scaled (0.5 each); the gradient of the qkv projection (CaiT's class
block: k and v) is scaled per channel by the qkv rule (`qkv_rule`). HFA replaces the gradient
estimate: the mean over N samples of the gradient at x_n = idct_2d(dct_2d(x + noise_n) * mask_n),
each sample a leaf of its own (the gradient is taken at x_n, not through the transform).
Statistics are per image and every draw is keyed per image (draws.py): an image's result never
depends on its batch. Everything is torch ops on the device: no host syncs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tgr_bench.attacks.architectures import SPATIAL, TOKENS, BoundSite, Family, bind_sites
from tgr_bench.attacks.base import MISettings, split_on_oom
from tgr_bench.attacks.draws import mix
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.errors import UserError
from tgr_bench.schema import Levels, key

# The spectrum multiplier of each --mhf mode of the release (`""` is named `uniform` here).
HFA_MODES = ("search", "both", "noise", "uniform")
_HFA_TAG = 0x484641  # "HFA": separates HFA's draws from the other draws of the same key


# ---- GNS: the qkv rule -------------------------------------------------------------------------
def qkv_rule(g: torch.Tensor, rule: str, u: float) -> torch.Tensor:
    """The qkv gradient G scaled per image and channel (methods.py GNS_HFE, the qkv hook).

    c_mu = mean |G| over the positions (tokens of (B, N, C) under TOKENS, (h, w) of (B, C, H, W)
    under SPATIAL), one value per image and channel; mu and sigma (population) are taken over the
    channels of that image. A channel keeps factor 1 where c_mu > mu + u * sigma, else it gets
    tanh(|c_mu - mu| / sigma). The release pools c_mu over the batch as well; here each image
    has its own. mu + u * sigma is formed in float64 and compared in float32, as numpy did.
    """
    if rule == TOKENS:
        c_mu = g.abs().mean(dim=1)  # (B, C)
    elif rule == SPATIAL:
        c_mu = g.abs().mean(dim=(2, 3))  # (B, C)
    else:
        raise ValueError(rule)
    mu = c_mu.mean(dim=1, keepdim=True)
    sigma = c_mu.std(dim=1, correction=0, keepdim=True)
    threshold = (mu.double() + u * sigma.double()).to(c_mu.dtype)
    # sigma = 0 (every channel equal): the release divides 0 by 0 (NaN); the floor gives 0.
    ratio = (c_mu - mu).abs() / sigma.clamp_min(torch.finfo(c_mu.dtype).tiny)
    factor = torch.where(c_mu > threshold, torch.ones_like(c_mu), torch.tanh(ratio))
    if rule == TOKENS:
        return g * factor.unsqueeze(1)
    return g * factor[:, :, None, None]


# ---- HFA: the 2-D DCT of dct.py, as matrices ---------------------------------------------------
@functools.lru_cache(maxsize=16)  # constants per size and device: built once
def dct_matrix(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) float64 C with C[k, m] = 2 cos(pi k (2m + 1) / (2n)): dct.py's DCT-II with
    norm=None (scipy's convention), X = C x along the last dimension."""
    k = torch.arange(n, dtype=torch.float64, device=device)
    return 2 * torch.cos(math.pi * k[:, None] * (2 * k[None, :] + 1) / (2 * n))


@functools.lru_cache(maxsize=16)  # constants per size and device: built once
def idct_matrix(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) float64 inverse of dct_matrix: x_m = (X_0 / 2 + sum_k>0 X_k cos(...)) / n."""
    k = torch.arange(n, dtype=torch.float64, device=device)
    weight = torch.ones(n, dtype=torch.float64, device=device)
    weight[0] = 0.5
    return torch.cos(math.pi * k[None, :] * (2 * k[:, None] + 1) / (2 * n)) * weight / n


def dct_2d(x: torch.Tensor) -> torch.Tensor:
    """dct.py's dct_2d (norm=None) over the last two dimensions, in float64. Matrix products in
    float64 are exact to rounding whatever the TF32 setting of float32 products."""
    h, w = x.shape[-2:]
    x = x.double()
    return dct_matrix(h, x.device) @ x @ dct_matrix(w, x.device).T


def idct_2d(coef: torch.Tensor) -> torch.Tensor:
    """dct.py's idct_2d (norm=None) over the last two dimensions, in float64."""
    h, w = coef.shape[-2:]
    coef = coef.double()
    return idct_matrix(h, coef.device) @ coef @ idct_matrix(w, coef.device).T


@functools.lru_cache(maxsize=16)  # constants per size and device: built once
def search_mask(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h, w) float64 `msk` of --mhf search/both: linspace(h/2, h, h)[i] linspace(w/2, w, w)[j]
    / h / w, from 0.25 at frequency (0, 0) to 1 at (h-1, w-1); the release hard-codes h = w = 224
    (linspace(112, 224, 224) / 224 / 224), which this is at that size."""
    rows = torch.linspace(h / 2, h, h, dtype=torch.float64, device=device)
    cols = torch.linspace(w / 2, w, w, dtype=torch.float64, device=device)
    return rows[:, None] * cols[None, :] / h / w


@functools.lru_cache(maxsize=16)  # constants per size and device: built once
def noise_mask(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h, w) float64 `msk` of --mhf noise/both on the noise's spectrum: i j / (h-1) / (w-1)."""
    rows = torch.arange(h, dtype=torch.float64, device=device) / (h - 1)
    cols = torch.arange(w, dtype=torch.float64, device=device) / (w - 1)
    return rows[:, None] * cols[None, :]


@dataclass(frozen=True)
class HFA:
    """High-frequency adaptation: the gradient is the mean over n samples of the gradient at
    idct_2d(dct_2d(x + noise/255 * z) * (u * msk * 2 rho + 1 - rho)), z standard normal and u
    uniform on [0, 1) per pixel, drawn per image, step and sample."""

    enabled: bool = key(True, help="false: GNS alone (the gradient at x + delta itself)")
    n: int = key(20, low=1, help="spectrum samples N per step")
    noise: Levels = key(16.0, help="std of the Gaussian noise in 0-255 pixel levels (16/255)")
    rho: float = key(0.5, low=0, high=1, help="the multiplier's half-width: 1 - rho .. 1 + rho")
    mode: str = key(
        "search",
        options=HFA_MODES,
        help="the release's --mhf: search (the README's) | both | noise | uniform (--mhf '')",
    )
    chunk: int | None = key(
        None,
        low=1,
        identity=False,
        help="samples per image in one pass; null = all (halved on OOM)",
    )

    def params(self) -> dict[str, Any]:
        return {
            "hfa_n": self.n,
            "hfa_noise": float(self.noise),
            "hfa_rho": float(self.rho),
            "hfa_mode": self.mode,
        }

    def draws(
        self, x: torch.Tensor, step: int, keys: Sequence[int], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, u), each (B, stop - start, 3, H, W): samples start..stop-1 of each image, each
        from its own generator keyed (image key, step, sample), so any split gives the same."""
        zs, us = [], []
        for k in keys:
            for j in range(start, stop):
                seed = mix(k, _HFA_TAG, step, j) & ((1 << 63) - 1)
                gen = torch.Generator(x.device).manual_seed(seed)
                zs.append(torch.randn(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype))
                us.append(torch.rand(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype))
        shape = (len(keys), stop - start, *x.shape[1:])
        return torch.stack(zs).view(shape), torch.stack(us).view(shape)

    def inputs(self, x: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(B, S, 3, H, W) samples of the points x (B, 3, H, W) for draws z, u (B, S, 3, H, W).
        Nothing is clipped, as in the release: a sample may leave [0, 1]."""
        h, w = x.shape[-2:]
        gauss = z.double() * (float(self.noise) / 255)
        if self.mode in ("noise", "both"):
            gauss = idct_2d(dct_2d(gauss) * noise_mask(h, w, x.device))
        spectrum = dct_2d(x.unsqueeze(1) + gauss)
        if self.mode in ("search", "both"):
            scale = u.double() * search_mask(h, w, x.device) * (2 * self.rho) + 1 - self.rho
        else:
            scale = u.double() * (2 * self.rho) + 1 - self.rho
        return idct_2d(spectrum * scale).to(x.dtype)


@dataclass(frozen=True)
class GNSSettings(MISettings):
    """attack=gns: GNS on the source's backward pass, HFA on its inputs."""

    name: str = key("gns")
    attn: float = key(0.5, low=0, high=1, help="factor on the attention scores' gradient")
    mlp: float = key(0.5, low=0, high=1, help="factor on the MLP output's gradient")
    u: float = key(
        0.6, low=0, help="qkv rule threshold mu + u sigma: 0.6 the class default, 1.0 the README's"
    )
    qkv: bool = key(
        True, help="false: qkv gradients unchanged (the release on DeiT, by its model-name test)"
    )
    hfa: HFA = key(HFA, help="high-frequency adaptation of the inputs")

    def check(self, where: str) -> None:
        super().check(where)
        if not self.hfa.enabled:
            return
        for other, why in (
            ("si", "SI's scale copies"),
            ("admix", "Admix's mixed scale copies"),
            ("patchout", "PatchOut's masked delta (HFA takes its gradient at each sample)"),
        ):
            if getattr(self, other).enabled:
                raise UserError(
                    f"{where}.hfa and {where}.{other} are both on: HFA averages over its own "
                    f"{self.hfa.n} spectrum samples and does not combine with {why}; set "
                    f"{where}.hfa.enabled=false or {where}.{other}.enabled=false."
                )


class GNS(GradientHookAttack):
    name = "gns"
    Settings = GNSSettings
    needs = "attn"  # the transformer families: residual CNNs have no attention sites
    reference = (
        "GNS-HFA: Zhu et al., Enhancing Adversarial Transferability via Gradient Normalization "
        "Scaling and High-Frequency Adaptation, ICLR 2024"
    )

    def __init__(self, settings: GNSSettings | None = None, family: Family | None = None) -> None:
        super().__init__(settings, family)
        s: GNSSettings = self.settings  # type: ignore[assignment]
        self.factor = {"attn": float(s.attn), "mlp": float(s.mlp)}
        self.u = float(s.u)
        self.qkv = s.qkv
        self.hfa = s.hfa if s.hfa.enabled else None
        # HFA samples per image in one forward/backward; halved on CUDA out-of-memory.
        self.hfa_chunk = (s.hfa.chunk or s.hfa.n) if self.hfa else 0

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "attn_factor": self.factor["attn"],
            "mlp_factor": self.factor["mlp"],
            "u": self.u,
            "qkv_rule": self.qkv,
            **({"hfa": True, **self.hfa.params()} if self.hfa else {"hfa": False}),
        }

    def stats(self) -> dict[str, Any]:
        split = self.hfa is not None and self.hfa_chunk < self.hfa.n
        return {**super().stats(), **({"hfa_samples_per_pass": self.hfa_chunk} if split else {})}

    # ---- GNS ---------------------------------------------------------------------------------
    def sites(self, net: nn.Module, family: Family) -> list[BoundSite]:
        # The release hooks the modules of TGR's `official` rows (CaiT: blocks_token_only[1]
        # alone, its k and v as qkv; Visformer: the inputs of the bias-free 1x1 convs). CaiT's
        # class-block q edit reaches only a bias gradient in the release: it has no site here.
        chosen = ("attn", "mlp", "qkv") if self.qkv else ("attn", "mlp")
        return [b for b in bind_sites(net, family, "official") if b.site.component in chosen]

    def edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        component = bound.site.component
        if component == "qkv":
            return qkv_rule(g, bound.site.rule, self.u)
        return g * self.factor[component]

    # ---- HFA ---------------------------------------------------------------------------------
    def input_gradient(
        self,
        model: nn.Module,
        x: torch.Tensor,
        delta: torch.Tensor,
        y: torch.Tensor,
        step: int,
        seeds: Sequence[int],
        keys: Sequence[int] | None = None,
        ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """With HFA: the mean over the N samples of d loss / d x_n at each sample x_n of the
        current point x + delta; without it, the gradient of the shared loop."""
        if self.hfa is None:
            return super().input_gradient(model, x, delta, y, step, seeds, keys, ids)
        keys = seeds if keys is None else keys
        point = (x + delta).detach()
        n = self.hfa.n

        def passes(chunk: int) -> torch.Tensor:
            total = torch.zeros_like(x)
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                total += self._samples_gradient(model, point, y, step, keys, start, stop)
            return total

        # As VMI's neighbours: one image's samples split (the draws are keyed per sample).
        grad, self.hfa_chunk = split_on_oom(passes, self.hfa_chunk, len(x))
        return grad

    def _samples_gradient(
        self,
        model: nn.Module,
        point: torch.Tensor,
        y: torch.Tensor,
        step: int,
        keys: Sequence[int],
        start: int,
        stop: int,
    ) -> torch.Tensor:
        """Samples start..stop-1 of every image: sum over them of d (CE / N) / d x_n."""
        assert self.hfa is not None
        b, s = len(point), stop - start
        z, u = self.hfa.draws(point, step, keys, start, stop)
        leaf = self.hfa.inputs(point, z, u).flatten(0, 1).requires_grad_(True)
        inputs = leaf
        if self.di is not None:  # every sample its own DI draw (key, step, sample)
            inputs = self.di.apply(
                leaf, [mix(k, step, j) for k in keys for j in range(start, stop)]
            )
        loss = self.loss(model(inputs), y.repeat_interleave(s), leaf, self.hfa.n)
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad.view(b, s, *point.shape[1:]).sum(1)
