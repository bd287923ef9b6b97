"""Reference port of LL2S ("Learning to Learn Transferable Attack", NeurIPS 2025, arXiv
2504.10804, "Harnessing the computation redundancy in ViTs to boost adversarial
transferability"), for the tiny ViT/DeiT test sources, to test an implementation against.

Source followed: TransferAttack (Trustworthy-AI-Group/TransferAttack),
transferattack/model_related/ll2s.py as last changed by commit ec0eb07 ("feat: update LL2S"),
and its base class transferattack/attack.py. "Lnnn" below are line numbers of ll2s.py,
"attack.py Lnnn" of the base class. The authors' own repository (RedunAttack-ViT on GitHub, whose
history holds transferattack/model_related/ll2s.py) has the same algorithm; the one difference
kept here as an option is `robust_pass` (see below). Written from a reading of that code.

Deviations, all forced or harmless:
- Modern timm calls `Attention.forward(x, attn_mask=..., is_causal=...)` and
  `VisionTransformer.forward_features(x, attn_mask=..., is_causal=...)`; the official
  replacements take `(self, x)` only and raise TypeError there. The replacements here accept and
  ignore those keywords (they are None/False for classification).
- Every random draw comes from `draws(kind, step, shape, device)` as a uniform [0,1) tensor (a
  standard normal one for "robust_init"); the index draws are derived from it with the same
  distribution as the official call (see DRAW_KINDS). Not bit-identical to the official RNG
  streams (torch.multinomial, np.random.choice, torch.randperm, np.random.randint).
- timm's fused attention is switched off during the attack, so unmodified attention layers take
  the explicit path (as the replaced ones do); this changes results by rounding only.
- The adversarial image is returned (official: the perturbation, L705).
- Untargeted only (the official targeted branch negates the loss, L524-528).

Patches (instance attributes over the class methods) are removed when the call returns.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tgr_bench.attacks.hooks import set_fused_attn

Draws = Callable[[str, int, tuple, torch.device], torch.Tensor]

# op_list, L387-392: the column of aug_param of each operation.
OPS = ("rest", "sparse", "shuffle", "moe")
REST, SPARSE, SHUFFLE, MOE = range(4)

DEFAULTS: dict[str, Any] = {
    "alpha": 1.6 / 255,  # L439: a fixed step, not eps / steps
    "decay": 1.0,  # L441: momentum decay, also used for the robust-token momentum (L513)
    "num_scale": 10,  # L458: hard-coded, no constructor argument
    "ops_num": 2,  # L473: forwards (op configurations) per scale
    "ops_lr": 0.01,  # L474: learning rate of aug_param (gradient ascent, L680)
    "rest_p": 0.3,  # L32: fraction of tokens stored per head for clean-token injection
    "sparse_p": 0.4,  # L17: drop probability of each attention weight
    "shuffle_prob": 0.5,  # L19: probability that a shuffle layer permutes at all
    "shuffle_ratio": 0.45,  # L19: fraction of heads permuted (int(H * ratio) heads)
    "moe_n": 5,  # L22: experts drawn uniformly from 2..moe_n
    "moe_p": 0.3,  # L22: drop probability of each hidden FFN unit, per expert
    # L448 defaults to "global" (needs a file, L593); the first TransferAttack version and the
    # authors' code took it from the environment. "dynamic" is the self-contained choice.
    "robust_tokens": "dynamic",
    "num_robust_tokens": 400,  # L449
    "robust_lr": 1e-2,  # L494: sign step of the dynamic robust tokens
    "robust_init_scale": 10.0,  # L502: tokens start as N(0, 1) * 10
    "global_tokens": None,  # (T, D) tensor for robust_tokens="global" (L593-600)
    # "clean": the robust-token pass runs outside ModelWrapper, all forwards original
    # (TransferAttack, L687-701); "last": it runs under the last sampled configuration, still
    # installed (the authors' code, which cleans up only before installing the next one).
    "robust_pass": "clean",
    "trace": None,  # a dict to fill with per-step aug_param, configurations and losses
}

# What each kind of draw is, and how the port turns it into the official draw.
DRAW_KINDS = {
    "robust_init": "(B, T, D) standard normal; tokens = draw * robust_init_scale (L502)",
    "ops": "(L, ops_num) uniform; op of layer l in forward j is the inverse CDF of "
    "softmax(aug_param[l]) at u[l, j] (torch.multinomial with replacement, L81, L629)",
    "rest_scores": "(H, N - 1) uniform; head h stores tokens 1 + argsort(u[h])[:int(rest_p*N)] "
    "(np.random.choice without replacement over 1..N-1, one call per head, L133-139)",
    "sparse": "(B, H, N, N) uniform; an attention weight is kept where u > sparse_p (L208)",
    "shuffle_coin": "(1,) uniform; the layer permutes heads when u < shuffle_prob (L242)",
    "shuffle_perm": "(H,) uniform; the permutation is argsort(u) (torch.randperm, L246)",
    "moe_n": "(1,) uniform; experts n = 2 + floor(u * (moe_n - 1)) "
    "(np.random.randint(2, moe_n + 1), L269)",
    "moe_mask": "(B, N, hidden) uniform, one per expert; a hidden unit is kept where "
    "u > moe_p (L277)",
}


def default_draws(seed: int | None = None) -> Draws:
    """Draws in the official distributions from one CPU generator (seeded, or fresh)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)

    def draws(kind: str, step: int, shape: tuple, device: torch.device) -> torch.Tensor:
        if kind not in DRAW_KINDS:
            raise KeyError(kind)
        fn = torch.randn if kind == "robust_init" else torch.rand
        return fn(tuple(shape), generator=g).to(device)

    return draws


# --------------------------------------------------------------------------- pure pieces


def official_sample_ops(aug_param: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(L, M) op ids: column j is one configuration (one op per layer), drawn per layer from
    softmax(aug_param[l]) (select_op, L78-82, called with num_ops = ops_num at L629)."""
    probs = F.softmax(aug_param.detach().float(), dim=-1)
    cdf = probs.cumsum(-1)
    u = u.to(cdf.device, cdf.dtype)
    ids = (u.unsqueeze(-1) >= cdf.unsqueeze(1)).sum(-1)
    return ids.clamp(max=probs.shape[-1] - 1)


def official_trace_prob(aug_param: torch.Tensor, op_ids: torch.Tensor) -> torch.Tensor:
    """The "probability" of a configuration (trace_prob, L85-91, called at L633 with one (L,)
    column). Indexing probs with arange(L)[:, None] and the (L,) ids broadcasts to an (L, L)
    table t[i, j] = softmax(aug_param[i])[op_ids[j]], and the product runs over all L*L entries:
    p = prod_i prod_j pi_i(a_j), not prod_l pi_l(a_l). In float32 it underflows to exactly 0
    at uniform aug_param once 4**(L*L) > 2**149 (L >= 9; ViT-B has L = 12)."""
    probs = F.softmax(aug_param, dim=-1)
    rows = torch.arange(len(op_ids), device=probs.device)[:, None]
    return torch.prod(probs[rows, torch.as_tensor(op_ids, device=probs.device)])


def official_reinforce_update(
    aug_param: torch.Tensor,
    sampled_ops: torch.Tensor,
    rewards: torch.Tensor,
    lr: float = 0.01,
    divisor: float | None = None,
) -> torch.Tensor:
    """One update of the op distribution (L671-680).

    sampled_ops: (M, L) the configurations that enter the update; the official code passes the
    first num_scale entries of its 2 * num_scale forwards (L672 indexes range(num_scale)), i.e.
    both forwards of scales 0 .. num_scale/2 - 1. rewards: (M,) their losses (the batch-mean
    cross entropy of that forward, no baseline). divisor: num_scale (default M).

    new = aug_param + lr * d/d aug_param [ sum_i p_i * r_i / divisor ], p_i = official_trace_prob.
    Closed form: grad[l, k] = sum_i r_i p_i (c_i[k] - L * pi_l[k]) / divisor, where c_i[k]
    counts the layers of configuration i with op k. Plain gradient ascent, no optimizer
    object, no log: the gradient of p, not of log p."""
    g = official_reinforce_grad(aug_param, sampled_ops, rewards, divisor)
    return (aug_param.detach() + lr * g).detach()


def official_reinforce_grad(
    aug_param: torch.Tensor,
    sampled_ops: torch.Tensor,
    rewards: torch.Tensor,
    divisor: float | None = None,
) -> torch.Tensor:
    """d/d aug_param [ sum_i p_i * r_i / divisor ] by autograd, in aug_param's dtype (L677)."""
    theta = aug_param.detach().clone().requires_grad_(True)
    rewards = torch.as_tensor(rewards, dtype=theta.dtype).detach().reshape(-1)
    total = sum(
        official_trace_prob(theta, sampled_ops[i]) * rewards[i] for i in range(len(rewards))
    )
    total = total / (len(rewards) if divisor is None else divisor)
    (g,) = torch.autograd.grad(total, theta)
    return g


def official_reinforce_closed_form(
    aug_param: torch.Tensor, sampled_ops: torch.Tensor, rewards: torch.Tensor, divisor: float
) -> torch.Tensor:
    """The gradient of official_reinforce_update written out (for cross-checks)."""
    pi = F.softmax(aug_param.detach().double(), dim=-1)
    n_layers, n_ops = pi.shape
    g = torch.zeros_like(pi)
    for ops, r in zip(sampled_ops, rewards, strict=True):
        p = official_trace_prob(aug_param.detach().double(), ops)
        counts = torch.bincount(torch.as_tensor(ops), minlength=n_ops).to(pi)
        g += float(r) * p * (counts[None, :] - n_layers * pi)
    return g / divisor


def official_sparsify(attn: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Attention sparsification (L208): the post-softmax map (after attn_drop) times a keep
    mask. keep = u > sparse_p, u uniform of attn's shape (B, H, N, N): every weight, of every
    image, head and query row, dropped independently with probability sparse_p. No
    renormalization: kept rows sum to about 1 - sparse_p. (The paper masks the logits before
    the softmax; the code masks the probabilities after it.)"""
    return attn * keep.float()


def official_shuffle_heads(
    coin: torch.Tensor, perm_u: torch.Tensor, prob: float = 0.5, ratio: float = 0.45
) -> torch.Tensor | None:
    """Which heads a shuffle layer permutes (L242-246): None when coin >= prob, else the first
    int(H * ratio) entries of a random permutation of the H heads (for H = 3 that is one
    head, so the shuffle is the identity; for H = 12, five heads)."""
    if not bool(coin.reshape(-1)[0] < prob):
        return None
    n_heads = perm_u.numel()
    return torch.argsort(perm_u.reshape(-1).cpu())[: int(n_heads * ratio)]


def official_head_shuffle(attn: torch.Tensor, head_indices: torch.Tensor | None) -> torch.Tensor:
    """Head permutation (L244-252) of the post-softmax maps (B, H, N, N): with
    s = sorted(head_indices), out[:, head_indices[r]] = attn[:, s[r]]; the selected heads
    exchange their attention maps (the same for every image), each still applied to its own
    values v; q, k, v and the output are not permuted."""
    if head_indices is None:
        return attn
    ordered = torch.sort(head_indices)[0]
    out = attn.clone()
    out[:, head_indices.to(attn.device)] = attn[:, ordered.to(attn.device)]
    return out.clone()


def official_rest_select(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean-token capture (L128-159): q, k, v (B, H, N, d) of the layer's input, before
    q_norm/k_norm and scaling; token_ids (H, n) token positions in 1..N-1 (the class token 0
    is never taken, the distillation and robust tokens can be), one set per head, the same for
    every image. Returns three (B, H, n, d) tensors, not detached."""
    heads = torch.arange(q.shape[1], device=q.device)[:, None]
    ids = token_ids.to(q.device)
    return q[:, heads, ids], k[:, heads, ids], v[:, heads, ids]


def official_rest_attention(
    mod: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Clean-token injection (L120-125, L162-175): the stored (B, H, n, d) tokens are appended
    to q, k and v along the token axis; attention runs over N + n keys; the n extra query rows
    are cut off, so each real token also attends to the n stored clean keys/values (softmax
    over all N + n). Without a store it is plain attention. Returns (B, H, N, d)."""
    n_tokens = q.shape[2]
    if store is not None:
        q = torch.cat([q, store[0]], dim=2)
        k = torch.cat([k, store[1]], dim=2)
        v = torch.cat([v, store[2]], dim=2)
    q, k = mod.q_norm(q), mod.k_norm(k)
    q = q * mod.scale
    attn = mod.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
    x = attn @ v
    return x[:, :, :n_tokens] if store is not None else x


def official_ghost_moe(mlp: nn.Module, x: torch.Tensor, keeps: list[torch.Tensor]) -> torch.Tensor:
    """Ghost mixture of experts on the block's Mlp (L262-283): n = len(keeps) experts (n drawn
    uniformly from 2..moe_n per call), each fc2(act(fc1(x)) * keep_i) with keep_i = u_i >
    moe_p over the hidden activations (B, N, hidden), no 1/(1-p) rescaling; the output is the
    mean of the experts. drop1, norm and drop2 of timm's Mlp are skipped (identities here)."""
    out = 0.0
    for keep in keeps:
        h = mlp.act(mlp.fc1(x))
        out = out + mlp.fc2(h * keep.float())
    return out / len(keeps)


def official_momentum(grad: torch.Tensor, momentum: Any, decay: float = 1.0) -> torch.Tensor:
    """attack.py L124-128: decay * m + grad / mean|grad| per image (no epsilon)."""
    return momentum * decay + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)


def official_update_delta(
    delta: torch.Tensor, data: torch.Tensor, momentum: torch.Tensor, alpha: float, eps: float
) -> torch.Tensor:
    """attack.py L145-153 (linfty): sign step, clip to [-eps, eps], then to [-x, 1 - x]."""
    delta = torch.clamp(delta + alpha * momentum.sign(), -eps, eps)
    delta = torch.min(torch.max(delta, -data), 1 - data)
    return delta.detach().requires_grad_(True)


def official_robust_update(
    tokens: torch.Tensor, grad: torch.Tensor, momentum: Any, lr: float = 1e-2, decay: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic robust tokens (L506-513, L696-701): m = decay * m + grad (unnormalized), tokens
    = tokens - lr * sign(m): signed descent on the loss, i.e. the tokens make the surrogate
    more robust (classify the current adversarial image correctly)."""
    momentum = momentum * decay + grad
    return (tokens - lr * momentum.sign()).detach().requires_grad_(True), momentum


# --------------------------------------------------------------------------- the model


@dataclass
class _State:
    """What the official module-level global_state holds (L27-75), plus the draw source."""

    draws: Draws
    c: dict[str, Any]
    step: int = 0
    rest: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # L40-42, one slot
    robust: torch.Tensor | None = None  # L43
    log: list = field(default_factory=list)


def _qkv(mod: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    b, n, _ = x.shape
    qkv = mod.qkv(x).reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _out(mod: nn.Module, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    b, n, c = shape
    return mod.proj_drop(mod.proj(x.transpose(1, 2).reshape(b, n, c)))


def _attention_op(mod: nn.Module, op: int, state: _State, x: torch.Tensor, *_a, **_k):
    """The replaced Attention.forward of one layer (L103-259)."""
    q, k, v = _qkv(mod, x)
    c, dev = state.c, x.device
    if op == REST:
        store = state.rest
        if store is None:  # first REST layer since the reset (L126-159): capture, then plain
            n = q.shape[2]
            scores = state.draws("rest_scores", state.step, (q.shape[1], n - 1), dev)
            ids = torch.argsort(scores, dim=1)[:, : int(c["rest_p"] * n)] + 1
            state.rest = official_rest_select(q, k, v, ids)
        return _out(mod, official_rest_attention(mod, q, k, v, store), x.shape)
    q, k = mod.q_norm(q), mod.k_norm(k)
    q = q * mod.scale
    attn = mod.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
    if op == SPARSE:
        u = state.draws("sparse", state.step, tuple(attn.shape), dev)
        attn = official_sparsify(attn, u > c["sparse_p"])
    elif op == SHUFFLE:
        coin = state.draws("shuffle_coin", state.step, (1,), dev)
        heads = None
        if bool(coin.reshape(-1)[0] < c["shuffle_prob"]):
            perm_u = state.draws("shuffle_perm", state.step, (attn.shape[1],), dev)
            heads = official_shuffle_heads(coin, perm_u, c["shuffle_prob"], c["shuffle_ratio"])
        attn = official_head_shuffle(attn, heads)
    else:
        raise ValueError(op)
    return _out(mod, attn @ v, x.shape)


def _moe_op(mod: nn.Module, state: _State, x: torch.Tensor, *_a, **_k) -> torch.Tensor:
    """The replaced Mlp.forward (L262-283)."""
    c = state.c
    u = state.draws("moe_n", state.step, (1,), x.device)
    n = 2 + min(int(float(u.reshape(-1)[0]) * (c["moe_n"] - 1)), c["moe_n"] - 2)
    shape = (*x.shape[:-1], mod.fc1.out_features)
    keeps = [state.draws("moe_mask", state.step, shape, x.device) > c["moe_p"] for _ in range(n)]
    return official_ghost_moe(mod, x, keeps)


def _forward_features(net: nn.Module, state: _State, x: torch.Tensor, *_a, **_k) -> torch.Tensor:
    """vit_forward_features (L286-305): robust tokens appended after the position embedding
    (they get no position embedding), before norm_pre; patch_drop (identity in eval) skipped."""
    x = net.patch_embed(x)
    x = net._pos_embed(x)
    if state.robust is not None:
        x = torch.cat([x, state.robust], dim=1)
    x = net.norm_pre(x)
    x = net.blocks(x)
    return net.norm(x)


def _modules(net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """enumerate_module (L536-552): every timm Attention and Mlp, in module order."""
    attn = [m for m in net.modules() if isinstance(m, Attention)]
    mlp = [m for m in net.modules() if isinstance(m, Mlp)]
    if len(attn) != len(mlp) or not attn:
        raise ValueError("LL2S needs as many timm Attention as Mlp modules")  # L482-484
    for m in attn:
        if not isinstance(m.norm, nn.Identity) or getattr(m, "gate", None) is not None:
            raise ValueError("the official attention replacements ignore norm/gate")
    for m in mlp:
        if not isinstance(m.norm, nn.Identity):
            raise ValueError("the official MoE replacement ignores Mlp.norm")
    return attn, mlp


@contextlib.contextmanager
def _installed(attn: list, mlp: list, ops: torch.Tensor, state: _State) -> Iterator[None]:
    """ModelWrapper (L308-372): layer l gets op ops[l], on its Attention (REST, sparse,
    shuffle) or its Mlp (MoE); exactly one replaced module per layer; restored on exit."""
    touched = []
    try:
        for layer, op in enumerate(int(o) for o in ops):
            if op == MOE:
                mod = mlp[layer]
                mod.forward = functools.partial(_moe_op, mod, state)
            else:
                mod = attn[layer]
                mod.forward = functools.partial(_attention_op, mod, op, state)
            touched.append(mod)
        yield
    finally:
        for mod in touched:
            mod.__dict__.pop("forward", None)


@contextlib.contextmanager
def _features_patched(net: nn.Module, state: _State) -> Iterator[None]:
    """wrap_vit_forward_features (L375-384); official: for the attack object's lifetime."""
    if not isinstance(net, VisionTransformer):
        raise ValueError("LL2S supports timm VisionTransformer sources only")  # L462-469
    net.forward_features = functools.partial(_forward_features, net, state)
    previous = set_fused_attn(net, False)
    try:
        yield
    finally:
        net.__dict__.pop("forward_features", None)
        for m, enabled in previous:
            m.fused_attn = enabled


def _ce(model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """nn.CrossEntropyLoss() (attack.py L159-160): the batch mean."""
    return F.cross_entropy(logits, y + int(getattr(model, "label_offset", 0)))


# --------------------------------------------------------------------------- the attack


def official_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    draws: Draws | None = None,
    steps: int = 10,
    eps: float = 16 / 255,
    **constants: Any,
) -> torch.Tensor:
    """The whole LL2S loop (LL2S.forward, L554-705) on a PixelModel with a timm ViT/DeiT net.

    Per step: num_scale times draw an (L, ops_num) op table from softmax(aug_param) and run
    ops_num forwards of x + delta, each with one configuration (a column) installed; loss =
    sum of the 2 * num_scale batch-mean losses / num_scale; one backward to delta; update
    aug_param from the first num_scale (configuration, loss) pairs; MI-FGSM step; then, for
    dynamic robust tokens, one more forward/backward on the new x + delta to update them.
    aug_param, the clean-token store and the robust tokens start fresh at each call (official:
    at each batch, L576-610).
    """
    unknown = set(constants) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown constants: {sorted(unknown)}")
    c = {**DEFAULTS, **constants}
    draws = draws or default_draws()
    net = model.net
    attn, mlp = _modules(net)
    n_layers = len(attn)
    data = x.detach().clone()
    label = y.detach().clone().to(data.device)
    dev = data.device
    state = _State(draws=draws, c=c)
    trace = c["trace"]

    aug_param = torch.zeros(n_layers, len(OPS))  # L576-580 (CPU, as the official)
    delta = torch.zeros_like(data).requires_grad_(True)  # attack.py L130-143, no random start
    momentum: Any = 0
    kind = c["robust_tokens"]
    tokens: torch.Tensor | None = None
    if kind == "global":  # L590-602: one (T, D) tensor repeated over the batch
        g = c["global_tokens"]
        if g is None:
            raise ValueError("robust_tokens='global' needs global_tokens, a (T, D) tensor")
        tokens = g.to(dev, data.dtype).unsqueeze(0).repeat(len(data), 1, 1).clone()
    elif kind == "dynamic":  # L603-606, L499-504
        shape = (len(data), int(c["num_robust_tokens"]), net.embed_dim)
        tokens = draws("robust_init", 0, shape, dev) * c["robust_init_scale"]
        tokens = tokens.detach().requires_grad_(True)
        momentum_robust: Any = 0.0
    elif kind != "none":
        raise ValueError(kind)

    with _features_patched(net, state):
        for step in range(steps):
            state.step = step
            state.robust = tokens.clone().detach() if tokens is not None else None  # L615-617
            configs, losses = [], []
            for _ in range(c["num_scale"]):  # L624
                u = draws("ops", step, (n_layers, c["ops_num"]), torch.device("cpu"))
                table = official_sample_ops(aug_param, u)  # L629
                for j in range(c["ops_num"]):  # L641
                    configs.append(table[:, j])
                    with _installed(attn, mlp, table[:, j], state):
                        losses.append(_ce(model, model(data + delta), label))  # L653-662
            loss = torch.stack(losses).sum() / c["num_scale"]  # L665
            (grad,) = torch.autograd.grad(loss, delta)  # L668
            used = c["num_scale"]  # L671-674: only the first num_scale entries
            aug_param = official_reinforce_update(
                aug_param,
                torch.stack(configs[:used]),
                torch.stack([v.detach().cpu() for v in losses[:used]]),
                c["ops_lr"],
                divisor=c["num_scale"],
            )
            momentum = official_momentum(grad, momentum, c["decay"])  # L683
            delta = official_update_delta(delta, data, momentum, c["alpha"], eps)  # L684
            if kind == "dynamic":  # L687-701
                state.robust = tokens
                if c["robust_pass"] == "last":
                    with _installed(attn, mlp, configs[-1], state):
                        robust_loss = _ce(model, model(data + delta), label)
                elif c["robust_pass"] == "clean":
                    robust_loss = _ce(model, model(data + delta), label)
                else:
                    raise ValueError(c["robust_pass"])
                (rgrad,) = torch.autograd.grad(robust_loss, tokens)
                tokens, momentum_robust = official_robust_update(
                    tokens, rgrad, momentum_robust, c["robust_lr"], c["decay"]
                )
            if trace is not None:
                trace.setdefault("aug_param", []).append(aug_param.clone())
                trace.setdefault("configs", []).append(torch.stack(configs))
                trace.setdefault("losses", []).append(torch.stack(losses).detach().cpu())
    return (data + delta).detach()
