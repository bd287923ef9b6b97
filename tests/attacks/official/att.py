"""Reference port of the released ATT attack (Adaptive Token Tuning, NeurIPS 2024).

A test-only port, written for the tiny timm sources of tests/tiny.py, that follows the authors'
release step by step so that an implementation can be compared against it. Line numbers cite
`methods.py` (class `ATT`) and `attack.py` of the authors' repository `MisterRpeng/ATT`, which
pins torch 1.7.1 and timm 0.5.4 (README "Dependencies", requirements.txt).

ATT is MI-FGSM whose backward pass through the source is edited by legacy module backward
hooks (`register_backward_hook`) on the same modules as TGR, plus a self-paced PatchOut of the
perturbation guided by a feature-importance map:

* every hooked gradient G is multiplied by a per-family weaken factor (attn, qkv, mlp); the
  deepest attention layers are multiplied by 0 instead (`truncate_layers`);
* at every site the extreme positions of sample 0 (argmax / argmin, as TGR) are multiplied by
  an adaptive factor GPF = clamp(gamma + lam * (1 - sqrt(var(G') / var_prev)), 0, 1), where G'
  is the weakened gradient, var_prev the variance of the edited gradient of the previously
  processed (deeper) site of the same type, and GPF = gamma when var_prev is 0;
* each step keeps a 16x16 patch of the perturbation with probability
  0.99 - (0.99 - t) * (i + 1) / steps, t in [offset, offset + scale] the patch's normalized
  importance (features x gradient at one block, or the squared feature norm on CaiT and
  Visformer, see `official_importance`).

Under torch 1.7 a legacy hook edits grad_input of the last autograd node of the module's
output. This port names those tensors and edits them with torch 2.x node hooks:

* `attn_drop` (Dropout, identity in eval): the softmax node, so the pre-softmax scores
  (B, heads, N, N); in CaiT's talking-heads blocks the permute after `proj_w`, so the mixed map
  in (B, N, N, heads) layout; in CaiT's class attention the pre-softmax scores (B, heads, 1, N+1);
* 3-D Linear (`qkv`, `k`, `v`, and `mlp`, whose last op is fc2): torch 1.7 ran matmul then an
  in-place bias add, whose grad_input[0] is the Linear output gradient (B, N, C); torch 2.x
  flattens it to (B*N, C), so this port edits the output gradient itself, in (B, N, C);
* 2-D Linear (CaiT class attention `q`, on the class token): addmm, whose grad_input[0] is the
  *bias* gradient (C,) (summed over the batch): the edit never reaches the image gradient, but it
  updates the running qkv variance, which this port reproduces;
* bias-free 1x1 convs (Visformer `attn.qkv` and the MLP's last conv `conv3`): the convolution
  node, so the conv's input gradient (B, C, H, W).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The released per-model settings of `_register_model` (methods.py:110-138). `truncate` is
# (num, length) of `TR_01_PC(num, length)`: the first `num` attention layers in forward order
# keep their gradient, the other `length - num` (the deepest) are multiplied by 0.
# `feature_block` is the block whose output gives the importance map (methods.py:291-330),
# `importance_grad` whether its "gradient" was read by a backward or a forward hook, and
# `prefix_tokens` the tokens dropped before the map is reshaped to its grid (methods.py:400-411).
# DeiT has hooks (methods.py:291) but no settings: the release fails on it; this port uses the
# ViT values with DeiT's two prefix tokens (an extension, not the release).
OFFICIAL: dict[str, dict[str, Any]] = {
    "vit": {  # methods.py:115-120, 291-297, 400-402
        "model": "vit_base_patch16_224",
        "weaken_factor": (0.45, 0.7, 0.65),
        "truncate": (10, 12),
        "scale": 0.4,
        "offset": 0.4,
        "feature_block": "blocks.10",
        "importance_grad": "backward",
        "prefix_tokens": 1,
    },
    "deit": {  # not in the release's settings: the ViT values, two prefix tokens
        "model": "deit_base_distilled_patch16_224",
        "weaken_factor": (0.45, 0.7, 0.65),
        "truncate": (10, 12),
        "scale": 0.4,
        "offset": 0.4,
        "feature_block": "blocks.10",
        "importance_grad": "backward",
        "prefix_tokens": 2,
    },
    "pit": {  # methods.py:121-126, 298-313, 403-405
        "model": "pit_b_224",
        "weaken_factor": (0.25, 0.6, 0.65),
        "truncate": (9, 13),
        "scale": 0.3,
        "offset": 0.45,
        "feature_block": "transformers.2.blocks.2",
        "importance_grad": "backward",
        "prefix_tokens": 1,
    },
    "cait": {  # methods.py:127-132, 314-327, 406-408
        "model": "cait_s24_224",
        "weaken_factor": (0.3, 1.0, 0.6),
        "truncate": (4, 25),
        "scale": 0.35,
        "offset": 0.4,
        "feature_block": "blocks.23",
        "importance_grad": "forward",  # methods.py:316: a forward hook stores the feature
        "prefix_tokens": 0,
    },
    "visformer": {  # methods.py:133-138, 328-339, 409-411
        "model": "visformer_small",
        "weaken_factor": (0.4, 0.8, 0.3),
        "truncate": (8, 8),
        "scale": 0.15,
        "offset": 0.25,
        "feature_block": "stage3.2",
        "importance_grad": "forward",  # methods.py:330: a forward hook stores the feature
        "prefix_tokens": 0,
    },
}

GAMMA = 0.5  # methods.py:114
LAM = 0.01  # attack.py:17 (--lam)
PATCH = 16  # methods.py:98 (self.size), the PatchOut patch side
KEEP_START = 0.99  # methods.py:414
STEPS = 10  # methods.py:83
EPS = 16 / 255  # methods.py:83; step size eps / steps (methods.py:87)
DECAY = 1.0  # methods.py:83

CONSTANTS = (
    "gamma",  # base factor of the extreme positions
    "lam",  # lambda of the adaptive factor
    "weaken_factor",  # (attn, qkv, mlp) scale of every hooked gradient
    "truncate_layers",  # one 0/1 value per hooked attention layer, forward order
    "truncated",  # or: how many of the deepest hooked attention layers are zeroed
    "scale",  # PatchOut: importance normalized to [offset, offset + scale]
    "offset",
    "feature_block",  # module path of the block giving the importance map
    "importance_grad",  # "backward": features x gradient; "forward": features x features
    "prefix_tokens",  # class / distillation tokens dropped from the importance map
    "patch_size",  # PatchOut patch side
    "keep_start",  # PatchOut keep probability before the first step
)


# ---- settings ------------------------------------------------------------------------------------
def _blocks(net: nn.Module, family: str) -> list[tuple[str, nn.Module]]:
    """Every block of the main stream in forward order (CaiT: `blocks` only)."""
    if family in ("vit", "deit", "cait"):
        return [(f"blocks.{i}", b) for i, b in enumerate(net.blocks)]
    if family == "pit":
        return [
            (f"transformers.{t}.blocks.{i}", b)
            for t, stage in enumerate(net.transformers)
            for i, b in enumerate(stage.blocks)
        ]
    if family == "visformer":
        return [
            (f"{s}.{i}", b)
            for s in ("stage1", "stage2", "stage3")
            for i, b in enumerate(getattr(net, s))
        ]
    raise ValueError(f"unknown family {family!r}")


def hook_sites(net: nn.Module, family: str) -> list[tuple[str, str]]:
    """(module path, hook) pairs in the release's registration order (methods.py:291-339).

    hook: attn (attn_ATT), attn_cait (attn_cait_ATT), q (q_ATT), qkv (v_ATT), mlp (mlp_ATT).
    CaiT: every `blocks[i]`, then only `blocks_token_only[1]` (methods.py:317-327 loop over
    range(26) with `block_ind > 24`: index 24, class block 0, is skipped). Visformer: the blocks
    of stage2 and stage3 (methods.py:331-339; stage1 has no attention).
    """
    sites: list[tuple[str, str]] = []
    if family == "visformer":
        blocks = [(p, b) for p, b in _blocks(net, family) if not p.startswith("stage1")]
    else:
        blocks = _blocks(net, family)
    for path, block in blocks:
        if family == "visformer" and getattr(block, "attn", None) is None:
            continue
        sites += [(f"{path}.attn.attn_drop", "attn"), (f"{path}.attn.qkv", "qkv")]
        sites.append((f"{path}.mlp", "mlp"))
    if family == "cait":
        for j in range(1, len(net.blocks_token_only)):
            path = f"blocks_token_only.{j}"
            sites += [
                (f"{path}.attn.attn_drop", "attn_cait"),
                (f"{path}.attn.q", "q"),
                (f"{path}.attn.k", "qkv"),
                (f"{path}.attn.v", "qkv"),
                (f"{path}.mlp", "mlp"),
            ]
    return sites


def tr_01_pc(num: int, length: int) -> torch.Tensor:
    """methods.py:105-108: `num` ones, then `length - num` zeros (float32)."""
    return torch.cat((torch.ones(num), torch.zeros(length - num)))


def _default_feature_block(net: nn.Module, family: str) -> str:
    """The released block when the network has it; otherwise the same relative position:
    the second-to-last block in forward order (ViT blocks[10] of 12, PiT
    transformers[2].blocks[2] = 12th of 13, Visformer stage3[2] = 14th of 15), and CaiT's last
    patch block (blocks[23] of 24)."""
    paths = [p for p, _ in _blocks(net, family)]
    official = OFFICIAL[family]["feature_block"]
    n_official = {"vit": 12, "deit": 12, "pit": 13, "cait": 24, "visformer": 15}[family]
    if official in paths and len(paths) == n_official:
        return official
    if family == "cait":
        return paths[-1]
    return paths[-2] if len(paths) > 1 else paths[-1]


def settings(family: str, net: nn.Module, **constants: Any) -> dict[str, Any]:
    """The release's settings for `family` on `net`, with `constants` overriding them.

    Truncation: the released vector TR_01_PC(num, length) when the network has `length` hooked
    attention layers; otherwise the same number of deepest layers, `length - num`, is zeroed,
    but at most all but the shallowest one (tiny networks: ViT/DeiT 1 of 2, PiT 4 of 5, CaiT 2
    of 3, Visformer none). `truncated=n` zeroes the n deepest; `truncate_layers=[...]` gives the
    vector itself (one value per hooked attention layer in forward order).
    """
    if family not in OFFICIAL:
        raise ValueError(f"unknown family {family!r}; known: {sorted(OFFICIAL)}")
    unknown = set(constants) - set(CONSTANTS)
    if unknown:
        raise ValueError(f"unknown constants {sorted(unknown)}; known: {CONSTANTS}")
    base = OFFICIAL[family]
    sites = hook_sites(net, family)
    n_attn = sum(kind in ("attn", "attn_cait") for _, kind in sites)
    cfg: dict[str, Any] = {
        "gamma": GAMMA,
        "lam": LAM,
        "weaken_factor": tuple(base["weaken_factor"]),
        "scale": base["scale"],
        "offset": base["offset"],
        "feature_block": _default_feature_block(net, family),
        "importance_grad": base["importance_grad"],
        "prefix_tokens": base["prefix_tokens"],
        "patch_size": PATCH,
        "keep_start": KEEP_START,
    }
    if "truncate_layers" in constants and "truncated" in constants:
        raise ValueError("give truncate_layers or truncated, not both")
    if "truncate_layers" in constants:
        layers = torch.as_tensor(constants.pop("truncate_layers"), dtype=torch.float32)
        if layers.shape != (n_attn,):
            raise ValueError(f"truncate_layers needs {n_attn} values, one per attention layer")
    else:
        num, length = base["truncate"]
        deepest = constants.pop("truncated", None)
        if deepest is None:
            deepest = length - num if n_attn == length else min(length - num, n_attn - 1)
        if not 0 <= deepest <= n_attn:
            raise ValueError(f"truncated={deepest}: the source has {n_attn} attention layers")
        layers = tr_01_pc(n_attn - deepest, n_attn)
    cfg.update(constants)
    cfg["truncate_layers"] = layers
    cfg["weaken_factor"] = [float(w) for w in cfg["weaken_factor"]]
    if cfg["importance_grad"] not in ("backward", "forward"):
        raise ValueError("importance_grad: 'backward' or 'forward'")
    cfg["sites"] = sites
    cfg["n_attn"] = n_attn
    return cfg


# ---- the hooks' state and logic ------------------------------------------------------------------
@dataclass
class State:
    """What the release keeps on the attack object between hook calls.

    var_A / var_qkv / var_mlp: variance of the last edited gradient of that type (0 = none yet);
    reset to 0 before every step (methods.py:425-427) but *not* before the importance pass
    (methods.py:397-398), which therefore starts from the previous image's last values
    (`carried`). back_attn: index into truncate_layers, counted down by every attention hook
    (methods.py:179, 199), reset to (number of attention layers - 1) before every step
    (methods.py:428-435); after a pass it is -1, and negative indices reach the same layers.
    """

    gamma: float
    lam: float
    weaken_factor: list[float]
    truncate_layers: torch.Tensor
    back_attn: int
    var_A: Any = 0
    var_qkv: Any = 0
    var_mlp: Any = 0
    last_gpf: float = 0.0  # the factor of the latest hook call (for traces)
    fired: Counter = field(default_factory=Counter)
    trace: list | None = None


def _gpf(state: State, out_grad: torch.Tensor, name: str) -> Any:
    """The adaptive factor (methods.py:143-146, 186-189, 206-209, 217-220, 250-253)."""
    previous = getattr(state, name)
    if previous != 0:
        ratio = torch.var(out_grad) / previous
        gpf = (state.gamma + state.lam * (1 - torch.sqrt(ratio))).clamp(0, 1)
    else:
        gpf = state.gamma
    state.last_gpf = float(gpf)
    return gpf


def _idx(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).long()


def attn_att(state: State, g: torch.Tensor, layout: str) -> torch.Tensor:
    """attn_ATT, methods.py:140-180, on grad_input[0] of the attention-dropout's node.

    layout "bchw" (ViT, PiT, Visformer; methods.py:147-160): g is (B, heads, N, N); per head,
    from sample 0, the flat argmax and argmin over the N x N map give a row (idx // N) and a
    column (idx % N); that row and that column of that head are multiplied by GPF, in every
    sample, in the order max row, max column, min row, min column, so entries on two of these
    lines get GPF^2 (up to GPF^4). layout "bhwc" (CaiT talking heads; methods.py:162-175): g is
    (B, N, N, heads), the same per head.
    """
    mask = torch.ones_like(g) * state.truncate_layers[state.back_attn] * state.weaken_factor[0]
    out_grad = mask * g[:]
    gpf = _gpf(state, out_grad, "var_A")
    if layout == "bchw":
        b, c, h, w = g.shape
        cpu = out_grad.detach().clone().cpu().numpy().reshape(b, c, h * w)
        max_all = np.argmax(cpu[0, :, :], axis=1)
        min_all = np.argmin(cpu[0, :, :], axis=1)
        ch = torch.arange(c)
        out_grad[:, ch, _idx(max_all // h), :] *= gpf
        out_grad[:, ch, :, _idx(max_all % h)] *= gpf
        out_grad[:, ch, _idx(min_all // h), :] *= gpf
        out_grad[:, ch, :, _idx(min_all % h)] *= gpf
    elif layout == "bhwc":
        b, h, w, c = g.shape
        cpu = out_grad.detach().clone().cpu().numpy().reshape(b, h * w, c)
        max_all = np.argmax(cpu[0, :, :], axis=0)
        min_all = np.argmin(cpu[0, :, :], axis=0)
        ch = torch.arange(c)
        out_grad[:, _idx(max_all // h), :, ch] *= gpf
        out_grad[:, :, _idx(max_all % h), ch] *= gpf
        out_grad[:, _idx(min_all // h), :, ch] *= gpf
        out_grad[:, :, _idx(min_all % h), ch] *= gpf
    else:
        raise ValueError(layout)
    state.var_A = torch.var(out_grad)
    state.back_attn -= 1
    return out_grad


def attn_cait_att(state: State, g: torch.Tensor) -> torch.Tensor:
    """attn_cait_ATT, methods.py:182-200: g is the class-attention pre-softmax gradient
    (B, heads, 1, N+1). For every key n, from sample 0, the head with the largest and the head
    with the smallest value are multiplied by GPF at [head, 0, n], in every sample."""
    mask = torch.ones_like(g) * state.truncate_layers[state.back_attn] * state.weaken_factor[0]
    out_grad = mask * g[:]
    gpf = _gpf(state, out_grad, "var_A")
    c = g.shape[3]
    cpu = out_grad.detach().clone().cpu().numpy()
    max_all = np.argmax(cpu[0, :, 0, :], axis=0)
    min_all = np.argmin(cpu[0, :, 0, :], axis=0)
    keys = torch.arange(c)
    out_grad[:, _idx(max_all), :, keys] *= gpf
    out_grad[:, _idx(min_all), :, keys] *= gpf
    state.var_A = torch.var(out_grad)
    state.back_attn -= 1
    return out_grad


def q_att(state: State, bias_grad: torch.Tensor) -> torch.Tensor:
    """q_ATT, methods.py:202-212, on the bias gradient of CaiT's class-attention `q` (C,): the
    whole of it times weaken_factor[1] * GPF. Only var_qkv matters for the image gradient."""
    mask = torch.ones_like(bias_grad) * state.weaken_factor[1]
    out_grad = mask * bias_grad[:]
    gpf = _gpf(state, out_grad, "var_qkv")
    out_grad[:] *= gpf
    state.var_qkv = torch.var(out_grad)
    return out_grad


def _token_or_spatial(state: State, g: torch.Tensor, factor: float, name: str) -> torch.Tensor:
    """v_ATT (methods.py:214-245) and mlp_ATT (methods.py:247-283) for factor index 1 / 2.

    (B, N, C) (ViT, PiT, CaiT; methods.py:235-242, 267-275): per channel, from sample 0, the
    argmax and argmin token are multiplied by GPF in every sample (the same token twice, GPF^2,
    when they coincide, e.g. CaiT's one-token class MLP). (B, C, H, W) (Visformer;
    methods.py:222-233, 255-265): per channel, the argmax and argmin position (idx // H, idx % H).
    """
    mask = torch.ones_like(g) * factor
    out_grad = mask * g[:]
    gpf = _gpf(state, out_grad, name)
    if g.dim() == 4:
        b, c, h, w = g.shape
        cpu = out_grad.detach().clone().cpu().numpy().reshape(b, c, h * w)
        max_all = np.argmax(cpu[0, :, :], axis=1)
        min_all = np.argmin(cpu[0, :, :], axis=1)
        ch = torch.arange(c)
        out_grad[:, ch, _idx(max_all // h), _idx(max_all % h)] *= gpf
        out_grad[:, ch, _idx(min_all // h), _idx(min_all % h)] *= gpf
    elif g.dim() == 3:
        c = g.shape[2]
        cpu = out_grad.detach().clone().cpu().numpy()
        max_all = np.argmax(cpu[0, :, :], axis=0)
        min_all = np.argmin(cpu[0, :, :], axis=0)
        ch = torch.arange(c)
        out_grad[:, _idx(max_all), ch] *= gpf
        out_grad[:, _idx(min_all), ch] *= gpf
    else:
        raise ValueError(f"unexpected gradient shape {tuple(g.shape)}")
    setattr(state, name, torch.var(out_grad))
    return out_grad


def v_att(state: State, g: torch.Tensor) -> torch.Tensor:
    return _token_or_spatial(state, g, state.weaken_factor[1], "var_qkv")


def mlp_att(state: State, g: torch.Tensor) -> torch.Tensor:
    return _token_or_spatial(state, g, state.weaken_factor[2], "var_mlp")


# ---- installing the hooks ------------------------------------------------------------------------
def _record(state: State, path: str, kind: str) -> None:
    state.fired[path] += 1
    if state.trace is not None:
        var = {"attn": "var_A", "attn_cait": "var_A", "mlp": "var_mlp"}.get(kind, "var_qkv")
        state.trace.append((path, kind, state.last_gpf, float(getattr(state, var))))


def _install(net: nn.Module, family: str, state: State, sites: list[tuple[str, str]]) -> list:
    """Forward hooks that, at every forward, attach the release's edit to the autograd node
    that a torch 1.7 legacy hook of that module was attached to (see the module docstring)."""
    handles = []
    token = family != "visformer"
    for path, kind in sites:
        module = net.get_submodule(path)

        if kind in ("attn", "attn_cait"):
            layout = "bhwc" if family == "cait" and kind == "attn" else "bchw"
            expect = "PermuteBackward0" if layout == "bhwc" else "SoftmaxBackward0"

            def attn_hook(mod, args, out, path=path, kind=kind, layout=layout, expect=expect):
                node = out.grad_fn
                if node is None:
                    return
                if node.name() != expect:
                    raise RuntimeError(f"{path}: last node {node.name()}, expected {expect}")

                def post(grad_inputs, grad_outputs):
                    g = grad_inputs[0]
                    if kind == "attn":
                        edited = attn_att(state, g, layout)
                    else:
                        edited = attn_cait_att(state, g)
                    _record(state, path, kind)
                    return (edited, *grad_inputs[1:])

                node.register_hook(post)

            handles.append(module.register_forward_hook(attn_hook))
        elif kind == "q":

            def q_hook(mod, args, out, path=path):
                node = out.grad_fn
                if node is None:
                    return

                def pre(grad_outputs):
                    # torch 1.7: grad_input[0] of addmm is the bias gradient, the output
                    # gradient summed to the bias shape (the engine's reduction of broadcasts).
                    q_att(state, grad_outputs[0].sum(0))
                    _record(state, path, "q")
                    return None  # the image gradient is untouched

                node.register_prehook(pre)

            handles.append(module.register_forward_hook(q_hook))
        elif token:  # Linear outputs (qkv, k, v) and the Mlp (ends with fc2): (B, N, C)
            edit = v_att if kind == "qkv" else mlp_att

            def out_hook(mod, args, out, path=path, kind=kind, edit=edit):
                node = out.grad_fn
                if node is None:
                    return
                slot = out.output_nr

                def pre(grad_outputs):
                    edited = list(grad_outputs)
                    edited[slot] = edit(state, grad_outputs[slot])
                    _record(state, path, kind)
                    return tuple(edited)

                node.register_prehook(pre)

            handles.append(module.register_forward_hook(out_hook))
        else:  # Visformer: bias-free 1x1 convs, the conv's input gradient
            edit = v_att if kind == "qkv" else mlp_att

            def conv_hook(mod, args, out, path=path, kind=kind, edit=edit):
                node = out.grad_fn
                if node is None:
                    return
                if "Convolution" not in node.name():
                    raise RuntimeError(f"{path}: last node {node.name()}, expected a conv")

                def post(grad_inputs, grad_outputs):
                    edited = edit(state, grad_inputs[0])
                    _record(state, path, kind)
                    return (edited, *grad_inputs[1:])

                node.register_hook(post)

            handles.append(module.register_forward_hook(conv_hook))
    return handles


def new_state(cfg: dict[str, Any], carried: dict[str, float] | None = None) -> State:
    """The state at the start of a step (carried=None), or of an importance pass that follows
    an image whose last step left the variances `carried` ({"var_A": ..., ...})."""
    state = State(
        gamma=float(cfg["gamma"]),
        lam=float(cfg["lam"]),
        weaken_factor=list(cfg["weaken_factor"]),
        truncate_layers=cfg["truncate_layers"],
        back_attn=cfg["n_attn"] - 1,
    )
    for name, value in (carried or {}).items():
        setattr(state, name, torch.tensor(value) if value != 0 else 0)
    return state


def set_fused_attn(net: nn.Module, enabled: bool) -> list[tuple[nn.Module, bool]]:
    """timm's fused attention never calls `attn_drop` (no attention map, no hook): switch it
    off on the source while hooked, as timm 0.5.4 always ran the explicit path."""
    previous = [(m, m.fused_attn) for m in net.modules() if hasattr(m, "fused_attn")]
    for m, _ in previous:
        m.fused_attn = enabled
    return previous


@contextlib.contextmanager
def hooked(
    model: nn.Module, family: str, state: State, sites: list[tuple[str, str]]
) -> Iterator[None]:
    net = getattr(model, "net", model)
    previous = set_fused_attn(net, False)
    handles = _install(net, family, state, sites)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, flag in previous:
            m.fused_attn = flag


# ---- the first step's gradient -------------------------------------------------------------------
def official_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    family: str,
    *,
    mask: torch.Tensor | None = None,
    trace: list | None = None,
    fired: Counter | None = None,
    **constants: Any,
) -> torch.Tensor:
    """d CE / d x at the first step (delta = 0) through the release's edited backward.

    methods.py:424-446 with i = 0: the variances are 0 and back_attn is (attention layers - 1)
    (methods.py:425-435); the input is x + delta * mask with mask the PatchOut mask (None: off,
    all ones; methods.py:443), and the loss CrossEntropyLoss (mean; at batch 1 the sum).
    x is (1, 3, H, W) pixels in [0, 1]. `trace` receives, in firing order, (site, hook, GPF,
    variance after the edit); `fired` counts the calls per site.
    """
    net = getattr(model, "net", model)
    cfg = settings(family, net, **constants)
    state = new_state(cfg)
    state.trace = trace
    delta = torch.zeros_like(x, requires_grad=True)
    with torch.enable_grad(), hooked(model, family, state, cfg["sites"]):
        kept = delta if mask is None else delta * mask.detach()
        loss = F.cross_entropy(model(x + kept), y)
        (grad,) = torch.autograd.grad(loss, delta)
    if fired is not None:
        fired.update(state.fired)
    return grad


# ---- the self-paced PatchOut ---------------------------------------------------------------------
def official_importance(
    model: nn.Module,
    x: torch.Tensor,
    family: str,
    *,
    carried: dict[str, float] | None = None,
    trace: list | None = None,
    **constants: Any,
) -> torch.Tensor:
    """The importance map GF of methods.py:397-411, (1, H, W), before `norm_patchs`.

    One forward of the clean images and `output.backward(ones_like(output))` (the gradient of
    the *sum of all logits*, not of the loss) through the ATT hooks, whose variances are not
    reset first: `carried` gives the previous image's values (None: the first image, all 0,
    methods.py:111-113). At the feature block, for sample 0:
    * "backward" (ViT, PiT; a backward hook, methods.py:293, 300): feature x gradient of the
      block output, summed over channels, prefix tokens dropped (methods.py:401, 404);
    * "forward" (CaiT, Visformer; the "gradient" hook is a forward hook, methods.py:316, 330,
      so it stores the feature of sample 0): feature x feature, the squared channel norm per
      token (methods.py:407) or per position (methods.py:410).
    The token map is reshaped to its square grid and resized to the image size with bilinear
    interpolation, align_corners=False (torchvision 0.8 `Resize` on a tensor, methods.py:399).
    """
    net = getattr(model, "net", model)
    cfg = settings(family, net, **constants)
    state = new_state(cfg, carried)
    state.trace = trace
    block = net.get_submodule(cfg["feature_block"])
    seen: dict[str, torch.Tensor] = {}

    def keep(mod, args, out):
        seen["fea"] = out.detach().clone()
        if cfg["importance_grad"] == "forward":
            seen["grad"] = out[0].detach().clone()
        elif out.requires_grad:
            out.register_hook(lambda g: seen.__setitem__("grad", g.detach().clone()))

    handle = block.register_forward_hook(keep)
    inputs = x.detach().clone().requires_grad_(True)  # the release's parameters carry the graph
    try:
        with torch.enable_grad(), hooked(model, family, state, cfg["sites"]):
            output = model(inputs)
            output.backward(torch.ones_like(output))
    finally:
        handle.remove()
    fea, grad = seen["fea"], seen["grad"]
    if fea.dim() == 4:  # Visformer (B, C, h, w): methods.py:410
        gf = (fea[0] * grad).sum(0)
    else:
        p = cfg["prefix_tokens"]
        if cfg["importance_grad"] == "backward":
            gf = (fea[0][p:] * grad[0][p:]).sum(-1)
        else:
            gf = (fea[0][p:] * grad[p:]).sum(-1)
        side = math.isqrt(gf.numel())
        if side * side != gf.numel():
            raise ValueError(f"{gf.numel()} tokens are not a square grid")
        gf = gf.reshape(side, side)
    size = tuple(x.shape[-2:])
    return F.interpolate(gf[None, None], size=size, mode="bilinear", align_corners=False)[0]


def patch_index(img_size: int, patch: int) -> torch.Tensor:
    """Patch_index, methods.py:361-381: (1, P*P, patch*patch) flat pixel indices of every
    non-overlapping patch, patches in row-major order, pixels row-major inside a patch."""
    n = (img_size - patch) // patch + 1
    corner = (torch.arange(n) * patch * img_size)[:, None] + torch.arange(n) * patch
    inside = (torch.arange(patch) * img_size)[:, None] + torch.arange(patch)
    return (corner.reshape(-1, 1) + inside.reshape(1, -1))[None]


def official_keep_map(
    gf: torch.Tensor, patch: int = PATCH, scale: float = 0.4, offset: float = 0.4
) -> torch.Tensor:
    """norm_patchs, methods.py:383-391 (GF_patchs_t of methods.py:413): each patch's mean
    importance, min-max normalized over the patches of the image, times scale plus offset,
    written back to every pixel of the patch. (1, H, W) in [offset, offset + scale]; NaN when
    every patch has the same mean (0 / 0), which makes every patch kept at every step."""
    gf = gf.clone()
    index = patch_index(gf.shape[-1], patch)
    for i in range(len(gf)):
        tmp = torch.take(gf[i], index[i])
        norm_tmp = torch.mean(tmp, dim=-1)
        scaled = scale * ((norm_tmp - norm_tmp.min()) / (norm_tmp.max() - norm_tmp.min())) + offset
        gf[i] = gf[i].put_(index[i], scaled.repeat_interleave(patch * patch) * 1.0)
    return gf


def official_uniforms(step: int, grid: tuple[int, int]) -> torch.Tensor:
    """The release's draws at step i (methods.py:440-441): torch.manual_seed(i), then
    torch.rand(14, 14) from the CPU generator (14 = 224 / 16). Here a private CPU generator
    seeded with i, which gives the same numbers without touching the global RNG."""
    return torch.rand(grid, generator=torch.Generator().manual_seed(step))


def official_patchout_mask(
    keep_map: torch.Tensor,
    step: int,
    uniforms: torch.Tensor,
    steps: int = STEPS,
    keep_start: float = KEEP_START,
) -> torch.Tensor:
    """GF_patchs of methods.py:414-415, 441-442 for one image: 1 keeps the perturbation.

    keep_map: (1, H, W) from `official_keep_map`; uniforms: (H / p, W / p) draws in [0, 1), one
    per patch (the release: `official_uniforms(step, ...)`). Every pixel of patch (a, b) reads
    uniforms[a, b] (the release's repeat_interleave / repeat expansion); the patch is kept
    when u <= 0.99 - ((0.99 - t) / steps) * (step + 1), so with probability decreasing linearly
    from 0.99 to t = keep_map over the steps. The mask is (1, H, W): the same for the three
    channels and, in the release, for every image of the batch (methods.py:443).
    """
    gh, gw = uniforms.shape
    h, w = keep_map.shape[-2:]
    p = h // gh
    if gh * p != h or gw * p != w:
        raise ValueError(f"{gh}x{gw} draws do not tile a {h}x{w} map")
    random_patch = uniforms.repeat_interleave(p).reshape(gh, gw * p).repeat(1, p).reshape(h, w)
    start = torch.ones_like(keep_map) * keep_start
    offset = (start - keep_map) / steps
    return torch.where(random_patch.to(keep_map.device) > start - offset * (step + 1), 0.0, 1.0)


def official_random_patchout_mask(
    step: int, grid: tuple[int, int], n_keep: int = 130, patch: int = PATCH
) -> torch.Tensor:
    """_generate_samples_for_interactions, methods.py:341-359 (unused: its call is commented
    out at methods.py:436-437): random.seed(step), shuffle the patch ids, keep the first n_keep
    (130 of 196 in the release). (1, 1, H, W) mask of the kept patches."""
    gh, gw = grid
    ids = list(range(gh * gw))
    rng = random.Random(step)  # random.seed(step) + random.shuffle: the same generator
    rng.shuffle(ids)
    mask = torch.zeros(1, 1, gh * patch, gw * patch)
    for i in ids[:n_keep]:
        r, c = divmod(i, gw)
        mask[:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 1
    return mask


# ---- the whole attack (batch of one) -------------------------------------------------------------
def official_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    family: str,
    *,
    eps: float = EPS,
    steps: int = STEPS,
    decay: float = DECAY,
    patchout: bool = True,
    carried: dict[str, float] | None = None,
    uniforms: Callable[[int, tuple[int, int]], torch.Tensor] = official_uniforms,
    **constants: Any,
) -> torch.Tensor:
    """ATT.forward, methods.py:393-453, for one image in [0, 1]; returns x + delta (float,
    before the release's 8-bit truncation in `_save_images`, methods.py:49-58)."""
    net = getattr(model, "net", model)
    cfg = settings(family, net, **constants)
    h, w = x.shape[-2:]
    p = cfg["patch_size"]
    if patchout:
        gf = official_importance(model, x, family, carried=carried, **constants)
        keep_map = official_keep_map(gf, p, cfg["scale"], cfg["offset"])
    alpha = eps / steps
    momentum = torch.zeros_like(x)
    delta = torch.zeros_like(x)
    for i in range(steps):
        mask = None
        if patchout:
            mask = official_patchout_mask(
                keep_map, i, uniforms(i, (h // p, w // p)), steps, cfg["keep_start"]
            )
        grad = _step_gradient(model, x, delta, y, family, cfg, mask)
        grad = grad / torch.mean(torch.abs(grad), dim=[1, 2, 3], keepdim=True)
        grad += momentum * decay
        momentum = grad
        delta = torch.clamp(delta + alpha * grad.sign(), -eps, eps)
        delta = torch.clamp(x + delta, 0.0, 1.0) - x
    return x + delta


def _step_gradient(model, x, delta, y, family, cfg, mask) -> torch.Tensor:
    """methods.py:425-446 at any step: fresh state, forward of x + delta * mask, CE backward."""
    state = new_state(cfg)
    d = delta.detach().clone().requires_grad_(True)
    with torch.enable_grad(), hooked(model, family, state, cfg["sites"]):
        kept = d if mask is None else d * mask
        loss = F.cross_entropy(model(x + kept), y)
        (grad,) = torch.autograd.grad(loss, d)
    return grad
