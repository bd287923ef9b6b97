"""TGR: Token Gradient Regularization (Zhang et al., CVPR 2023), docs/tgr.md sections 2-4.

The attack is MI-FGSM with a modified backward pass of the source: at every site of
architectures.py the gradient G of a tensor Z is replaced by R(G) = gamma * G with the k largest
and k smallest entries per channel (per sample) set to zero. Everything is torch ops on the
device (argmax, sort, scatter): no host syncs, no per-sample Python loops.

On residual CNN sources (timm ResNet and ResNetV2, TF-slim ResNet-v2) the one component `conv`
regularizes the gradient at the input of every unit's first branch conv, with the spatial
positions as tokens (`clean`), or only scales it (`official`: what the released CNN code did).
`components` and `variant` default to `auto`, which the source's family decides: the attack is
built with the family, so the resolved values (part of the run identity) are known at once.
`zero=False` keeps the gammas and zeroes nothing, on every family: the control that separates
the effect of the scaling from that of removing the extreme tokens. On DeiT, `official` only
scales too: the released code hooks DeiT but zeroes nothing there (architectures.scales_only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tgr_bench.attacks.architectures import (
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
    scales_only,
    scales_only_arch,
)
from tgr_bench.attacks.base import MISettings
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.errors import UserError
from tgr_bench.schema import AUTO, key


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


def _components(name: str, value: Any) -> str | tuple[str, ...]:
    """`auto`, or a non-empty subset of COMPONENTS without repeats that some family has all of
    (a list, or text joined by `+`), in COMPONENTS order."""
    if value == AUTO:
        return AUTO
    chosen = value.split("+") if isinstance(value, str) else value
    chosen = list(chosen) if isinstance(chosen, list | tuple) else [chosen]
    unknown = [c for c in chosen if c not in COMPONENTS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise UserError(
            f"{name}={chosen}: choose auto (every component of the source's family) or a "
            f"non-empty subset of {list(COMPONENTS)} without repeats (for no regularization use "
            f"attack=mi)."
        )
    if not _component_set(chosen):
        raise UserError(
            f"{name}={chosen}: no source family has all of these; "
            + "; ".join(f"{f.name} has {list(f.tgr_components)}" for f in FAMILIES)
            + ". Use attack.components=auto or a subset of one family's components."
        )
    return tuple(c for c in COMPONENTS if c in chosen)


@dataclass(frozen=True)
class Gamma:
    """TGR's factor per component. The MLP factor has three published values: 0.5 in the
    released code's methods.py (the default, as TransferAttack and torchattack use it), 0.25 in
    the paper's text and in the compiled module shipped in the same commit (docs/tgr.md)."""

    attn: float = key(0.25, low=0, high=1)
    qkv: float = key(0.75, low=0, high=1)
    mlp: float = key(0.5, low=0, high=1, help="0.5 as released; 0.25 in the paper's text")
    conv: float = key(0.25, low=0, high=1, help="CNN sources: each unit's first conv input")


@dataclass(frozen=True)
class TGRSettings(MISettings):
    """attack=tgr: TGR's regularizer on top of the MI-FGSM loop."""

    name: str = key("tgr")
    k: int = key(1, low=1, help="extreme positions zeroed per side (k max and k min) per channel")
    gamma: Gamma = key(Gamma)
    components: str | tuple[str, ...] = key(
        AUTO,
        parse=_components,
        help="auto: every component of the source's family, or a subset such as [attn,qkv]",
    )
    variant: str = key(
        AUTO,
        options=(AUTO, *VARIANTS),
        help="auto: official on ViT/DeiT/PiT/CaiT/Visformer (it decides CaiT's class-attention "
        "blocks, and official only scales on DeiT, as released), clean on residual CNNs",
    )
    zero: bool = key(
        True, help="false: scale by the gammas and zero nothing (the variance analysis' control)"
    )


class TGR(GradientHookAttack):
    name = "tgr"
    reference = (
        "TGR: Zhang et al., Transferable Adversarial Attacks on Vision Transformers with Token "
        "Gradient Regularization, CVPR 2023"
    )

    Settings = TGRSettings

    def __init__(self, settings: TGRSettings | None = None, family: Family | None = None) -> None:
        super().__init__(settings, family)
        s: TGRSettings = self.settings  # type: ignore[assignment]
        self.k = s.k
        self.gamma = {c: float(getattr(s.gamma, c)) for c in COMPONENTS}
        self.zero = s.zero
        have = self.family.tgr_components
        if s.components == AUTO:
            self.components = list(have)
        else:
            missing = [c for c in s.components if c not in have]
            if missing:
                raise UserError(
                    f"attack.components={list(s.components)}: the {self.family.name} family has "
                    f"no {missing} sites; its components are {list(have)}. Use "
                    f"attack.components=auto (all of them) or a subset of {list(have)}."
                )
            self.components = list(s.components)
        self._refuse_unused_gammas(s.gamma)
        self.variant = self.family.auto_variant if s.variant == AUTO else s.variant
        self._too_few: dict[str, int] = {}
        self._scale_only = False  # set per bound network: DeiT under `official`

    def _refuse_unused_gammas(self, gamma: Gamma) -> None:
        """A gamma set for a component this run does not regularize would silently not apply."""
        for c in COMPONENTS:
            default = getattr(Gamma(), c)
            if c not in self.components and getattr(gamma, c) != default:
                raise UserError(
                    f"attack.gamma.{c}={getattr(gamma, c)} has no effect: this run regularizes "
                    f"{self.components} on the {self.family.name} source. Leave attack.gamma.{c} "
                    f"at its default ({default}), or add {c} to attack.components where the "
                    f"family has it ({list(self.family.tgr_components)})."
                )

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "k": self.k,
            # The gammas of every component the family has, used or not.
            **{f"gamma_{c}": self.gamma[c] for c in self.family.tgr_components},
            "components": "+".join(self.components),
            "variant": self.variant,
            **({} if self.zero else {"zero": False}),  # shown only when off
            # DeiT under `official` only scales: a rule of its own, so runs of its own.
            **({"scale_only": True} if self._arch_scales_only() else {}),
        }

    def _arch_scales_only(self) -> bool:
        if self.source_arch is None:
            return False
        return scales_only_arch(self.source_arch, self.family, self.variant)

    def sites(self, net: nn.Module, family: Family) -> list[BoundSite]:
        bound = bind_sites(net, family, self.variant)
        sites = [b for b in bound if b.site.component in self.components]
        # The released code hooks DeiT but zeroes nothing there (docs/tgr.md section 3.1).
        self._scale_only = scales_only(net, family, self.variant)
        if self.source_arch is not None and self._scale_only != self._arch_scales_only():
            raise UserError(
                f"The source network is {'' if self._scale_only else 'not '}a DeiT, but its "
                f"model name {self.source_arch!r} says otherwise, and the run's identity was "
                f"resolved from the name. Check the source entry's model= in conf/source/."
            )
        if self._scale_only:
            sites = [replace(b, site=replace(b.site, rule=SCALE)) for b in sites]
        return sites

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), **({"tgr_scale_only": True} if self._scale_only else {})}

    def expected_components(self) -> list[str]:
        return list(self.components)

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
