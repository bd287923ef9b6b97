"""LL2S (NeurIPS 2025, arXiv 2504.10804, "Harnessing the Computation Redundancy in ViTs to Boost
Adversarial Transferability"): MI-FGSM whose every forward pass of the source runs, in each
block, one operation drawn from a learned distribution (docs/ll2s.md).

Followed: TransferAttack (Trustworthy-AI-Group/TransferAttack),
transferattack/model_related/ll2s.py. Per step and per image: num_scale tables of ops_num
configurations are drawn from softmax(aug_param) (one op per block: clean-token injection REST,
attention sparsification, head shuffling, ghost MoE), each configuration is one forward of
x + delta, the loss is the sum of the num_scale * ops_num cross-entropies / num_scale, and
aug_param takes one REINFORCE step from the first num_scale (configuration, loss) pairs. Robust
tokens appended after the position embedding make the source harder to fool: `dynamic` ones are
learned by signed descent after each step, `global` ones are read from a file, `none` disables
them.

Everything belongs to one image and starts fresh for it (aug_param, clean-token store, robust
tokens, every random draw keyed by the image's seed), so an image's result never depends on its
batch; the official code learns one aug_param and one clean-token draw for the whole batch.
An image's operation of a block is a device tensor, so every block computes what each operation
needs and each image keeps its own with `torch.where`: no host syncs.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench.attacks.architectures import Family
from tgr_bench.attacks.base import MIFGSM, MISettings
from tgr_bench.attacks.draws import mix, randint
from tgr_bench.attacks.hooks import set_fused_attn
from tgr_bench.errors import UserError
from tgr_bench.hashing import sha256_file
from tgr_bench.schema import Levels, key

# The columns of aug_param, in the official op_list order.
OPS = ("rest", "sparse", "shuffle", "moe")
REST, SPARSE, SHUFFLE, MOE = range(4)
ROBUST_KINDS = ("dynamic", "global", "none")
# Tags that separate the draw streams of one image.
_OPS, _ATTN, _MOE_N, _MOE, _INIT, _PROBE = 0x0B5, 0xA77, 0x30E, 0x30F, 0x1A1, 0x9B0


@dataclass(frozen=True)
class LL2SSettings(MISettings):
    """attack=ll2s: learned per-block forward operations plus robust tokens (ViT/DeiT only)."""

    name: str = key("ll2s")
    alpha: Levels | None = key(1.6, help="step size in pixel levels (official: a fixed 1.6/255)")
    num_scale: int = key(
        10,
        low=1,
        help="op tables per step; also the loss divisor and the "
        "number of (configuration, loss) pairs of the REINFORCE update",
    )
    ops_num: int = key(2, low=1, help="configurations (forwards) per op table")
    ops_lr: float = key(0.01, low=0, help="learning rate of aug_param (gradient ascent)")
    rest_p: float = key(0.3, low=0, high=1, help="REST: fraction of tokens stored per head")
    sparse_p: float = key(0.4, low=0, high=1, help="drop probability of each attention weight")
    shuffle_prob: float = key(0.5, low=0, high=1, help="probability that a shuffle layer acts")
    shuffle_ratio: float = key(0.45, low=0, high=1, help="fraction of heads permuted")
    moe_n: int = key(5, low=2, help="ghost MoE: experts drawn uniformly from 2..moe_n")
    moe_p: float = key(0.3, low=0, high=1, help="ghost MoE: drop probability of a hidden unit")
    robust_tokens: str = key(
        "dynamic",
        options=ROBUST_KINDS,
        help="dynamic (learned per image) | global (robust_tokens_file) | none",
    )
    robust_tokens_file: str | None = key(
        None, help="a torch file of one (tokens, embed_dim) tensor, for robust_tokens=global"
    )
    num_robust_tokens: int = key(400, low=1, help="dynamic robust tokens per image")
    robust_lr: float = key(1e-2, low=0, help="sign step of the dynamic robust tokens")
    robust_init_scale: float = key(10.0, low=0, help="dynamic tokens start as N(0, 1) * this")

    def check(self, where: str) -> None:
        super().check(where)
        on = [m for m in ("patchout", "di", "si", "admix") if getattr(self, m).enabled]
        if on:
            raise UserError(
                f"{where}: LL2S runs its own forward operations and takes no input modifier; "
                f"disable {', '.join(f'{where}.{m}' for m in on)}."
            )
        if (self.robust_tokens == "global") != (self.robust_tokens_file is not None):
            raise UserError(
                f"{where}.robust_tokens_file is set exactly when {where}.robust_tokens=global "
                f"(got robust_tokens={self.robust_tokens}, robust_tokens_file="
                f"{self.robust_tokens_file}); the official global tokens are not published."
            )


# ---- the pieces, each an official operation batched over images ------------------------------
def sample_ops(aug: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, S*J, L) op ids: forward s*J + j of image b runs, in block l, the inverse CDF of
    softmax(aug[b, l]) at u[b, s, l, j] (select_op: torch.multinomial with replacement)."""
    cdf = F.softmax(aug.detach().float(), dim=-1).cumsum(-1)  # (B, L, K)
    b, s, n_layers, j = u.shape
    u = u.permute(0, 1, 3, 2).reshape(b, s * j, n_layers)
    ids = (u.unsqueeze(-1) >= cdf.unsqueeze(1)).sum(-1)
    return ids.clamp(max=cdf.shape[-1] - 1)


def reinforce_step(
    aug: torch.Tensor, ops: torch.Tensor, rewards: torch.Tensor, lr: float, divisor: float
) -> torch.Tensor:
    """aug + lr * d/d aug [sum_i p_i r_i / divisor] per image (official L671-680). ops (B, M, L),
    rewards (B, M). p_i is the official trace_prob: its indexing broadcasts to the (L, L) table
    softmax(aug[i])[ops[j]] and multiplies all L*L entries (kept as released)."""
    with torch.enable_grad():
        theta = aug.detach().requires_grad_(True)
        probs = F.softmax(theta, dim=-1)
        b, m, n_layers = ops.shape
        table = probs.unsqueeze(1).expand(b, m, n_layers, probs.shape[-1])
        picked = table.gather(3, ops.unsqueeze(2).expand(b, m, n_layers, n_layers))
        p = picked.flatten(2).prod(-1)  # (B, M)
        (g,) = torch.autograd.grad((p * rewards.detach().to(p.dtype)).sum() / divisor, theta)
    return (aug.detach() + lr * g).detach()


def shuffle_source(
    coin: torch.Tensor, perm_u: torch.Tensor, act: torch.Tensor, prob: float, ratio: float
) -> torch.Tensor:
    """(B, H) source head of each head: the first int(H * ratio) heads of argsort(perm_u), idx,
    take the maps of sorted(idx) (out[:, idx[r]] = attn[:, sorted(idx)[r]], official L244-252)
    where act & (coin < prob); every other head keeps its own map."""
    b, heads = perm_u.shape
    idx = perm_u.argsort(dim=1)[:, : int(heads * ratio)]
    base = torch.arange(heads, device=perm_u.device).expand(b, heads)
    src = base.scatter(1, idx, idx.sort(dim=1).values)
    return torch.where((act & (coin.view(b) < prob)).unsqueeze(1), src, base)


def ghost_moe_factor(
    keeps: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The mean of the experts' keep masks: the mean of fc2(h * keep_i) over experts is
    fc2(h * mean_i keep_i), fc2 being affine (equal up to rounding to the official sum)."""
    return torch.stack([k.to(dtype) for k in keeps]).mean(0)


class AttnDraws(NamedTuple):
    sparse: torch.Tensor  # (H, N, N) uniform: a weight is kept where u > sparse_p
    rest: torch.Tensor  # (H, N - 1) uniform: head h stores tokens 1 + argsort(u[h])[:n]
    coin: torch.Tensor  # (1,) uniform: a shuffle block permutes when u < shuffle_prob
    perm: torch.Tensor  # (H,) uniform: the permutation is argsort(u)


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(mix(*parts) >> 1)


def ops_draw(
    key_: int, step: int, scales: int, layers: int, ops_num: int, device: torch.device
) -> torch.Tensor:
    """(S, L, J) uniforms of one image's op tables at a step."""
    g = _generator(device, key_, _OPS, step)
    return torch.rand(scales * layers * ops_num, generator=g, device=device).view(
        scales, layers, ops_num
    )


def attn_draws(
    key_: int, step: int, forward: int, layer: int, heads: int, tokens: int, device: torch.device
) -> AttnDraws:
    """One image's attention draws of block `layer` in forward `forward` of a step."""
    g = _generator(device, key_, _ATTN, step, forward, layer)
    sparse = torch.rand(heads * tokens * tokens, generator=g, device=device)
    rest = torch.rand(heads * (tokens - 1), generator=g, device=device)
    coin = torch.rand(1, generator=g, device=device)
    perm = torch.rand(heads, generator=g, device=device)
    return AttnDraws(sparse.view(heads, tokens, tokens), rest.view(heads, tokens - 1), coin, perm)


def moe_experts(key_: int, step: int, forward: int, layer: int, moe_n: int) -> int:
    """One image's expert count in a block, uniform on 2..moe_n (a host draw)."""
    return randint(mix(key_, _MOE_N, step, forward, layer), 2, moe_n + 1)


def moe_draws(
    key_: int, step: int, forward: int, layer: int, n: int, shape: tuple, device: torch.device
) -> list[torch.Tensor]:
    """One image's n expert masks' uniforms (N, hidden): a unit is kept where u > moe_p."""
    g = _generator(device, key_, _MOE, step, forward, layer)
    numel = shape[0] * shape[1]
    return [torch.rand(numel, generator=g, device=device).view(shape) for _ in range(n)]


def robust_init(key_: int, tokens: int, dim: int, device: torch.device) -> torch.Tensor:
    """One image's dynamic robust tokens' standard normal start (T, D)."""
    g = _generator(device, key_, _INIT)
    return torch.randn(tokens * dim, generator=g, device=device).view(tokens, dim)


@dataclass
class _Plan:
    """What the patched forwards of one forward pass read."""

    ops: torch.Tensor  # (B, L) op ids
    keys: Sequence[int]
    step: int
    forward: int


class LL2S(MIFGSM):
    name = "ll2s"
    Settings = LL2SSettings
    reference = (
        "LL2S: Harnessing the Computation Redundancy in ViTs to Boost Adversarial "
        "Transferability, NeurIPS 2025 (arXiv 2504.10804)"
    )

    def __init__(self, settings: LL2SSettings | None = None, family: Family | None = None) -> None:
        super().__init__(settings, family)
        if family is None or family.name != "vit":
            shown = f"the {family.name} family" if family else "a source of no family"
            raise UserError(
                f"LL2S supports only ViT/DeiT sources (timm VisionTransformer: vit_*, deit_*), "
                f"not {shown}."
            )
        self.s: LL2SSettings = self.settings  # type: ignore[assignment]
        self.forwards = self.s.num_scale * self.s.ops_num
        self.global_tokens = self._load_tokens() if self.s.robust_tokens == "global" else None
        self.fired: Counter[str] = Counter()
        self._plan: _Plan | None = None
        self._inject: torch.Tensor | None = None
        self._global: torch.Tensor | None = None
        self._attn: list[nn.Module] = []
        self._tokens: torch.Tensor | None = None
        self._m_robust: torch.Tensor | None = None
        self._aug: torch.Tensor | None = None
        self._store: tuple[torch.Tensor, ...] | None = None
        self._has_store: torch.Tensor | None = None

    def _load_tokens(self) -> torch.Tensor:
        path = str(self.s.robust_tokens_file)
        if not os.path.isfile(path):
            raise UserError(f"attack.robust_tokens_file={path} does not exist.")
        try:
            tokens = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file gets the same one line
            raise UserError(
                f"attack.robust_tokens_file={path} is not a torch tensor file: {e}"
            ) from None
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not tokens.numel():
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
            raise UserError(
                f"attack.robust_tokens_file={path} must hold one (tokens, embed_dim) tensor "
                f"(the official global tokens are 400 x 768), got {shape}."
            )
        return tokens.float()

    def params(self) -> dict[str, Any]:
        s = self.s
        out = {
            **super().params(),
            "num_scale": s.num_scale,
            "ops_num": s.ops_num,
            "ops_lr": s.ops_lr,
            "rest_p": s.rest_p,
            "sparse_p": s.sparse_p,
            "shuffle_prob": s.shuffle_prob,
            "shuffle_ratio": s.shuffle_ratio,
            "moe_n": s.moe_n,
            "moe_p": s.moe_p,
            "robust_tokens": s.robust_tokens,
        }
        if s.robust_tokens == "dynamic":
            out.update(
                num_robust_tokens=s.num_robust_tokens,
                robust_lr=s.robust_lr,
                robust_init_scale=s.robust_init_scale,
            )
        if s.robust_tokens == "global":  # the file's content, not its path, is the identity
            out["robust_tokens_sha256"] = sha256_file(str(s.robust_tokens_file))[:16]
        return out

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "ll2s_fired": dict(self.fired)}

    # ---- the patched forwards ----------------------------------------------------------------
    def _attention(
        self, mod: nn.Module, layer: int, original: Any, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Attention.forward during LL2S forwards (official L103-259): each image runs its op."""
        plan = self._plan
        if plan is None:
            return original(x, *args, **kwargs)
        self.fired[f"attn{layer}"] += 1
        b, n, c = x.shape
        qkv = mod.qkv(x).reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        heads, dev = q.shape[1], x.device
        d = [attn_draws(s, plan.step, plan.forward, layer, heads, n, dev) for s in plan.keys]
        op = plan.ops[:, layer]
        rest = op == REST
        captured = self._capture(q, k, v, torch.stack([e.rest for e in d]))
        if self._store is None:
            self._store = tuple(torch.zeros_like(t) for t in captured)
        use = rest & self._has_store
        x_rest = self._rest_attention(mod, q, k, v, self._store)
        capture = rest & ~self._has_store
        self._store = tuple(
            torch.where(capture.view(b, 1, 1, 1), new, old)
            for new, old in zip(captured, self._store, strict=True)
        )
        self._has_store = self._has_store | rest
        q, k = mod.q_norm(q), mod.k_norm(k)
        attn = mod.attn_drop(((q * mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        keep = (torch.stack([e.sparse for e in d]) > self.s.sparse_p) | (op != SPARSE).view(
            b, 1, 1, 1
        )
        attn = torch.where(keep, attn, 0.0)
        src = shuffle_source(
            torch.stack([e.coin for e in d]),
            torch.stack([e.perm for e in d]),
            op == SHUFFLE,
            self.s.shuffle_prob,
            self.s.shuffle_ratio,
        )
        attn = attn.gather(1, src.view(b, heads, 1, 1).expand_as(attn))
        out = torch.where(use.view(b, 1, 1, 1), x_rest, attn @ v)
        return mod.proj_drop(mod.proj(out.transpose(1, 2).reshape(b, n, c)))

    def _capture(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The clean tokens each head would store here (official L128-159): per image and head,
        int(rest_p * N) distinct tokens of 1..N-1 (never the class token), q, k and v."""
        n = int(self.s.rest_p * q.shape[2])
        ids = (scores.argsort(dim=-1)[..., :n] + 1).unsqueeze(-1).expand(-1, -1, -1, q.shape[3])
        return tuple(t.gather(2, ids) for t in (q, k, v))

    @staticmethod
    def _rest_attention(
        mod: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        store: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        """Clean-token injection (official L120-125, L162-175): the stored keys and values join
        the layer's own; the stored queries' rows, which the official code computes and cuts
        off, are not computed (each row's softmax is its own)."""
        k = torch.cat([k, store[1]], dim=2)
        v = torch.cat([v, store[2]], dim=2)
        q, k = mod.q_norm(q), mod.k_norm(k)
        return mod.attn_drop(((q * mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v

    def _mlp(self, mod: nn.Module, layer: int, original: Any, x: torch.Tensor) -> torch.Tensor:
        """Mlp.forward during LL2S forwards: ghost MoE (official L262-283) where chosen."""
        plan = self._plan
        if plan is None:
            return original(x)
        self.fired[f"mlp{layer}"] += 1
        h = mod.norm(mod.drop1(mod.act(mod.fc1(x))))
        shape = tuple(h.shape[1:])
        factors = []
        for s in plan.keys:
            n = moe_experts(s, plan.step, plan.forward, layer, self.s.moe_n)
            u = moe_draws(s, plan.step, plan.forward, layer, n, shape, x.device)
            factors.append(ghost_moe_factor([e > self.s.moe_p for e in u], h.dtype))
        moe = (plan.ops[:, layer] == MOE).view(-1, 1, 1)
        factor = torch.where(moe, torch.stack(factors), 1.0)
        return mod.drop2(mod.fc2(h * factor))

    def _append_tokens(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Robust tokens after the position embedding, before norm_pre (official L286-305)."""
        if self._inject is None:
            return None
        self.fired["robust"] += 1
        return (torch.cat([args[0], self._inject.to(args[0].dtype)], dim=1), *args[1:])

    # ---- the source ----------------------------------------------------------------------------
    def _modules(self, net: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """Every block's timm Attention and Mlp (official enumerate_module), checked to be the
        plain ones the official replacements rewrite."""
        from timm.layers import Attention, Mlp
        from timm.models.vision_transformer import VisionTransformer

        blocks = list(getattr(net, "blocks", []))
        ok = (
            isinstance(net, VisionTransformer)
            and blocks
            and all(
                isinstance(getattr(b, "attn", None), Attention)
                and isinstance(getattr(b, "mlp", None), Mlp)
                and isinstance(b.attn.norm, nn.Identity)
                and isinstance(b.mlp.norm, nn.Identity)
                for b in blocks
            )
        )
        if not ok:
            raise UserError(
                f"LL2S supports only ViT/DeiT sources whose blocks hold plain timm Attention and "
                f"Mlp modules; the source is a {type(net).__name__}."
            )
        return [b.attn for b in blocks], [b.mlp for b in blocks]

    @contextlib.contextmanager
    def source_context(self, model: nn.Module) -> Iterator[None]:
        net = getattr(model, "net", model)
        attn, mlp = self._modules(net)
        if self.global_tokens is not None and self.global_tokens.shape[1] != net.embed_dim:
            raise UserError(
                f"attack.robust_tokens_file={self.s.robust_tokens_file} holds "
                f"{tuple(self.global_tokens.shape)} tokens; this source needs (tokens, "
                f"{net.embed_dim})."
            )
        device = next(iter(model.buffers()), torch.empty(0)).device
        # Moved once here, before the loop, so that no step copies host data to the device.
        self._global = None if self.global_tokens is None else self.global_tokens.to(device)
        previous = set_fused_attn(net, False)
        self._attn = attn
        for i, (a, m) in enumerate(zip(attn, mlp, strict=True)):
            a.forward = functools.partial(self._attention, a, i, a.forward)
            m.forward = functools.partial(self._mlp, m, i, m.forward)
        handle = net.norm_pre.register_forward_pre_hook(self._append_tokens)
        try:
            self._probe(model, len(attn))
            yield
        finally:
            handle.remove()
            for mod in (*attn, *mlp):
                mod.__dict__.pop("forward", None)
            for m, flag in previous:
                m.fused_attn = flag
            self._plan = self._inject = None
            self._store = self._tokens = self._aug = None

    def _probe(self, model: nn.Module, layers: int) -> None:
        """One forward with every operation somewhere and robust tokens appended: every block's
        patched Attention and Mlp and the token hook must fire (else a timm change would leave
        part of the source unmodified)."""
        size = getattr(model, "input_size", 224)
        device = next(iter(model.buffers()), torch.empty(0)).device
        x = torch.linspace(0.4, 0.6, 3 * size * size, device=device).view(1, 3, size, size)
        dim = self._attn[0].qkv.in_features
        self._inject = torch.zeros(1, 2, dim, device=device)
        self._has_store = torch.zeros(1, dtype=torch.bool, device=device)
        ops = torch.arange(layers, device=device).remainder(len(OPS)).view(1, layers)
        self._plan = _Plan(ops, [_PROBE], 0, 0)
        self.fired.clear()
        try:
            with torch.no_grad():
                model(x)
        finally:
            self._plan = self._inject = self._store = None
        want = [f"{p}{i}" for i in range(layers) for p in ("attn", "mlp")] + ["robust"]
        silent = [w for w in want if self.fired[w] == 0]
        if silent:
            raise UserError(
                f"LL2S: the patched forward(s) {silent[:6]} never ran during the probe: part of "
                f"the source would run unmodified. Did the timm version change how "
                f"VisionTransformer calls its blocks?"
            )
        self.fired.clear()

    # ---- the loop --------------------------------------------------------------------------------
    def _start(self, x: torch.Tensor, seeds: Sequence[int]) -> None:
        """Fresh per-image state at an image's first step (official L576-610, per batch)."""
        b, dev, layers = len(x), x.device, len(self._attn)
        self._aug = torch.zeros(b, layers, len(OPS), device=dev)
        self._store = None
        self._has_store = torch.zeros(b, dtype=torch.bool, device=dev)
        self._tokens = self._m_robust = None
        dim = self._attn[0].qkv.in_features
        if self.s.robust_tokens == "dynamic":
            t = self.s.num_robust_tokens
            init = torch.stack([robust_init(s, t, dim, dev) for s in seeds])
            self._tokens = (init * self.s.robust_init_scale).to(x.dtype)
            self._m_robust = torch.zeros_like(self._tokens)
        elif self._global is not None:
            self._tokens = self._global.to(x.dtype).expand(b, -1, -1).clone()

    def _losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each image's loss (the official batch mean is this at batch 1); targeted: descend."""
        loss = F.cross_entropy(logits, y, reduction="none")
        return -loss if self.targeted else loss

    def _robust_update(
        self, model: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Dynamic robust tokens (official L687-701, L506-513): after the image step, one
        forward of the new x + delta with the original source; m = decay * m + grad, tokens
        -= robust_lr * sign(m): they make the source classify the adversarial image better."""
        tokens = self._tokens.detach().requires_grad_(True)
        self._inject = tokens
        try:
            with torch.enable_grad():
                loss = self._losses(model(x + delta.detach()), y).sum()
                (g,) = torch.autograd.grad(loss, tokens)
        finally:
            self._inject = None
        self._m_robust = self._m_robust * self.decay + g
        self._tokens = (tokens - self.s.robust_lr * self._m_robust.sign()).detach()

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
        """d loss / d delta over the step's num_scale * ops_num forwards (official L613-684);
        updates aug_param, and first the dynamic tokens from the previous step."""
        if step == 0:
            self._start(x, seeds)
        elif self.s.robust_tokens == "dynamic":
            self._robust_update(model, x, delta, y)
        s = self.s
        u = torch.stack(
            [ops_draw(k, step, s.num_scale, len(self._attn), s.ops_num, x.device) for k in seeds]
        )
        ops = sample_ops(self._aug, u)  # (B, forwards, L)
        delta = delta.detach().requires_grad_(True)
        inputs = x + delta
        self._inject = None if self._tokens is None else self._tokens.detach()
        losses = []
        try:
            for f in range(self.forwards):
                self._plan = _Plan(ops[:, f], seeds, step, f)
                losses.append(self._losses(model(inputs), y))
        finally:
            self._plan = self._inject = None
        table = torch.stack(losses, 1)  # (B, forwards)
        (grad,) = torch.autograd.grad(table.sum() / s.num_scale, delta)
        # Later steps reach the store as a constant: their delta is a new leaf.
        self._store = tuple(t.detach() for t in self._store)
        used = s.num_scale  # official: the first num_scale forwards, not one per table
        self._aug = reinforce_step(self._aug, ops[:, :used], table[:, :used], s.ops_lr, used)
        return grad
