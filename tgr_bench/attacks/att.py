"""ATT: Adaptive Token Tuning (Ming et al., NeurIPS 2024), docs/att.md. Official code: GitHub
MisterRpeng/ATT, `methods.py` class `ATT` (and `attack.py` for `--lam`).

ATT is MI-FGSM with two changes.
- The source's backward pass is edited at the modules the release hooks (the sites of TGR's
  `official` rows, plus CaiT's class-attention `q`): every gradient G there is multiplied by a
  per-family weaken factor (attention, qkv, MLP), the deepest attention layers by 0
  (truncation), and then the extreme positions (as TGR's: argmax/argmin rows and columns of an
  attention map, tokens per channel) by the gradient penalty factor
  GPF = clamp(gamma + lambda * (1 - sqrt(var(G') / var_prev)), 0, 1), G' the weakened gradient
  and var_prev the variance of the edited gradient at the previously processed (deeper) site of
  the same kind (GPF = gamma where there is none yet, or it is 0).
- A self-paced PatchOut of the perturbation: an importance map of the clean image at one block
  gives each patch a value t in [offset, offset + scale]; at step i the patch keeps its
  perturbation when a uniform draw u satisfies u <= keep_start - (keep_start - t) (i + 1) / steps.

Departures from the release (docs/att.md): extremes, variances and GPF are per image (the
release reads sample 0 and takes one variance over the whole batch tensor); the variances start
fresh at every forward pass of the source, the importance pass included (the release carries
the previous image's last values into it); the PatchOut draws are keyed per image (draws.py)
instead of `torch.manual_seed(i)` shared by the batch. At batch 1 the edited gradient and, for
the same uniforms, the masks are the release's. Everything is torch ops: no host syncs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench.attacks.architectures import (
    CAIT_SITES,
    HEADS_PER_KEY,
    OUTPUT,
    ROWCOL,
    SOFTMAX_INPUT,
    SPATIAL,
    TOKENS,
    VISFORMER_SITES,
    VIT_SITES,
    BlockGroup,
    BoundSite,
    Family,
    Site,
    bind_sites,
    containers,
)
from tgr_bench.attacks.base import MISettings
from tgr_bench.attacks.draws import mix
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.attacks.tgr import extreme_indices
from tgr_bench.errors import UserError
from tgr_bench.schema import AUTO, key

KINDS = ("attn", "qkv", "mlp")  # the weaken factors and the three variance chains
IMPORTANCE = ("gradient", "feature")
BIAS = "bias"  # CaiT class-attention q: its hook reached only the bias gradient (B, C)
_DRAW_TAG = 0x415454  # "ATT": separates these draws from the other draws of an image's key


@dataclass(frozen=True)
class Official:
    """The release's per-model settings (`_register_model`, methods.py:110-138, and the hooks'
    blocks, methods.py:291-339, 400-411)."""

    weaken: tuple[float, float, float]  # (attn, qkv, mlp)
    truncated: int  # the deepest attention layers multiplied by 0: length - num of TR_01_PC
    scale: float  # PatchOut: importance normalized to [offset, offset + scale]
    offset: float
    block: int  # the block of the importance map, counted from the last of the main stream
    importance: str  # gradient: features x gradient; feature: features x features


# DeiT is built by timm's VisionTransformer (the `vit` family): the release hooks it but has no
# settings for it (methods.py:291), so it takes the ViT row; its two prefix tokens come from the
# network. ViT-B blocks[10] of 12, PiT-B transformers[2].blocks[2] (12th of 13) and Visformer-S
# stage3[2] (14th of 15) are the second-to-last block; CaiT-S24 blocks[23] is its last patch
# block (methods.py:293-330).
OFFICIAL: dict[str, Official] = {
    "vit": Official((0.45, 0.7, 0.65), 2, 0.4, 0.4, 2, "gradient"),  # methods.py:115-120
    "pit": Official((0.25, 0.6, 0.65), 4, 0.3, 0.45, 2, "gradient"),  # methods.py:121-126
    "cait": Official((0.3, 1.0, 0.6), 21, 0.35, 0.4, 1, "feature"),  # methods.py:127-132
    "visformer": Official((0.4, 0.8, 0.3), 0, 0.15, 0.25, 2, "feature"),  # methods.py:133-138
}

# The release's hooked modules. CaiT's class-attention block: the attention scores, q (whose
# legacy hook edited only the bias gradient, so it only feeds the qkv variance chain), k, v and
# the one-token MLP; its loop over range(26) skipped index 24, class block 0 (methods.py:317-327).
CAIT_CLASS_SITES = (
    Site("attn", "attn.attn_drop", SOFTMAX_INPUT, HEADS_PER_KEY),
    Site("qkv", "attn.q", OUTPUT, BIAS),
    Site("qkv", "attn.k", OUTPUT, TOKENS),
    Site("qkv", "attn.v", OUTPUT, TOKENS),
    Site("mlp", "mlp", OUTPUT, TOKENS),
)
SITES: dict[str, tuple[BlockGroup, ...]] = {
    "vit": (BlockGroup("blocks", VIT_SITES),),
    "pit": (BlockGroup("transformers.*.blocks", VIT_SITES),),
    # Talking heads: the edited map is attn_drop's input in (B, N, N, heads) layout, the same
    # entries as its output gradient in (B, heads, N, N), which ROWCOL reads identically.
    "cait": (BlockGroup("blocks", CAIT_SITES), BlockGroup("blocks_token_only", CAIT_CLASS_SITES)),
    "visformer": (
        BlockGroup("stage2", VISFORMER_SITES, needs="attn"),
        BlockGroup("stage3", VISFORMER_SITES, needs="attn"),
    ),
}
# The main stream's blocks in forward order: where the importance block is counted from.
MAIN_BLOCKS = {
    "vit": ("blocks",),
    "pit": ("transformers.*.blocks",),
    "cait": ("blocks",),
    "visformer": ("stage1", "stage2", "stage3"),
}


# ---- settings ----------------------------------------------------------------------------------
_WEAKEN = "factor of every hooked gradient of this kind; auto: "
_SCALE = "patch values span [offset, offset + scale]; auto: "
_OFFSET = "the least important patch's value; auto: "


@dataclass(frozen=True)
class Weaken:
    """The factor of every hooked gradient, per kind; auto: the source family's release value."""

    attn: float = key(
        AUTO, auto=True, low=0, high=1, help=_WEAKEN + "ViT .45, PiT .25, CaiT .3, Visformer .4"
    )
    qkv: float = key(
        AUTO, auto=True, low=0, high=1, help=_WEAKEN + "ViT .7, PiT .6, CaiT 1, Visformer .8"
    )
    mlp: float = key(
        AUTO, auto=True, low=0, high=1, help=_WEAKEN + "ViT .65, PiT .65, CaiT .6, Visformer .3"
    )


@dataclass(frozen=True)
class SelfPacedPatchOut:
    """ATT's self-paced semantic PatchOut (on by default)."""

    enabled: bool = key(True, help="false: no PatchOut, token tuning only")
    scale: float = key(
        AUTO, auto=True, low=0, high=1, help=_SCALE + "ViT .4, PiT .3, CaiT .35, Visformer .15"
    )
    offset: float = key(
        AUTO, auto=True, low=0, high=1, help=_OFFSET + "ViT .4, PiT .45, CaiT .4, Visformer .25"
    )
    keep_start: float = key(0.99, low=0, high=1, help="keep probability before the first step")
    patch_size: int = key(16, low=1)
    block: int = key(
        AUTO,
        auto=True,
        low=1,
        help="importance map at this block counted from the last (1) of the main stream; "
        "auto: 2, CaiT 1",
    )
    importance: str = key(
        AUTO,
        options=(AUTO, *IMPORTANCE),
        help="gradient: features x gradient of the logit sum; feature: squared feature norm; "
        "auto: gradient on ViT/DeiT/PiT, feature on CaiT/Visformer (as released)",
    )


@dataclass(frozen=True)
class ATTSettings(MISettings):
    """attack=att: adaptive token tuning and the self-paced PatchOut on the MI-FGSM loop."""

    name: str = key("att")
    gamma: float = key(0.5, low=0, high=1, help="GPF's base factor of the extreme positions")
    lam: float = key(0.01, low=0, help="lambda of GPF (the release's --lam)")
    weaken: Weaken = key(Weaken)
    truncated: int = key(
        AUTO,
        auto=True,
        low=0,
        help="deepest attention layers whose gradient is zeroed; auto: ViT 2, PiT 4, CaiT 21, "
        "Visformer 0",
    )
    # Replaces the base loop's random PatchOut group: attack.patchout.* are ATT's keys here.
    patchout: SelfPacedPatchOut = key(  # type: ignore[assignment]
        SelfPacedPatchOut, help="ATT's self-paced PatchOut"
    )


# ---- the token tuning --------------------------------------------------------------------------
def per_image_var(g: torch.Tensor) -> torch.Tensor:
    """(B,) unbiased variance of each sample (the release: one torch.var of the whole batch)."""
    return g.flatten(1).var(dim=1)


def penalty_factor(
    var_now: torch.Tensor, var_prev: torch.Tensor | None, gamma: float, lam: float
) -> torch.Tensor:
    """GPF per image (methods.py:143-146): clamp(gamma + lam (1 - sqrt(now / prev)), 0, 1), and
    gamma where prev is 0 or there is no previous site of this kind in the pass."""
    base = torch.full_like(var_now, gamma)
    if var_prev is None:
        return base
    adaptive = (gamma + lam * (1 - torch.sqrt(var_now / var_prev))).clamp(0, 1)
    return torch.where(var_prev != 0, adaptive, base)


def _times_at(g: torch.Tensor, hit: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """g times factor where `hit`, exactly g elsewhere (times 1.0), as the release's in-place
    multiplications of indexed entries."""
    return g * torch.where(hit, factor, torch.ones_like(factor))


def tune_rows_cols(g: torch.Tensor, gpf: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, M): per image and head, the row and the column through the flat argmax,
    then through the argmin, multiplied by GPF in the release's order (max row, max column, min
    row, min column; methods.py:147-160), so that an entry on k of these lines gets GPF^k."""
    b, h, n, m = g.shape
    idx = extreme_indices(g.reshape(b, h, n * m), -1, 1)  # (B, heads, 2): max, min
    factor = gpf.view(b, 1, 1, 1)
    rows = torch.arange(n, device=g.device).view(1, 1, n, 1)
    cols = torch.arange(m, device=g.device).view(1, 1, 1, m)
    for j in (0, 1):
        at = idx[..., j].view(b, h, 1, 1)
        g = _times_at(g, rows == at // m, factor)
        g = _times_at(g, cols == at % m, factor)
    return g


def tune_extremes(g: torch.Tensor, dim: int, gpf: torch.Tensor) -> torch.Tensor:
    """Per image, along `dim`, the argmax then the argmin entry multiplied by GPF (the same entry
    twice when they coincide): tokens per channel of (B, N, C) (methods.py:235-242, 267-275),
    heads per key of CaiT's (B, heads, 1, N) class attention (methods.py:190-198)."""
    idx = extreme_indices(g, dim, 1)
    factor = gpf.view(-1, *([1] * (g.dim() - 1)))
    for j in (0, 1):
        where = idx.narrow(dim, j, 1)
        hit = torch.zeros_like(g, dtype=torch.bool).scatter_(dim, where, True)
        g = _times_at(g, hit, factor)
    return g


def tune(g: torch.Tensor, rule: str, gpf: torch.Tensor) -> torch.Tensor:
    """The extremes of the weakened gradient g multiplied by GPF, by layout."""
    if rule == ROWCOL:
        return tune_rows_cols(g, gpf)
    if rule == TOKENS:
        return tune_extremes(g, 1, gpf)
    if rule == HEADS_PER_KEY:
        return tune_extremes(g, 1, gpf)
    if rule == SPATIAL:  # (B, C, H, W): positions per channel (methods.py:222-233, 255-265)
        return tune_extremes(g.flatten(2), 2, gpf).view_as(g)
    raise ValueError(rule)


# ---- the self-paced PatchOut -------------------------------------------------------------------
def patch_means(importance: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, H, W) -> (B, H/p, W/p): each patch's mean, its pixels taken row-major as the
    release's Patch_index / torch.take (methods.py:361-391)."""
    b, h, w = importance.shape
    gh, gw = h // patch, w // patch
    tiles = importance.view(b, gh, patch, gw, patch).permute(0, 1, 3, 2, 4)
    return tiles.reshape(b, gh * gw, patch * patch).mean(-1).view(b, gh, gw)


def keep_values(importance: torch.Tensor, patch: int, scale: float, offset: float) -> torch.Tensor:
    """norm_patchs (methods.py:383-391) per image: (B, H/p, W/p) patch values t, the patch means
    min-max normalized over the image's patches, times scale plus offset. A map whose patches
    all have the same mean gives 0 / 0 = NaN, which keeps every patch at every step, as released.
    """
    means = patch_means(importance, patch)
    flat = means.flatten(1)
    low = flat.amin(1).view(-1, 1, 1)
    high = flat.amax(1).view(-1, 1, 1)
    return scale * ((means - low) / (high - low)) + offset


def keep_masks(
    t: torch.Tensor, uniforms: torch.Tensor, step: int, steps: int, keep_start: float
) -> torch.Tensor:
    """(B, H/p, W/p) 0/1: a patch is kept (1) unless u > keep_start - ((keep_start - t) / steps)
    (step + 1), the release's float operations (methods.py:414-415, 441-442)."""
    start = torch.full_like(t, keep_start)
    offset = (start - t) / steps
    return torch.where(uniforms > start - offset * (step + 1), 0.0, 1.0)


def patch_uniforms(
    seeds: Sequence[int], step: int, grid: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(B, H/p, W/p) uniforms in [0, 1), each image from its own generator keyed by its seed and
    the step (the release: torch.manual_seed(step), then rand(14, 14), shared by the batch)."""
    rows = []
    for s in seeds:
        gen = torch.Generator(device).manual_seed(mix(s, step, _DRAW_TAG) % (1 << 62))
        rows.append(torch.rand(grid, generator=gen, device=device))
    return torch.stack(rows)


def token_grid(scores: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, N) per-token scores -> (B, s, s) without the `prefix` class/distillation tokens."""
    tokens = scores[:, prefix:]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise UserError(
            f"ATT's PatchOut: {tokens.shape[1]} tokens at the importance block are not a square "
            f"grid; choose another attack.patchout.block or attack.patchout.enabled=false."
        )
    return tokens.reshape(-1, side, side)


class ATT(GradientHookAttack):
    name = "att"
    Settings = ATTSettings
    needs = "attn"  # the transformer families; residual CNNs have no attention to tune
    reference = (
        "ATT: Ming et al., Boosting the Transferability of Adversarial Attack on Vision "
        "Transformer with Adaptive Token Tuning, NeurIPS 2024"
    )

    def __init__(self, settings: ATTSettings | None = None, family: Family | None = None) -> None:
        super().__init__(settings, family)
        s: ATTSettings = self.settings  # type: ignore[assignment]
        official = OFFICIAL[self.family.name]
        self.gamma, self.lam = float(s.gamma), float(s.lam)
        self.weaken = {
            c: official.weaken[i] if getattr(s.weaken, c) == AUTO else float(getattr(s.weaken, c))
            for i, c in enumerate(KINDS)
        }
        self.truncated = official.truncated if s.truncated == AUTO else int(s.truncated)
        self._truncated_auto = s.truncated == AUTO
        self.patchout = None  # the base loop's random PatchOut: ATT has its own
        po = s.patchout
        self.spo: SelfPacedPatchOut | None = None
        if po.enabled:
            self.spo = dataclasses.replace(
                po,
                scale=official.scale if po.scale == AUTO else float(po.scale),
                offset=official.offset if po.offset == AUTO else float(po.offset),
                block=official.block if po.block == AUTO else int(po.block),
                importance=official.importance if po.importance == AUTO else po.importance,
            )
        self._var: dict[str, torch.Tensor | None] = dict.fromkeys(KINDS)
        self._factor: dict[str, float] = {}  # per bound site: weaken (times 0 if truncated)
        self._zeroed = 0  # attention layers truncated on the bound source
        self._feature: tuple[str, nn.Module] | None = None
        self._prefix = 0
        self._keep: torch.Tensor | None = None  # (B, H/p, W/p) patch values of the batch

    def params(self) -> dict[str, Any]:
        p = {
            **super().params(),
            "gamma": self.gamma,
            "lam": self.lam,
            **{f"weaken_{c}": self.weaken[c] for c in KINDS},
            "truncated": self.truncated,
        }
        if self.spo is None:
            return {**p, "patchout": False}
        return {
            **p,
            "patchout_scale": self.spo.scale,
            "patchout_offset": self.spo.offset,
            "patchout_keep_start": self.spo.keep_start,
            "patchout_size": self.spo.patch_size,
            "patchout_block": self.spo.block,
            "patchout_importance": self.spo.importance,
        }

    def stats(self) -> dict[str, Any]:
        feature = {"att_importance_block": self._feature[0]} if self._feature else {}
        return {**super().stats(), "att_truncated_layers": self._zeroed, **feature}

    # ---- sites -------------------------------------------------------------------------------
    def sites(self, net: nn.Module, family: Family) -> list[BoundSite]:
        table = dataclasses.replace(family, tgr=SITES[family.name])
        bound = [
            b
            for b in bind_sites(net, table, "official")
            if not b.name.startswith("blocks_token_only.0.")
        ]
        attention = [b.name for b in bound if b.site.component == "attn"]
        if not self._truncated_auto and self.truncated > len(attention) - 1:
            raise UserError(
                f"attack.truncated={self.truncated}: this {family.name} source has "
                f"{len(attention)} attention layers, and ATT keeps at least the shallowest; use "
                f"attack.truncated<={len(attention) - 1}, or auto."
            )
        # auto: at most all but the shallowest, so that the release's counts on shallower
        # sources (the tests' tiny ones) do not remove every attention gradient.
        self._zeroed = min(self.truncated, len(attention) - 1)
        zeroed = set(attention[len(attention) - self._zeroed :]) if self._zeroed else set()
        self._factor = {
            b.name: 0.0 if b.name in zeroed else self.weaken[b.site.component] for b in bound
        }
        if self.spo is not None:
            self._feature, self._prefix = self._feature_block(net, family)
        return bound

    def _feature_block(self, net: nn.Module, family: Family) -> tuple[tuple[str, nn.Module], int]:
        assert self.spo is not None
        blocks = [
            (f"{where}.{i}", child)
            for path in MAIN_BLOCKS[family.name]
            for where, container in containers(net, path)
            for i, child in enumerate(container.children())
        ]
        if self.spo.block > len(blocks):
            raise UserError(
                f"attack.patchout.block={self.spo.block}: the {family.name} source has "
                f"{len(blocks)} blocks; choose 1..{len(blocks)} (counted from the last)."
            )
        if family.name == "vit":
            prefix = int(getattr(net, "num_prefix_tokens", 1))
        elif family.name == "pit":
            prefix = int(net.cls_token.shape[1])
        else:  # CaiT's patch blocks carry no class token; Visformer's maps are spatial
            prefix = 0
        return blocks[-self.spo.block], prefix

    # ---- the edit ----------------------------------------------------------------------------
    def _fresh(self, *_: Any) -> None:
        """A forward pass of the source starts with no previous site of any kind (the release
        resets before every step, methods.py:425-427)."""
        self._var = dict.fromkeys(KINDS)

    def edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        site = bound.site
        kind = site.component
        if self._factor[bound.name] == 0.0 and site.rule != BIAS:
            # A truncated layer: its gradient, and so its variance, is zero whatever the tuning.
            self._var[kind] = g.new_zeros(len(g))
            return torch.zeros_like(g)
        out = g * self._factor[bound.name]
        gpf = penalty_factor(per_image_var(out), self._var[kind], self.gamma, self.lam)
        if site.rule == BIAS:
            # q_ATT (methods.py:202-212): the whole bias gradient times GPF, which only updates
            # the qkv chain; the image gradient passes unchanged.
            self._var[kind] = per_image_var(out * gpf.view(-1, 1))
            return g
        out = tune(out, site.rule, gpf)
        self._var[kind] = per_image_var(out)
        return out

    @contextlib.contextmanager
    def source_context(self, model: nn.Module) -> Iterator[None]:
        net = getattr(model, "net", model)
        handle = net.register_forward_pre_hook(self._fresh)
        try:
            with super().source_context(model):
                yield
        finally:
            handle.remove()

    # ---- the self-paced PatchOut -------------------------------------------------------------
    def importance(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) importance of the clean images (methods.py:397-411): at the feature block,
        features x gradient of the sum of the logits through the edited backward ("gradient"),
        or the squared feature norm ("feature"), per token or position, resized to the image
        (bilinear, align_corners=False, as torchvision's Resize on a tensor)."""
        if self.spo is None or self._feature is None:
            raise RuntimeError("ATT's PatchOut needs the bound source: perturb in source_context")
        seen: dict[str, torch.Tensor] = {}
        handle = self._feature[1].register_forward_hook(
            lambda m, a, out: seen.__setitem__("fea", out)
        )
        try:
            if self.spo.importance == "gradient":
                with torch.enable_grad():
                    logits = model(x.detach().requires_grad_(True))
                    (other,) = torch.autograd.grad(logits.sum(), seen["fea"])
                fea = seen["fea"].detach()
            else:
                with torch.no_grad():
                    model(x)
                fea = other = seen["fea"]
        finally:
            handle.remove()
        if fea.dim() == 4:  # Visformer (B, C, h, w)
            grid = (fea * other).sum(1)
        else:
            grid = token_grid((fea * other).sum(-1), self._prefix)
        size = tuple(x.shape[-2:])
        return F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        assert self.spo is not None
        p = self.spo.patch_size
        if height % p or width % p:
            raise UserError(
                f"attack.patchout.patch_size={p} does not tile {height}x{width} images."
            )
        return height // p, width // p

    def masks(self, step: int, seeds: Sequence[int], device: torch.device) -> torch.Tensor:
        """(B, 1, H, W) PatchOut masks of the current batch at `step`."""
        assert self.spo is not None and self._keep is not None
        u = patch_uniforms(seeds, step, tuple(self._keep.shape[1:]), device)
        keep = keep_masks(self._keep, u, step, self.steps, self.spo.keep_start)
        p = self.spo.patch_size
        return keep.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)

    def model_input(
        self, x: torch.Tensor, delta: torch.Tensor, step: int, seeds: Sequence[int]
    ) -> torch.Tensor:
        if self._keep is None:
            return super().model_input(x, delta, step, seeds)
        return x + delta * self.masks(step, seeds, x.device)  # methods.py:443

    def perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        seeds: Sequence[int],
        ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        if self.spo is not None:
            self._grid(*x.shape[-2:])
            self._keep = keep_values(
                self.importance(model, x), self.spo.patch_size, self.spo.scale, self.spo.offset
            )
        try:
            return super().perturb(model, x, y, seeds, ids)
        finally:
            self._keep = None
