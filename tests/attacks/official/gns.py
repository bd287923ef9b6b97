"""Reference port of the released GNS-HFA code (Gradient Normalization Scaling + High-Frequency
Adaptation, ICLR 2024, OpenReview 1BuWv9poWz) for tests.

The authors' repository (GitHub `GNS-HFA`, last commit 645401e) holds the attack in `methods.py`
class `GNS_HFE` (lines 475-699), the spectrum transform in `dct.py` and the entry point in
`attack.py`. Its environment pins torch 1.7.1+cu110, timm 0.4.12 and numpy 1.19.5
(`environment.yml` lines 85, 103-104). Line numbers below cite that commit: `M` methods.py,
`D` dct.py, `A` attack.py.

What the release computes, per step t (M 646-697):

* GNS (M 502-627, active with `--scale`, which the README command passes): legacy
  `register_backward_hook`s. Under torch 1.7.1 such a hook edits `grad_in[0]` of the autograd
  node that produced the module's output:
  - `attn.attn_drop` (dropout, identity in eval): the node is the softmax, so the pre-softmax
    scores' gradient is scaled by 0.5 (M 503-506, 561); in CaiT's talking-heads blocks the node
    is the permute after `proj_w`, so the mixed map's gradient is scaled by 0.5 (same hook);
    CaiT's class-attention map: 0.5 (M 508-513, 562);
  - `mlp` (ends with fc2 + dropout): the fc2 output's gradient x 0.5 (M 551-559, 565); Visformer's
    MLP ends with the bias-free 1x1 conv `conv3`, so the conv3 *input* gradient x 0.5;
  - `attn.qkv` (ViT, PiT, CaiT blocks), `attn.k` and `attn.v` (CaiT class block): the Linear
    output's gradient G (B, N, C) gets the per-channel factor of `official_qkv_factor` (M 535-545);
    Visformer's `attn.qkv` is a bias-free 1x1 conv, so the rule acts on its *input* gradient
    (B, C, H, W) (M 522-532); DeiT's model name reaches neither branch: its qkv hook returns the
    gradient unchanged (M 547-549);
  - `attn.q` of CaiT's class block is a Linear on the 2-D class token, whose node is `addmm`;
    `grad_in[0]` is the *bias* gradient, so the 0.5 (M 515-519, 564) never reaches the image.
  Only `blocks_token_only[1]` of CaiT is hooked: the loop skips index 24 (M 593-611).
* HFA (M 650-681): N = 20 spectrum samples of the current point x = clean + delta:
  x_n = idct_2d(dct_2d(x + 16/255 * z_n) * (u_n * msk * 2 rho + 1 - rho)), rho = 0.5, z_n
  standard normal, u_n uniform on [0, 1); the gradient of the mean cross-entropy w.r.t. each x_n
  (a detached leaf, M 672) is averaged over n.
* The MI-FGSM update on that average (M 687-697), as tgr-bench's loop.

The released `forward` reads `perts` before assigning it (M 651): a merge (0a8b108) of two
parallel commits dropped `perts = torch.zeros_like(unnorm_inps)` (present in d525171 and in the
commented version of the first upload, aafa439 lines 748-749). This port assumes that line: the
first step is at delta = 0.

Modern torch runs a Linear on a contiguous (B, N, C) input as `addmm` on a (B*N, C) view and
reshapes the result, so the output's node is a view whose input gradient is flattened; the port
reshapes it to (B, N, C) before applying the rule, which is what the torch 1.7.1 hook saw (the
node of the in-place bias add). Every hook checks the node kind, so a timm or torch change that
moves the edit fails loudly instead of editing another tensor.

Block loops with fixed counts (12 ViT blocks, 3 + 6 + 4 PiT blocks, 24 CaiT blocks, 4 + 4
Visformer blocks) run here over the network's own blocks, so the same rules run on the tiny
sources of tests/tiny.py.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench.attacks.hooks import set_fused_attn

# ---- constants of the release ----------------------------------------------------------------
U_CLASS_DEFAULT = 0.6  # GNS_HFE(..., u=0.6) (M 476); the value of every earlier version too
U_COMMAND_LINE = 1.0  # attack.py's --u default (A 37), always passed to GNS_HFE (A 60)
N_SAMPLES = 20  # N (M 476, A 38)
SIGMA_LEVELS = 16  # the Gaussian noise std in 0-255 levels: randn * (16 / 255) (M 488, 653-654)
RHO = 0.5  # the spectrum multiplier's half-width (M 489)
MODES = ("", "noise", "search", "both")  # --mhf (A 35); the README command passes `search`

# Per family: the 0.5 factors (M 561-565) and which branch of the qkv hook applies (M 522, 535):
# "tokens" = (B, N, C) with channel stats over dims [0, 1]; "spatial" = (B, C, H, W) over
# [0, 2, 3]; None = no branch (DeiT: the hook returns the gradient unchanged).
_SCALES = {"attn": 0.5, "mlp": 0.5, "q": 0.5}
CONSTANTS: dict[str, dict[str, Any]] = {
    "vit": {**_SCALES, "qkv_rule": "tokens"},  # vit_base_patch16_224
    "deit": {**_SCALES, "qkv_rule": None},  # deit_base_distilled_patch16_224
    "pit": {**_SCALES, "qkv_rule": "tokens"},  # pit_b_224
    "cait": {**_SCALES, "qkv_rule": "tokens"},  # cait_s24_224
    "visformer": {**_SCALES, "qkv_rule": "spatial"},  # visformer_small
}
FAMILIES = tuple(CONSTANTS)

# The autograd node that produces each hooked module's output (the node the legacy hook sat on),
# by role: torch 1.7.1 names / the names under torch 2.x with timm 1.x.
_LINEAR_3D = {"AddBackward0", "ViewBackward0", "UnsafeViewBackward0"}  # in-place bias add / view
_NODES = {
    "attn": {"SoftmaxBackward0"},
    "attn_talking_heads": {"PermuteBackward0"},
    "qkv": _LINEAR_3D,
    "mlp": _LINEAR_3D,
    "q": {"AddmmBackward0"},
    "conv": {"ConvolutionBackward0", "CudnnConvolutionBackward"},
}


# ---- where the release hooked ------------------------------------------------------------------
def official_sites(net: nn.Module, family: str) -> list[tuple[str, str, nn.Module]]:
    """(role, name, module) of every hooked module, block by block in forward order (M 567-627).

    Roles: `attn` (x attn scale), `qkv` (the qkv rule), `mlp` (x mlp scale), `q` (x q scale on
    the bias gradient only). ViT/DeiT: `blocks[*]` (M 567-574); PiT: `transformers[*].blocks[*]`
    (M 575-591); CaiT: `blocks[*]` (M 592-600) and `blocks_token_only[1]` only (M 601-611:
    `block_ind > 24` skips 24); Visformer: `stage2[*]`, `stage3[*]` (M 612-627), blocks with
    attention (every one in visformer_small, attn_stage '011').
    """
    if family not in CONSTANTS:
        raise ValueError(f"family {family!r}: the release supports {FAMILIES}")
    sites: list[tuple[str, str, nn.Module]] = []

    def block(prefix: str, blk: nn.Module, roles: tuple[tuple[str, str], ...]) -> None:
        for role, path in roles:
            module: Any = blk
            for part in path.split("."):
                module = getattr(module, part)
            sites.append((role, f"{prefix}.{path}", module))

    vit_roles = (("attn", "attn.attn_drop"), ("qkv", "attn.qkv"), ("mlp", "mlp"))
    if family in ("vit", "deit"):
        for i, blk in enumerate(net.blocks):
            block(f"blocks.{i}", blk, vit_roles)
    elif family == "pit":
        for t, stage in enumerate(net.transformers):
            for i, blk in enumerate(stage.blocks):
                block(f"transformers.{t}.blocks.{i}", blk, vit_roles)
    elif family == "cait":
        for i, blk in enumerate(net.blocks):
            block(f"blocks.{i}", blk, vit_roles)
        if len(net.blocks_token_only) < 2:
            raise ValueError("the release hooks blocks_token_only[1]: this CaiT has fewer")
        block(
            "blocks_token_only.1",
            net.blocks_token_only[1],
            (
                ("attn", "attn.attn_drop"),
                ("q", "attn.q"),
                ("qkv", "attn.k"),
                ("qkv", "attn.v"),
                ("mlp", "mlp"),
            ),
        )
    else:  # visformer
        for stage in ("stage2", "stage3"):
            for i, blk in enumerate(getattr(net, stage)):
                if getattr(blk, "attn", None) is not None:
                    block(f"{stage}.{i}", blk, vit_roles)
    return sites


def _expected_nodes(family: str, role: str, name: str) -> set[str]:
    if family == "visformer" and role in ("qkv", "mlp"):
        return _NODES["conv"]  # bias-free 1x1 convs: the hook edits their input gradient
    if family == "cait" and role == "attn" and name.startswith("blocks."):
        return _NODES["attn_talking_heads"]
    return _NODES[role]


# ---- GNS: the qkv rule ----------------------------------------------------------------------
def official_qkv_factor(g: torch.Tensor, rule: str, u: float) -> torch.Tensor:
    """The per-channel factor of the qkv hook (M 522-531 `spatial`, M 535-544 `tokens`).

    c_mu[c] = mean of |g| over the batch AND the positions (dims [0, 1] of (B, N, C), [0, 2, 3]
    of (B, C, H, W)): one set of statistics for the whole batch, not per image. Then, in numpy
    float32, mu = mean_c c_mu and sigma = np.std(c_mu) (population, ddof 0) over the channels;
    factor = 1 where c_mu > mu + u * sigma (strict), else tanh(|c_mu - mu| / sigma). numpy 1.19
    computed mu + u * sigma in float64 and compared in float32 (value-based casting), which the
    explicit casts below reproduce under numpy 2. sigma = 0 gives nan/inf as in the release.
    """
    dims = {"tokens": [0, 1], "spatial": [0, 2, 3]}[rule]
    c_mus = torch.mean(g.detach().abs(), dim=dims).cpu().numpy()  # M 524 / 537
    mu = np.mean(c_mus)  # float32 (M 525 / 538)
    std = np.std(c_mus)  # float32, ddof 0 (M 526 / 539)
    threshold = np.float32(np.float64(mu) + u * np.float64(std))  # M 527 / 540
    above = c_mus > threshold  # M 528 / 541
    with np.errstate(divide="ignore", invalid="ignore"):
        c_temp = np.tanh(np.abs((c_mus - mu) / std))  # M 529 / 542 (float32)
    factor = above.astype(np.float32)  # M 530 / 543
    factor[~above] = c_temp[~above]  # M 531 / 544: `c_factor == False` picks the 0.0 entries
    return torch.from_numpy(factor).to(g.device)


def _apply_qkv_rule(g: torch.Tensor, rule: str, u: float) -> tuple[torch.Tensor, torch.Tensor]:
    factor = official_qkv_factor(g, rule, u)
    if rule == "tokens":
        return g * factor.view(1, 1, -1), factor  # M 545
    return g * factor.view(1, -1, 1, 1), factor  # M 532


# ---- the hooks ---------------------------------------------------------------------------------
@contextlib.contextmanager
def official_hooks(
    net: nn.Module,
    family: str,
    u: float = U_CLASS_DEFAULT,
    *,
    record: dict[str, Any] | None = None,
    **constants: Any,
) -> Iterator[list[tuple[str, str, nn.Module]]]:
    """Install the release's GNS edits on `net` (fused attention off) for the body of the block.

    Each hook sits where the legacy hook did: a forward hook takes the module's output and
    registers a post-hook on the autograd node that produced it, replacing that node's first
    input gradient (`grad_in[0]`, M 503-559). `constants` override CONSTANTS[family] (`attn`,
    `mlp`, `q`, `qkv_rule`: "tokens", "spatial" or None). `record`, if given, receives `fired`
    (a Counter of edits per site name) and `factors` (site name -> list of qkv factors).
    """
    settings = {**CONSTANTS[family], **constants}
    unknown = set(settings) - set(CONSTANTS[family])
    if unknown:
        raise TypeError(f"unknown constants {sorted(unknown)}")
    sites = official_sites(net, family)
    fired: Counter[str] = Counter()
    factors: dict[str, list[torch.Tensor]] = {}
    if record is not None:
        record["fired"] = fired
        record["factors"] = factors

    def edit(role: str, name: str, g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        fired[name] += 1
        if role == "qkv":
            rule = settings["qkv_rule"]
            if rule is None:
                return g  # M 547-549: the gradient comes back unchanged
            # torch 2.x: the Linear output's node is a view with a (B*N, C) input gradient;
            # torch 1.7.1's hook saw it as (B, N, C) (M 536: `grad_in[0].shape[2]`).
            seen = g.reshape(shape) if rule == "tokens" else g
            edited, factor = _apply_qkv_rule(seen, rule, u)
            factors.setdefault(name, []).append(factor)
            return edited.reshape(g.shape)
        return g * settings[role]  # M 504-505, 517-518, 552-553: ones_like(g) * gamma * g

    def install(role: str, name: str, module: nn.Module) -> Any:
        expected = _expected_nodes(family, role, name)

        def on_output(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            node = out.grad_fn
            if node is None:
                return
            if node.name() not in expected:
                raise RuntimeError(
                    f"{name}: the output comes from {node.name()}, not {sorted(expected)}: the "
                    f"legacy hook of the release would edit another tensor here"
                )
            shape = out.shape

            def post(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> Any:
                g = grad_inputs[0]
                if g is None:  # q: the bias gradient, absent when parameters are frozen
                    fired[name] += 1
                    return None
                if role == "qkv" and settings["qkv_rule"] == "spatial":
                    shape_here = g.shape  # Visformer: the conv input gradient (B, C, H, W)
                else:
                    shape_here = shape
                return (edit(role, name, g, shape_here), *grad_inputs[1:])

            node.register_hook(post)

        return module.register_forward_hook(on_output)

    previous = set_fused_attn(net, False)
    handles = [install(role, name, module) for role, name, module in sites]
    try:
        yield sites
    finally:
        for h in handles:
            h.remove()
        for m, flag in previous:
            m.fused_attn = flag


def _ce_gradient(model: nn.Module, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE / d inputs, CE averaged over the batch (M 678: F.cross_entropy, mean reduction)."""
    leaf = inputs.detach().clone().requires_grad_(True)
    target = y + int(getattr(model, "label_offset", 0))
    loss = F.cross_entropy(model(leaf), target)
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def official_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    family: str,
    u: float = U_CLASS_DEFAULT,
    *,
    record: dict[str, Any] | None = None,
    **constants: Any,
) -> torch.Tensor:
    """d loss / d x of the first step (delta = 0) with the release's GNS hooks, HFA off.

    x (1, 3, H, W) pixels in [0, 1], y (1,); `model` a tgr_bench PixelModel (its `net` is hooked)
    or a bare network. loss = mean cross-entropy (M 678), which equals tgr-bench's summed loss at
    batch size 1. With several images the release pools the qkv statistics over the batch
    (`official_qkv_factor`), and so does this port. The hooks are removed afterwards.
    """
    net = getattr(model, "net", model)
    with official_hooks(net, family, u, record=record, **constants):
        return _ce_gradient(model, x, y)


# ---- HFA: dct.py and the spectrum samples ------------------------------------------------------
def official_dct(x: torch.Tensor, norm: str | None = None) -> torch.Tensor:
    """DCT-II over the last dimension (D 30-61), scipy's convention for `norm`:
    None: X_k = 2 sum_n x_n cos(pi k (2n + 1) / (2N)); 'ortho': the orthonormal scaling.

    Computed as in D 41-59 with one FFT: the samples reordered as even indices ascending then odd
    indices descending, X_k = 2 Re(V_k exp(-i pi k / (2N))).
    """
    shape = x.shape
    n = shape[-1]
    rows = x.contiguous().view(-1, n)
    reordered = torch.cat([rows[:, 0::2], rows[:, 1::2].flip([1])], dim=1)
    spectrum = torch.fft.fft(reordered)
    angle = torch.arange(n, dtype=x.dtype, device=x.device)[None, :] * math.pi / (2 * n)
    coef = spectrum.real * torch.cos(angle) + spectrum.imag * torch.sin(angle)
    if norm == "ortho":
        coef[:, 0] /= math.sqrt(n) * 2
        coef[:, 1:] /= math.sqrt(n / 2) * 2
    return 2 * coef.view(shape)


def official_idct(coef: torch.Tensor, norm: str | None = None) -> torch.Tensor:
    """The inverse of `official_dct` over the last dimension (a scaled DCT-III, D 64-105):
    official_idct(official_dct(x, norm), norm) == x up to rounding."""
    shape = coef.shape
    n = shape[-1]
    half = coef.contiguous().view(-1, n) / 2
    if norm == "ortho":
        half[:, 0] *= math.sqrt(n) * 2
        half[:, 1:] *= math.sqrt(n / 2) * 2
    angle = torch.arange(n, dtype=coef.dtype, device=coef.device)[None, :] * math.pi / (2 * n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # the half-spectrum completed by its mirror: imaginary part 0, -c[N-1], ..., -c[1]
    mirror = torch.cat([torch.zeros_like(half[:, :1]), -half.flip([1])[:, :-1]], dim=1)
    real = half * cos - mirror * sin
    imag = half * sin + mirror * cos
    v = torch.fft.ifft(torch.complex(real, imag)).real
    out = torch.empty_like(v)
    out[:, 0::2] = v[:, : n - n // 2]  # even samples: the first half
    out[:, 1::2] = v.flip([1])[:, : n // 2]  # odd samples: the second half, reversed
    return out.view(shape)


def official_dct_2d(x: torch.Tensor, norm: str | None = None) -> torch.Tensor:
    """2-D DCT-II over the last two dims, width first then height (D 108-121), independently for
    every leading index (image, channel). The release calls it with norm=None (M 656, 663)."""
    return official_dct(official_dct(x, norm).transpose(-1, -2), norm).transpose(-1, -2)


def official_idct_2d(coef: torch.Tensor, norm: str | None = None) -> torch.Tensor:
    """The inverse of `official_dct_2d` (D 124-139)."""
    return official_idct(official_idct(coef, norm).transpose(-1, -2), norm).transpose(-1, -2)


def official_search_mask(h: int, w: int) -> torch.Tensor:
    """`msk` of --mhf search/both (M 665-666), (3, h, w) float32: row factor linspace(h/2, h, h)
    times column factor linspace(w/2, w, w), divided by h and w, i.e. from 0.25 at frequency
    (0, 0) to 1 at (h-1, w-1). The release hard-codes 224 (linspace(112, 224, 224) / 224 / 224);
    the same expression at the image's size reduces to it there."""
    msk = np.ones((3, h, w)) * np.linspace(h / 2, h, h)[:, np.newaxis] * np.linspace(w / 2, w, w)
    return torch.from_numpy(msk / h / w).float()


def official_noise_mask(h: int, w: int) -> torch.Tensor:
    """`msk` of --mhf noise/both (M 657-658), (3, h, w) float32: i * j / (h - 1) / (w - 1) (the
    release: arange(224) outer arange(224) / 223 / 223), applied to the noise's spectrum."""
    msk = np.ones((3, h, w)) * np.arange(h)[:, np.newaxis] * np.arange(w) / (h - 1) / (w - 1)
    return torch.from_numpy(msk).float()


def official_hfa_inputs(
    x: torch.Tensor,
    noise: torch.Tensor,
    uniforms: torch.Tensor,
    rho: float = RHO,
    sigma: float = SIGMA_LEVELS,
    mode: str = "search",
) -> torch.Tensor:
    """The N transformed inputs of one HFA step, given the draws (M 652-672).

    x (B, 3, H, W): the current point, clean + delta in [0, 1] pixels (M 651), not normalised;
    noise (N, B, 3, H, W): the standard-normal draws of `torch.randn` (M 653; scaled here by
    sigma / 255, M 654); uniforms (N, B, 3, H, W) in [0, 1): the draws of `torch.rand_like(x)`
    (M 667, 669). Returns (N, B, 3, H, W):
        x_n = idct_2d(dct_2d(x + sigma/255 * noise_n) * mask_n)                 (M 663, 671)
        mask_n = uniforms_n * msk * 2 rho + 1 - rho   (search, both; msk of official_search_mask)
               = uniforms_n * 2 rho + 1 - rho         ("" and noise: SSA's mask)
    with, for noise/both, the noise first filtered as idct_2d(dct_2d(noise) * i j / (H-1)(W-1))
    (M 655-660). Nothing is clipped: x_n may leave [0, 1]. The release differentiates w.r.t.
    each x_n as a new leaf (M 672), not through the transform back to x.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {MODES}")
    n = noise.shape[0]
    if noise.shape != (n, *x.shape) or uniforms.shape != noise.shape:
        raise ValueError(
            f"noise and uniforms must be (N, *x.shape); got {noise.shape}, {uniforms.shape}"
        )
    h, w = x.shape[-2:]
    samples = []
    for k in range(n):
        gauss = noise[k] * (sigma / 255)  # M 653-654
        if mode in ("noise", "both"):  # M 655-660
            gauss = official_idct_2d(official_dct_2d(gauss) * official_noise_mask(h, w).to(x))
        x_dct = official_dct_2d(x + gauss)  # M 663
        if mode in ("search", "both"):  # M 664-667
            mask = uniforms[k] * official_search_mask(h, w).to(x) * 2 * rho + 1 - rho
        else:  # M 668-670
            mask = uniforms[k] * 2 * rho + 1 - rho
        samples.append(official_idct_2d(x_dct * mask))  # M 671
    return torch.stack(samples)


def official_hfa_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    family: str,
    noise: torch.Tensor,
    uniforms: torch.Tensor,
    u: float = U_CLASS_DEFAULT,
    *,
    gns: bool = True,
    mode: str = "search",
    record: dict[str, Any] | None = None,
    **constants: Any,
) -> torch.Tensor:
    """The step's gradient estimate before normalisation, `noise / N` of M 652-681 (TI and the
    extra --mi momentum off, as in the README command): the mean over the N samples of
    d CE(model(x_n), y) / d x_n, with the GNS hooks when `gns` (--scale)."""
    inputs = official_hfa_inputs(x, noise, uniforms, mode=mode)
    net = getattr(model, "net", model)
    hooks = official_hooks(net, family, u, record=record, **constants) if gns else None
    with hooks if hooks is not None else contextlib.nullcontext():
        total = torch.zeros_like(x)
        for sample in inputs:
            total += _ce_gradient(model, sample, y)  # M 677-680
    return total / inputs.shape[0]  # M 681
