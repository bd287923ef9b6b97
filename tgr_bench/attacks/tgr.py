"""TGR: Token Gradient Regularization (Zhang et al., CVPR 2023), docs/tgr.md sections 2-4.

The attack is MI-FGSM with a modified backward pass of the source: at every site of
architectures.py the gradient G of a tensor Z is replaced by R(G) = gamma * G with the k largest
and k smallest entries per channel (per sample) set to zero. Everything is torch ops on the
device (argmax, sort, scatter): no host syncs, no per-sample Python loops.

On residual CNN sources (timm ResNet and ResNetV2, TF-slim ResNet-v2) the one component `conv`
regularizes the gradient at the input of every unit's first branch conv, with the spatial
positions as tokens (`clean`), or only scales it (`official`: what the released CNN code did).
`components` and `variant` default to `auto`, which the source's family decides; a run declares
the family with `bind_family` before `params()`, since the resolved values are its identity.
`zero=False` keeps the gammas and zeroes nothing, on every family: the control that separates
the effect of the scaling from that of removing the extreme tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tgr_bench.attacks.architectures import (
    AUTO,
    COMPONENTS,
    FAMILIES,
    HEADS_PER_KEY,
    KEYS,
    ROWCOL,
    SCALE,
    SPATIAL,
    TOKENS,
    VARIANTS,
    BoundSite,
    Family,
    bind_sites,
)
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.errors import UserError, number

DEFAULT_GAMMA = {"attn": 0.25, "qkv": 0.75, "mlp": 0.5, "conv": 0.25}


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


def positions(rule: str, shape: Sequence[int]) -> int | None:
    """How many candidates the extremes are chosen from, under `rule`, for a gradient shape;
    None where nothing is zeroed, so that any k fits."""
    if rule == SCALE:
        return None
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
    gradient (as the released code), in place on the one new tensor. SCALE: only gamma * G."""
    g = g * gamma
    if rule == SCALE:
        return g
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


def _component_set(chosen: Sequence[str]) -> tuple[str, ...]:
    """Every TGR component of the families that have all of `chosen` (the gammas a run shows)."""
    have = {c for f in FAMILIES if set(chosen) <= set(f.tgr_components) for c in f.tgr_components}
    return tuple(c for c in COMPONENTS if c in have)


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
        components: Sequence[str] | str = AUTO,
        variant: str = AUTO,
        zero: bool = True,
        **loop: Any,  # the MI-FGSM settings of Attack
    ) -> None:
        super().__init__(**loop)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"attack.k={k!r}: the number of extreme positions must be an int >= 1.")
        if components != AUTO:
            components = components.split("+") if isinstance(components, str) else components
            components = list(components)
            unknown = [c for c in components if c not in COMPONENTS]
            if unknown or not components or len(set(components)) != len(components):
                raise UserError(
                    f"attack.components={components}: choose auto (every component of the "
                    f"source's family) or a non-empty subset of {list(COMPONENTS)} without "
                    f"repeats (for no regularization use attack=mi)."
                )
            if not _component_set(components):
                raise UserError(
                    f"attack.components={components}: no source family has all of these; "
                    + "; ".join(f"{f.name} has {list(f.tgr_components)}" for f in FAMILIES)
                    + ". Use attack.components=auto or a subset of one family's components."
                )
        gamma = {**DEFAULT_GAMMA, **dict(gamma or {})}
        bad = {c: v for c, v in gamma.items() if c not in COMPONENTS}
        if bad:
            raise UserError(f"attack.gamma has unknown components {sorted(bad)}; use {COMPONENTS}.")
        for c, v in gamma.items():
            if not 0.0 <= number(f"attack.gamma.{c}", v) <= 1.0:
                raise UserError(f"attack.gamma.{c}={v!r} is outside [0, 1].")
        if variant not in (AUTO, *VARIANTS):
            raise UserError(f"attack.variant={variant!r}: choose one of {[AUTO, *VARIANTS]}.")
        if not isinstance(zero, bool):
            raise UserError(f"attack.zero={zero!r}: use true (the paper's rule) or false.")
        self.k = k
        self.gamma = {c: float(v) for c, v in gamma.items()}
        self.zero = zero
        # As configured (AUTO or explicit), and as resolved for a family (None: not yet).
        self.components_setting: str | list[str] = (
            AUTO if components == AUTO else [c for c in COMPONENTS if c in components]
        )
        self.variant_setting = variant
        self.components: list[str] | None = None
        self.variant: str | None = None
        self._gamma_keys: tuple[str, ...] = ()
        if self.components_setting != AUTO and variant != AUTO:
            # Nothing left to the family: the identity is known without one.
            self.components = list(self.components_setting)
            self.variant = variant
            self._gamma_keys = _component_set(self.components)
        self._too_few: dict[str, int] = {}

    def resolve(self, family: Family) -> None:
        have = family.tgr_components
        if self.components_setting == AUTO:
            components = list(have)
        else:
            missing = [c for c in self.components_setting if c not in have]
            if missing:
                raise UserError(
                    f"attack.components={self.components_setting}: the {family.name} family has "
                    f"no {missing} sites; its components are {list(have)}. Use "
                    f"attack.components=auto (all of them) or a subset of {list(have)}."
                )
            components = list(self.components_setting)
        self.components = components
        self.variant = family.auto_variant if self.variant_setting == AUTO else self.variant_setting
        self._gamma_keys = have

    def params(self) -> dict[str, Any]:
        if self.components is None or self.variant is None:
            raise RuntimeError(
                "Internal error: TGR.params() was asked before the source's family was known, "
                "while attack.components or attack.variant is `auto` (resolved per family, and "
                "part of the run identity). The caller must first call "
                "attack.bind_family(source_family(<source model name>)) "
                "(tgr_bench/attacks/architectures.py)."
            )
        return {
            **super().params(),
            "k": self.k,
            # The gammas of every component the family has, used or not, as runs always showed.
            **{f"gamma_{c}": self.gamma[c] for c in self._gamma_keys},
            "components": "+".join(self.components),
            "variant": self.variant,
            # Only when off: runs made before this setting existed keep their identity.
            **({} if self.zero else {"zero": False}),
        }

    def defaults(self) -> dict[str, Any]:
        fresh = type(self)()
        if self.family is not None:  # `auto` resolves as for this attack's source
            fresh.bind_family(self.family)
        return fresh.params()

    def sites(self, net: nn.Module, family: Family) -> list[BoundSite]:
        assert self.components is not None and self.variant is not None  # resolve() ran
        sites = bind_sites(net, family, self.variant)
        return [b for b in sites if b.site.component in self.components]

    def expected_components(self) -> list[str]:
        return list(self.components or [])

    def edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        site = bound.site
        rule = site.rule if self.zero else SCALE
        n = positions(rule, g.shape)  # shapes are host metadata: no sync
        k = self.k
        if n is not None and k > n:
            if not site.clamp_k:
                # Recorded, not raised inside autograd: the probe turns it into a UserError.
                self._too_few[site.component] = min(n, self._too_few.get(site.component, n))
            k = n
        return regularize(g, rule, self.gamma[site.component], k)

    def validate(self) -> None:
        if self._too_few:
            component, n = min(self._too_few.items(), key=lambda kv: kv[1])
            raise UserError(
                f"attack.k={self.k} is larger than the {n} positions available to the "
                f"{component} component of this source; use attack.k<={n}."
            )
