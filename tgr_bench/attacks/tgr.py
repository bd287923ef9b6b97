"""TGR: Token Gradient Regularization (Zhang et al., CVPR 2023), docs/tgr.md sections 2-4.

The attack is MI-FGSM with a modified backward pass of the source: at every site of
architectures.py the gradient G of a tensor Z is replaced by R(G) = gamma * G with the k largest
and k smallest entries per channel (per sample) set to zero. Everything is torch ops on the
device (argmax, sort, scatter): no host syncs, no per-sample Python loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tgr_bench.attacks.architectures import (
    COMPONENTS,
    HEADS_PER_KEY,
    KEYS,
    ROWCOL,
    SPATIAL,
    TOKENS,
    VARIANTS,
    BoundSite,
    bind_sites,
    family_of,
)
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.errors import UserError

DEFAULT_GAMMA = {"attn": 0.25, "qkv": 0.75, "mlp": 0.5}


# ---- the regularizer R(G; gamma, k) ------------------------------------------------------------
def extreme_indices(g: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Indices of the k largest and the k smallest (signed) entries of g along `dim`.

    Ties go to the lowest index, as numpy's argmax/argmin in the released code: gradients that
    are constant over positions (Visformer's last MLP, under global pooling) would otherwise get
    an arbitrary position from topk. For k = 1, `max`/`min` give the same first-index indices as
    `argmax`/`argmin` at 2-3x their speed on a CPU when `dim` is not the innermost one.
    """
    if k == 1:
        return torch.stack([g.max(dim).indices, g.min(dim).indices], dim)
    top = g.sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    bottom = g.sort(dim=dim, stable=True).indices.narrow(dim, 0, k)
    return torch.cat([top, bottom], dim)


def zero_extremes_(g: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Zero, in place, the k largest and the k smallest (signed) entries of g along `dim`."""
    return g.scatter_(dim, extreme_indices(g, dim, k), 0.0)


def zero_rows_cols_(g: torch.Tensor, k: int) -> torch.Tensor:
    """(B, heads, N, M) contiguous, in place: per head, zero the rows and columns through its k
    max and k min entries. Writes only those rows and columns (two small indexed writes), not
    two passes of masks over the whole map."""
    b, h, n, m = g.shape
    idx = extreme_indices(g.view(b * h, n * m), -1, k)  # (B*heads, 2k)
    maps = g.view(b * h, n, m)
    which = torch.arange(b * h, device=g.device).repeat_interleave(2 * k)
    maps[which, idx.flatten() // m] = 0.0  # rows
    maps[which, :, idx.flatten() % m] = 0.0  # columns
    return g


def positions(rule: str, shape: Sequence[int]) -> int:
    """How many candidates the extremes are chosen from, under `rule`, for a gradient shape."""
    if rule == ROWCOL:
        return shape[-2]
    if rule == TOKENS:
        return shape[1]
    if rule == SPATIAL:
        return shape[2] * shape[3]
    if rule == HEADS_PER_KEY:
        return shape[1]
    if rule == KEYS:
        return shape[-1]
    raise ValueError(rule)


def regularize(g: torch.Tensor, rule: str, gamma: float, k: int) -> torch.Tensor:
    """R(G; gamma, k) of docs/tgr.md section 2: scale, then zero the extremes of the scaled
    gradient (as the released code), in place on the one new tensor."""
    g = g * gamma
    if rule == ROWCOL:
        return zero_rows_cols_(g, k)
    if rule == TOKENS:
        return zero_extremes_(g, 1, k)
    if rule == SPATIAL:
        return zero_extremes_(g.flatten(2), 2, k).view_as(g)
    if rule == HEADS_PER_KEY:
        return zero_extremes_(g, 1, k)
    if rule == KEYS:
        return zero_extremes_(g, -1, k)
    raise ValueError(rule)


class TGR(GradientHookAttack):
    name = "tgr"
    reference = (
        "TGR: Zhang et al., Transferable Adversarial Attacks on Vision Transformers with Token "
        "Gradient Regularization, CVPR 2023"
    )

    def __init__(
        self,
        *,
        k: int = 1,
        gamma: dict[str, float] | None = None,
        components: Sequence[str] = COMPONENTS,
        variant: str = "official",
        **loop: Any,  # the MI-FGSM settings of Attack
    ) -> None:
        super().__init__(**loop)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"attack.k={k!r}: the number of extreme positions must be an int >= 1.")
        components = list(components)
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown or not components or len(set(components)) != len(components):
            raise UserError(
                f"attack.components={components}: choose a non-empty subset of {list(COMPONENTS)} "
                f"without repeats (for no regularization use attack=mi)."
            )
        gamma = {**DEFAULT_GAMMA, **dict(gamma or {})}
        bad = {c: v for c, v in gamma.items() if c not in COMPONENTS}
        if bad:
            raise UserError(f"attack.gamma has unknown components {sorted(bad)}; use {COMPONENTS}.")
        for c, v in gamma.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise UserError(f"attack.gamma.{c}={v!r} is outside [0, 1].")
        if variant not in VARIANTS:
            raise UserError(f"attack.variant={variant!r}: choose one of {list(VARIANTS)}.")
        self.k = k
        self.gamma = {c: float(v) for c, v in gamma.items()}
        self.components = [c for c in COMPONENTS if c in components]
        self.variant = variant
        self._too_few: dict[str, int] = {}

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "k": self.k,
            "gamma_attn": self.gamma["attn"],
            "gamma_qkv": self.gamma["qkv"],
            "gamma_mlp": self.gamma["mlp"],
            "components": "+".join(self.components),
            "variant": self.variant,
        }

    def bind(self, net: nn.Module) -> list[BoundSite]:
        family = family_of(net, "tgr", "TGR")
        self.family = family.name
        sites = bind_sites(net, family, self.variant)
        return [b for b in sites if b.site.component in self.components]

    def expected_components(self) -> list[str]:
        return self.components

    def edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        site = bound.site
        n = positions(site.rule, g.shape)  # shapes are host metadata: no sync
        k = self.k
        if k > n:
            if not site.clamp_k:
                # Recorded, not raised inside autograd: the probe turns it into a UserError.
                self._too_few[site.component] = min(n, self._too_few.get(site.component, n))
            k = n
        return regularize(g, site.rule, self.gamma[site.component], k)

    def validate(self) -> None:
        if self._too_few:
            component, n = min(self._too_few.items(), key=lambda kv: kv[1])
            raise UserError(
                f"attack.k={self.k} is larger than the {n} positions available to the "
                f"{component} component of this source; use attack.k<={n}."
            )
