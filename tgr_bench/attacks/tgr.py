"""TGR: Token Gradient Regularization (Zhang et al., CVPR 2023), tgr.md sections 2-4.

The attack is MI-FGSM with a modified backward pass of the source: at every site of
architectures.py the gradient G of a tensor Z is replaced by R(G) = gamma * G with the k largest
and k smallest entries per channel (per sample) set to zero. Everything is torch ops on the
device (topk, scatter): no host syncs, no per-sample Python loops.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from tgr_bench.architectures import (
    COMPONENTS,
    HEADS_PER_KEY,
    INPUT,
    KEYS,
    OUTPUT,
    ROWCOL,
    SOFTMAX_INPUT,
    SPATIAL,
    TOKENS,
    VARIANTS,
    BoundSite,
    bind_sites,
    family_of,
)
from tgr_bench.attacks.base import Attack
from tgr_bench.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_GAMMA = {"attn": 0.25, "qkv": 0.75, "mlp": 0.5}


# ---- the regularizer R(G; gamma, k) ------------------------------------------------------------
def extreme_indices(g: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Indices of the k largest and the k smallest (signed) entries of g along `dim`.

    Ties go to the lowest index, as numpy's argmax/argmin in the released code: gradients that
    are constant over positions (Visformer's last MLP, under global pooling) would otherwise get
    an arbitrary position from topk.
    """
    if k == 1:
        return torch.stack([g.argmax(dim), g.argmin(dim)], dim)
    top = g.sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    bottom = g.sort(dim=dim, stable=True).indices.narrow(dim, 0, k)
    return torch.cat([top, bottom], dim)


def zero_extremes(g: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Zero the k largest and the k smallest (signed) entries of g along `dim`."""
    return g.scatter(dim, extreme_indices(g, dim, k), 0.0)


def zero_rows_cols(g: torch.Tensor, k: int) -> torch.Tensor:
    """(B, heads, N, M): per head, zero the rows and columns through its k max and k min."""
    b, h, n, m = g.shape
    idx = extreme_indices(g.reshape(b, h, n * m), -1, k)
    keep_rows = torch.ones(b, h, n, dtype=g.dtype, device=g.device).scatter_(-1, idx // m, 0.0)
    keep_cols = torch.ones(b, h, m, dtype=g.dtype, device=g.device).scatter_(-1, idx % m, 0.0)
    return g * keep_rows.unsqueeze(-1) * keep_cols.unsqueeze(-2)


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
    g = g * gamma
    if rule == ROWCOL:
        return zero_rows_cols(g, k)
    if rule == TOKENS:
        return zero_extremes(g, 1, k)
    if rule == SPATIAL:
        return zero_extremes(g.flatten(2), 2, k).view_as(g)
    if rule == HEADS_PER_KEY:
        return zero_extremes(g, 1, k)
    if rule == KEYS:
        return zero_extremes(g, -1, k)
    raise ValueError(rule)


def set_fused_attn(model: nn.Module, enabled: bool) -> list[tuple[nn.Module, bool]]:
    """Switch timm's fused attention; returns the previous settings to restore.

    The fused kernel never materializes the attention scores, so attention hooks would never
    fire (tgr.md section 6): the source must run the explicit path while it is attacked.
    """
    previous = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in previous:
        m.fused_attn = enabled
    return previous


class TGR(Attack):
    name = "tgr"
    reference = (
        "TGR: Zhang et al., Transferable Adversarial Attacks on Vision Transformers with Token "
        "Gradient Regularization, CVPR 2023"
    )

    def __init__(
        self,
        eps: float = 16.0,
        steps: int = 10,
        alpha: float | None = None,
        decay: float = 1.0,
        k: int = 1,
        gamma: dict[str, float] | None = None,
        components: Sequence[str] = COMPONENTS,
        variant: str = "official",
    ) -> None:
        super().__init__(eps, steps, alpha, decay)
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
            if not isinstance(v, int | float) or not 0.0 <= float(v) <= 1.0:
                raise UserError(f"attack.gamma.{c}={v!r} is outside [0, 1].")
        if variant not in VARIANTS:
            raise UserError(f"attack.variant={variant!r}: choose one of {list(VARIANTS)}.")
        self.k = k
        self.gamma = {c: float(v) for c, v in gamma.items()}
        self.components = [c for c in COMPONENTS if c in components]
        self.variant = variant
        self.fired: Counter[str] = Counter()
        self._too_few: dict[str, int] = {}
        self._sites: list[BoundSite] = []

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

    def stats(self) -> dict[str, Any]:
        return {
            "tgr_fired": dict(self.fired),
            "tgr_sites": Counter(b.site.component for b in self._sites),
            "tgr_family": getattr(self, "_family", None),
        }

    # ---- hooks -----------------------------------------------------------------------------
    def _transform(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        site = bound.site
        n = positions(site.rule, g.shape)
        k = self.k
        if k > n:
            if not site.clamp_k:
                # Record, do not raise inside autograd: the probe turns this into a UserError.
                self._too_few[site.component] = min(n, self._too_few.get(site.component, n))
            k = n
        self.fired[site.component] += 1
        return regularize(g, site.rule, self.gamma[site.component], k)

    def _install(self, bound: BoundSite) -> list[Any]:
        site = bound.site

        def on_output(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: self._transform(bound, g))

        def on_softmax_output(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            node = out.grad_fn
            # Only a softmax directly upstream means Z = the pre-softmax scores; anything else
            # (fused kernel, a timm change) leaves the counter at zero and the probe fails.
            if node is not None and node.name() == "SoftmaxBackward0":
                node.register_hook(lambda gin, gout: (self._transform(bound, gin[0]),))

        def on_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            x = args[0]
            if not x.requires_grad:
                return None
            z = x.view_as(x)  # a private alias: only the gradient into this module is edited
            z.register_hook(lambda g: self._transform(bound, g))
            return (z, *args[1:])

        if site.where == OUTPUT:
            return [bound.module.register_forward_hook(on_output)]
        if site.where == SOFTMAX_INPUT:
            return [bound.module.register_forward_hook(on_softmax_output)]
        if site.where == INPUT:
            return [bound.module.register_forward_pre_hook(on_input)]
        raise ValueError(site.where)

    def _probe(self, model: nn.Module) -> None:
        """One image forward and backward before any work: every configured component must
        fire and k must fit the positions of every site."""
        size = getattr(model, "input_size", 224)
        device = next(iter(model.buffers()), torch.empty(0)).device
        x = torch.full((1, 3, size, size), 0.5, device=device, requires_grad=True)
        # Break symmetry so extremes are well defined; the values do not matter.
        with torch.no_grad():
            x.add_(torch.linspace(-0.1, 0.1, x.numel(), device=device).view_as(x))
        model(x).logsumexp(-1).sum().backward()
        self.check(stage="probe")
        self.fired.clear()

    def check(self, stage: str = "run") -> None:
        silent = [c for c in self.components if self.fired[c] == 0]
        if silent:
            raise UserError(
                f"TGR component(s) {silent} never fired on the {getattr(self, '_family', '?')} "
                f"source during the {stage}: the regularizer would silently do nothing. Is fused "
                f"attention still on, or did the timm version change the module layout of "
                f"tgr_bench/architectures.py? Fired counts: {dict(self.fired)}."
            )
        if self._too_few:
            worst = min(self._too_few.items(), key=lambda kv: kv[1])
            raise UserError(
                f"attack.k={self.k} is larger than the {worst[1]} positions available to the "
                f"{worst[0]} component of this source; use attack.k<={worst[1]}."
            )

    @contextlib.contextmanager
    def source_context(self, model: nn.Module) -> Iterator[None]:
        net = getattr(model, "net", model)
        family = family_of(net)
        self._family = family.name
        self._sites = [
            b for b in bind_sites(net, family, self.variant) if b.site.component in self.components
        ]
        previous = set_fused_attn(net, False)
        handles = [h for b in self._sites for h in self._install(b)]
        try:
            self._probe(model)
            yield
            self.check()
        finally:
            for h in handles:
                h.remove()
            for m, flag in previous:
                m.fused_attn = flag
