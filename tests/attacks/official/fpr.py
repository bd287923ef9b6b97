"""Reference port of the released FPR attack (Forward Propagation Refinement, CVPR 2025).

A test-only port, written for the tiny timm sources of tests/tiny.py, that follows the authors'
release step by step so that an implementation can be compared against it. Line numbers cite the
authors' repository (`transferattack/collection/vitb.py`, `deitb.py`, `pitt.py`, `caits.py`,
`transferattack/attack.py`, `transferattack/gradient/mifgsm.py`, `transferattack/utils.py`);
the ViT-B part of TransferAttack's `transferattack/model_related/fpr.py` is the same code.

FPR is plain MI-FGSM (one forward and one backward per step, no input transformation) on a
source whose forward pass is changed by forward hooks; the backward pass is never edited, the
gradient is whatever autograd derives from the changed forward:

* attention-map diversification (AMD) on the attention dropout of a few blocks per family: each
  head's post-softmax map P is multiplied elementwise by a fresh random matrix M ~ U(1 - r, 1 + r)
  of shape (N_q, N_q), shared by every image of the batch, and softmax(P * M) over the keys
  replaces it (the softmax of the product, not of its log);
* token-embedding momentum (MTE) on the output of every block's `attn` and `mlp`:
  acc = mom_emb_decay * acc.detach() + scale * out (acc = scale * out at the first forward),
  and acc replaces the output. The released code keeps acc in a module-level dict that is never
  reset, so it carries across steps, images and batches.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Draws = Callable[[int, str, tuple[int, int, int], torch.device], torch.Tensor]

# The released settings per family. Block names are module paths inside the timm network.
OFFICIAL: dict[str, dict[str, Any]] = {
    "vit": {  # vitb.py:128-138
        "model": "vit_base_patch16_224",
        "attn_blocks": ("blocks.0", "blocks.1", "blocks.4", "blocks.9", "blocks.11"),
        "attn_map_change_range": 25.0,
        "scale": 0.8,
        "mom_emb_decay": 0.3,
    },
    "deit": {  # deitb.py:131-140
        "model": "deit_base_distilled_patch16_224",
        "attn_blocks": ("blocks.0", "blocks.1", "blocks.5", "blocks.10", "blocks.11"),
        "attn_map_change_range": 30.0,
        "scale": 0.7,
        "mom_emb_decay": 0.2,
    },
    "pit": {  # pitt.py:130-153 (written for pit_ti_224, stage depths 2, 6, 4)
        "model": "pit_ti_224",
        "attn_blocks": (
            "transformers.0.blocks.1",
            "transformers.1.blocks.4",
            "transformers.2.blocks.3",
        ),
        "attn_map_change_range": 25.0,
        "scale": 0.7,
        "mom_emb_decay": 0.2,
    },
    "cait": {  # caits.py:127-145
        "model": "cait_s24_224",
        "attn_blocks": ("blocks.2", "blocks.14", "blocks_token_only.1"),
        "attn_map_change_range": 30.0,
        "scale": 0.6,
        "mom_emb_decay": 0.2,
    },
}

CONSTANTS = (
    "alpha",  # MI-FGSM step; mifgsm.py:30 alpha=1.6/255 (= eps / steps at the defaults)
    "decay",  # MI-FGSM momentum decay; mifgsm.py:30 decay=1.
    "attn_blocks",  # blocks whose attention map is diversified
    "momentum_blocks",  # blocks whose attn and mlp outputs get the embedding momentum
    "attn_map_change_range",  # r of M ~ U(1 - r, 1 + r)
    "scale",  # s of acc = d * acc + s * out
    "mom_emb_decay",  # d of acc = d * acc + s * out
)


def official_blocks(net: nn.Module) -> list[str]:
    """Every transformer block of a ViT, DeiT, PiT or CaiT network, in forward order.

    The released code puts the momentum hooks on all of them: range(12) blocks of ViT-B and
    DeiT-B (vitb.py:134-138, deitb.py:136-140), the 2 + 6 + 4 blocks of PiT-Ti's three stages
    (pitt.py:139-153), CaiT-S24's 24 blocks and its 2 class-attention blocks (caits.py:139-145).
    """
    if hasattr(net, "transformers"):  # PiT: stages, each with its own .blocks
        return [
            f"transformers.{i}.blocks.{j}"
            for i, stage in enumerate(net.transformers)
            for j in range(len(stage.blocks))
        ]
    names = [f"blocks.{i}" for i in range(len(net.blocks))]
    if getattr(net, "blocks_token_only", None) is not None:  # CaiT class-attention blocks
        names += [f"blocks_token_only.{i}" for i in range(len(net.blocks_token_only))]
    return names


def settings(family: str, net: nn.Module, **constants: Any) -> dict[str, Any]:
    """The family's released constants, overridden by `constants`.

    By default the diversified blocks are the released ones that exist in `net` (a tiny network
    has fewer blocks than the released source; the released code would raise IndexError) and
    the momentum blocks are all of `net`'s blocks.
    """
    if family not in OFFICIAL:
        raise ValueError(f"the released FPR code has no setting for {family!r}")
    unknown = set(constants) - set(CONSTANTS)
    if unknown:
        raise TypeError(f"unknown FPR constants: {sorted(unknown)}")
    blocks = official_blocks(net)
    out = {k: v for k, v in OFFICIAL[family].items() if k != "model"}
    out["attn_blocks"] = tuple(b for b in out["attn_blocks"] if b in blocks)
    out["momentum_blocks"] = tuple(blocks)
    out["decay"] = 1.0
    out.update(constants)
    for name in (*out["attn_blocks"], *out["momentum_blocks"]):
        if name not in blocks:
            raise ValueError(f"{name!r} is not a block of this network: {blocks}")
    return out


def numpy_draws(attn_map_change_range: float, rng: Any = None) -> Draws:
    """The released multiplier draws (vitb.py:98-100; the same lines in the other files).

    For each head in order, one np.random.uniform(1 - r, 1 + r, (N_q, N_q)) from numpy's global
    legacy generator (never seeded by the released code), made float32. The port asks for all
    heads at once, shape (heads, N_q, N_q), which consumes the stream in the same order. `rng`
    (e.g. np.random.RandomState(seed)) replaces the global generator.
    """
    source = np.random if rng is None else rng
    low, high = 1.0 - attn_map_change_range, 1.0 + attn_map_change_range

    def draws(
        step: int, block_name: str, shape: tuple[int, int, int], device: torch.device
    ) -> torch.Tensor:
        heads, rows, cols = shape
        per_head = [
            torch.tensor(source.uniform(low, high, (rows, cols)), dtype=torch.float32)
            for _ in range(heads)
        ]
        return torch.stack(per_head).to(device)

    return draws


def official_attention_map(attn_probs: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """The diversified attention map (vitb.py:91-108 `diverse_attn_map`; pitt.py:92-110,
    caits.py:91-108, deitb.py:94-112, TransferAttack fpr.py:86-96).

    `attn_probs` (B, H, N_q, N_k) is the output of the attention dropout: the post-softmax map
    (ViT, DeiT, PiT, CaiT class attention) or, in CaiT's talking-heads blocks, the map after the
    post-softmax head mixing `proj_w`, so not a distribution. `multiplier` (H, N_q, N_q) holds
    one M per head, shared by the B images. Per head: softmax(P[:, h] * M[h], dim=-1). With
    CaiT's class attention N_q = 1, so M[h] is a single number that multiplies the whole row.
    """
    heads = attn_probs.shape[1]
    scaled = attn_probs * 1.0  # vitb.py:94
    result = torch.empty_like(scaled)  # vitb.py:96
    for h in range(heads):  # vitb.py:98-106
        noisy = scaled[:, h, :, :] * multiplier[h].to(attn_probs.device)
        result[:, h, :, :] = torch.softmax(noisy, dim=-1)
    return result


def official_momentum(
    acc: torch.Tensor | None, out: torch.Tensor, scale: float = 0.8, mom_emb_decay: float = 0.3
) -> torch.Tensor:
    """The token-embedding momentum (vitb.py:112-124 `cross_iter_emb_momentum`; pitt.py:114-126,
    caits.py:112-123, deitb.py:116-127, TransferAttack fpr.py:98-107).

    First forward of a module (`acc` is None): scale * out, a clone that keeps the graph. Later:
    mom_emb_decay * acc.detach() + scale * out, so the gradient reaches only the current output
    (times scale). The result is both the new acc and the module's output. Defaults: ViT-B.
    """
    scaled = out * scale  # vitb.py:114-115
    if acc is None:  # vitb.py:119-120
        return scaled.clone()
    return mom_emb_decay * acc.clone().detach() + scaled  # vitb.py:122


def official_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    family: str,
    draws: Draws | None = None,
    steps: int = 10,
    eps: float = 16 / 255,
    *,
    state: dict[str, torch.Tensor] | None = None,
    fired: Counter[str] | None = None,
    **constants: Any,
) -> torch.Tensor:
    """The whole released FPR attack on `model` (a PixelModel; hooks go on `model.net`).

    Returns the adversarial image x + delta in [0, 1]. Meant for batch 1: with a larger batch
    the draws are shared by the batch, as in the released code.

    `draws(step, block_name, (heads, N_q, N_q), device)` returns the multipliers M of one firing
    of a diversified block (`block_name` such as "blocks.0", "transformers.0.blocks.1",
    "blocks_token_only.1"), in the distribution U(1 - r, 1 + r) itself, not a unit uniform.
    None: `numpy_draws(r)`, the released draws from numpy's global generator.

    `state` maps "<block>.attn" / "<block>.mlp" to the momentum acc. None (the default) starts
    fresh at this call. The released code never resets it (the module-level
    `accumulated_features` dict, vitb.py:10, keyed by id(module)): its first step on a batch
    uses the acc left by the last step of the previous batch. Pass the same dict to successive
    calls to reproduce that. `fired`, if given, counts each hook's calls by module path
    ("<block>.attn.attn_drop", "<block>.attn", "<block>.mlp").

    `constants` override the released settings (see `settings` and CONSTANTS).

    The loop is transferattack/attack.py:96-131 (= vitb.py:29-66): untargeted, zero start
    (init_delta, attack.py:159-172), transform is the identity (attack.py:193-194), mean
    cross-entropy (attack.py:184-191; the same gradient direction as a sum at batch 1),
    g = decay * g + grad / mean|grad| per image (attack.py:153-157),
    delta = clamp(delta + alpha * sign(g), -eps, eps), then clamped to [-x, 1 - x]
    (attack.py:174-182, utils.py:86-87). Timm's fused attention is switched off while attacking,
    as the released environment (torch 1.12, without scaled_dot_product_attention) had it off;
    hooks and fused settings are restored on return.
    """
    net = model.net
    cfg = settings(family, net, **constants)
    alpha = cfg.get("alpha", eps / steps)
    decay = cfg["decay"]
    if draws is None:
        draws = numpy_draws(cfg["attn_map_change_range"])
    state = {} if state is None else state
    now = {"step": 0}

    def diversify(block: str, site: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if fired is not None:
                fired[site] += 1
            _, heads, rows, _ = output.shape  # vitb.py:93
            shape = (heads, rows, rows)
            multiplier = draws(now["step"], block, shape, output.device)
            if tuple(multiplier.shape) != shape:
                raise ValueError(f"draws gave {tuple(multiplier.shape)} for {shape}")
            return official_attention_map(output, multiplier)

        return hook

    def accumulate(site: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if fired is not None:
                fired[site] += 1
            state[site] = official_momentum(
                state.get(site), output, cfg["scale"], cfg["mom_emb_decay"]
            )
            return state[site]

        return hook

    previous = [(m, m.fused_attn) for m in net.modules() if hasattr(m, "fused_attn")]
    handles = []
    try:
        for m, _ in previous:
            m.fused_attn = False
        for block in cfg["attn_blocks"]:  # e.g. vitb.py:130-131
            site = f"{block}.attn.attn_drop"
            handles.append(net.get_submodule(site).register_forward_hook(diversify(block, site)))
        for part in ("attn", "mlp"):  # e.g. vitb.py:134-138
            for block in cfg["momentum_blocks"]:
                site = f"{block}.{part}"
                handles.append(net.get_submodule(site).register_forward_hook(accumulate(site)))
        return _mifgsm(model, x, y, steps, eps, alpha, decay, now)
    finally:
        for handle in handles:
            handle.remove()
        for m, was in previous:
            m.fused_attn = was


def _mifgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    eps: float,
    alpha: float,
    decay: float,
    now: dict[str, int],
) -> torch.Tensor:
    """attack.py:96-131 with attack.py:153-182; one forward per step (vitb.py:48-64)."""
    model.eval()  # attack.py:196-198
    data = x.clone().detach()
    label = y.clone().detach() + getattr(model, "label_offset", 0)
    delta = torch.zeros_like(data).requires_grad_(True)
    momentum: torch.Tensor | float = 0.0
    with torch.enable_grad():
        for step in range(steps):
            now["step"] = step
            logits = model(data + delta)
            loss = F.cross_entropy(logits, label)
            grad = torch.autograd.grad(loss, delta)[0]
            momentum = momentum * decay + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)
            delta = torch.clamp(delta + alpha * momentum.sign(), -eps, eps)
            delta = torch.min(torch.max(delta, 0 - data), 1 - data)
            # the released repository keeps delta in the graph; TransferAttack detaches it
            # (its attack.py:153): the same values either way
            delta = delta.detach().requires_grad_(True)
    return (data + delta).detach().clamp(0, 1)


def hook_sites(family: str, net: nn.Module, **constants: Any) -> dict[str, list[str]]:
    """The module paths that `official_attack` hooks, by kind ("attn_map", "attn", "mlp")."""
    cfg = settings(family, net, **constants)
    blocks: Iterable[str] = cfg["momentum_blocks"]
    return {
        "attn_map": [f"{b}.attn.attn_drop" for b in cfg["attn_blocks"]],
        "attn": [f"{b}.attn" for b in blocks],
        "mlp": [f"{b}.mlp" for b in blocks],
    }
