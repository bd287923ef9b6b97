"""Reference port of VDC (Virtual Dense Connection, Zhang et al., AAAI 2024) for tests.

No code from the paper's authors is known. Two public re-implementations agree on every
constant, and this test-only port follows their computation step by step so that an
implementation can be compared against it. Line numbers cite:

* TA: TransferAttack, `transferattack/model_related/vdc.py` (numpy records, `.cuda()` adds);
* TO: torchattack, `torchattack/vdc.py` (the same computation with torch tensors on the device).

One step of VDC is two forward/backward passes of the source on the same input and loss
(mean cross-entropy; at batch size 1 it equals the summed loss of tgr-bench):

1. record pass (TA 494-501, TO 126-148): module backward hooks in the legacy
   `register_backward_hook` sense (a hook on the autograd node that produced the module's
   output, editing that node's input gradients) record, per block k counted from the output:
   the gradient that the MLP branch sends into the residual stream (the input gradient of
   `norm2`) and the gradient of the pre-softmax attention scores (the node under `attn_drop` is
   the softmax). Record k is that gradient times scale * decay**k, accumulated over the deeper
   blocks of the same stage. The final `norm`'s input gradient, and on PiT the input gradient of
   each stage's pooling conv, are recorded too. The input gradient of this pass is discarded.
2. add pass (TA 503-510, TO 151-163): the same hooks scale the arriving gradient (attention 0.25,
   MLP 0.5) and add the accumulated record of the deeper blocks. This pass's input gradient is
   the step's gradient.

The block counts the re-implementations hard-code for the full-size sources (12 blocks for
ViT/DeiT; 4 + 6 + 3 counted from the output for PiT-B, with stage thresholds 4 and 10; 4 + 4 for
Visformer-S, threshold 4) are derived here from the network's stages, so that the same rules run
on the tiny sources of tests/tiny.py; for the full-size sources they are the literal values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench.attacks.hooks import set_fused_attn

# The per-family constants of both re-implementations.
#   scale:   weight of a record, times decay**k (TA 69, 102 / 146, 157, 169, 196, 205, 215 /
#            254, 265, 298, 307; TO 201, 240 / 301, 312, 324, 362, 371, 381 / 440, 451, 500, 509)
#   decay:   base of the per-block factor decay**k, k counted from the output (same lines)
#   link:    factor, after scale, of the final norm's token-0 gradient and of PiT's pooling
#            gradient (TA 74, 149, 160, 172, 257; TO 204, 304, 315, 327, 443)
#   gamma_record: factor of the arriving gradient in the record pass (TA 329-339, 346-349;
#            TO 536-546, 552-555); 1.0, so the record pass leaves the backward unchanged
#   gamma_attn, gamma_mlp: factors of the arriving gradient in the add pass (TA 331, 333, 340,
#            341, 350, 351; TO 538, 540, 547, 548, 556, 557)
_BASE = {"decay": 0.5, "link": 0.5, "gamma_record": 1.0, "gamma_attn": 0.25, "gamma_mlp": 0.5}
CONSTANTS: dict[str, dict[str, float]] = {
    "vit": {"scale": 0.1, **_BASE},  # vit_base_patch16_224
    "deit": {"scale": 0.1, **_BASE},  # deit_base_distilled_patch16_224: the ViT hooks
    "pit": {"scale": 0.03, **_BASE},  # pit_b_224
    "visformer": {"scale": 0.1, **_BASE},  # visformer_small
}
FAMILIES = tuple(CONSTANTS)


@dataclass(frozen=True)
class _Layout:
    """Where the hooks go in one network, and how its blocks split into stages."""

    blocks: list[nn.Module]  # hooked blocks in forward order (each has norm2 and attn.attn_drop)
    segments: list[int]  # blocks per stage, counted from the output (first: the last stage)
    pools: list[nn.Module]  # modules whose input gradient links stages, in forward order
    # PiT: inside every stage but the last, the record stops accumulating (TA 165-167, 177-179,
    # 211-213, 221-223; TO 320-322, 332-334, 377-379, 387-389); Visformer keeps accumulating
    # (TA 273, 313; TO 459, 515).
    accumulate_inner: bool
    # PiT adds the pooling gradient to the patch tokens of a stage's last block (TA 160, 172;
    # TO 315, 327); Visformer records it but the add is commented out (TA 268; TO 454).
    link_stages: bool


def _layout(net: nn.Module, family: str) -> _Layout:
    """The hooked modules of `family` in `net` (TA 354-404, 405-441; TO 562-605)."""
    if family in ("vit", "deit"):
        blocks = list(net.blocks)  # TA 358: range(12); TO 565, 570
        return _Layout(blocks, [len(blocks)], [], True, False)
    if family == "pit":
        stages = list(net.transformers)  # TA 366-379: 3 + 6 + 4 blocks; TO 575-576
        if net.cls_token.shape[1] != 1:
            raise ValueError("the PiT rules (TA 160, 172) assume one class token")
        blocks = [b for t in stages for b in t.blocks]
        # TA 381-383 hooks transformers[0].pool and [1].pool: the timm layout where a stage's
        # pooling ends it. In today's timm the pooling starts the next stage (TO 577: pools of
        # transformers 1 and 2; transformers[0].pool is None). The same two modules either way.
        pools = [t.pool for t in stages if t.pool is not None]
        return _Layout(blocks, [len(t.blocks) for t in reversed(stages)], pools, False, True)
    if family == "visformer":
        stages = [list(net.stage2), list(net.stage3)]  # TA 388-400: 4 + 4 blocks; TO 581-582
        if any(b.attn is None for s in stages for b in s):
            raise ValueError("the Visformer rules assume attention in every stage2/3 block")
        blocks = [b for s in stages for b in s]
        pools = [net.patch_embed2, net.patch_embed3]  # TA 401-404, TO 583: recorded, unused
        return _Layout(blocks, [len(s) for s in reversed(stages)], pools, True, False)
    raise ValueError(f"VDC re-implementations support {list(FAMILIES)}, not {family!r}")


def _host(g: torch.Tensor) -> np.ndarray:
    """`grad.data.cpu().numpy()` (TA 69, 102, 128, 139, ...). On the GPU that call copies to the
    host; the copy keeps that meaning on a CPU tensor, whose buffer autograd may reuse."""
    return g.detach().cpu().numpy().copy()


class _VDCRun:
    """The state of one VDC step: TA's attributes `attn_record`, `attn_add`, `mlp_record`,
    `mlp_add`, `norm_list`, `stage`, `attn_block`, `mlp_block` (TA 42-57, reset per step at
    485-493); TO's `attn_rec`/`mlp_rec` recorders, `norm_list`, `stage`, `current_attn`,
    `current_mlp` (TO 89, 112-128)."""

    def __init__(self, layout: _Layout, c: dict[str, float], stage: list[np.ndarray]) -> None:
        self.layout = layout
        self.c = c
        self.attn_record: list[np.ndarray] = []
        self.attn_add: list[np.ndarray] = []
        self.mlp_record: list[np.ndarray] = []
        self.mlp_add: list[np.ndarray] = []
        self.norm_list: np.ndarray | None = None
        # Never reset in either re-implementation (TA 50, TO 89): only its first entries are read.
        self.stage = stage
        self.attn_block = 0
        self.mlp_block = 0
        self.fired: Counter[str] = Counter()
        self.nodes: dict[str, str] = {}

    def segment(self, k: int) -> tuple[int, bool]:
        """(stage index counted from the output, whether block k is that stage's deepest block):
        the thresholds `< 4`, `< 10`, `== 4`, `== 10` of TA 145-170, 195-216, 253-266, 297-308
        (TO 300-325, 361-382, 439-452, 499-510) for the network at hand."""
        start = 0
        for s, n in enumerate(self.layout.segments):
            if k < start + n:
                return s, k == start
            start += n
        raise RuntimeError(f"VDC hook fired for block {k} of {start}: extra block calls")

    # ---- record pass -----------------------------------------------------------------------
    def record_norm(self, grad_in: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Final norm: keep its input gradient, leave it unchanged (TA 127-131, 235-239,
        288-292; TO 270-277, 407-416, 480-489)."""
        self.fired["norm"] += 1
        self.norm_list = _host(grad_in[0])
        return grad_in

    def record_pool(self, grad_in: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """PiT pooling: its conv's input gradient (B, C, H, W) as tokens (B, H*W, C), appended
        (TA 135-140, TO 280-290). Visformer patch embeddings: the gradient as is, never read
        (TA 243-248, TO 419-429)."""
        self.fired["pool"] += 1
        g = grad_in[0].data
        if self.layout.link_stages:
            b, ch, h, w = g.shape
            g = g.reshape((b, ch, h * w)).transpose(1, 2)
        self.stage.append(_host(g))
        return grad_in

    def record_mlp(self, grad_in: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`norm2` of block k: record (TA 64-83, 142-182, 250-278; TO 193-212, 292-337,
        431-464). The first record of the last stage also holds the final norm's token-0 row
        (ViT, DeiT, PiT: the class token; Visformer, a (B, C, H, W) map: channel 0); on PiT the
        first record of an earlier stage holds the pooling gradient on its patch tokens."""
        self.fired["mlp"] += 1
        c = self.c
        out_grad = (torch.ones_like(grad_in[0]) * c["gamma_record"]) * grad_in[0][:]
        k = self.mlp_block
        grad_record = _host(grad_in[0]) * c["scale"] * (c["decay"] ** k)
        s, first = self.segment(k)
        if first:
            grad_add = np.zeros_like(grad_record)
            if s == 0:
                assert self.norm_list is not None, "the final norm's hook did not fire first"
                grad_add[:, 0] = self.norm_list[:, 0] * c["scale"] * c["link"]
            elif self.layout.link_stages:
                grad_add[:, 1:] = self.stage[s - 1] * c["scale"] * c["link"]
            self.mlp_add.append(grad_add)
            self.mlp_record.append(grad_record + grad_add)
        else:
            self.mlp_add.append(self.mlp_record[-1])
            if s == 0 or self.layout.accumulate_inner:
                self.mlp_record.append(self.mlp_record[-1] + grad_record)
            else:
                self.mlp_record.append(self.mlp_record[-1])
        self.mlp_block += 1
        return (out_grad, *grad_in[1:])

    def record_attn(self, grad_in: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Softmax under `attn_drop` of block k: record the pre-softmax score gradient
        (TA 98-113, 192-225, 294-317; TO 232-250, 353-391, 491-519)."""
        self.fired["attn"] += 1
        c = self.c
        out_grad = (torch.ones_like(grad_in[0]) * c["gamma_record"]) * grad_in[0][:]
        k = self.attn_block
        grad_record = _host(grad_in[0]) * c["scale"] * (c["decay"] ** k)
        s, first = self.segment(k)
        if first:
            self.attn_add.append(np.zeros_like(grad_record))
            self.attn_record.append(grad_record)
        else:
            self.attn_add.append(self.attn_record[-1])
            if s == 0 or self.layout.accumulate_inner:
                self.attn_record.append(self.attn_record[-1] + grad_record)
            else:
                self.attn_record.append(self.attn_record[-1])
        self.attn_block += 1
        return (out_grad, *grad_in[1:])

    # ---- add pass --------------------------------------------------------------------------
    def add_mlp(self, grad_in: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`norm2` of block k: gamma_mlp * gradient + mlp_add[k] (TA 85-96, 184-190, 280-286;
        TO 214-230, 339-351, 466-478)."""
        self.fired["mlp"] += 1
        out_grad = (torch.ones_like(grad_in[0]) * self.c["gamma_mlp"]) * grad_in[0][:]
        out_grad += torch.tensor(self.mlp_add[self.mlp_block]).to(out_grad.device)
        self.mlp_block += 1
        return (out_grad, *grad_in[1:])

    def add_attn(self, grad_in: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Softmax of block k: gamma_attn * gradient + attn_add[k] (TA 115-125, 227-233,
        319-325; TO 252-268, 393-405, 521-533)."""
        self.fired["attn"] += 1
        out_grad = (torch.ones_like(grad_in[0]) * self.c["gamma_attn"]) * grad_in[0][:]
        out_grad += torch.tensor(self.attn_add[self.attn_block]).to(out_grad.device)
        self.attn_block += 1
        return (out_grad, *grad_in[1:])


Hook = Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


def _legacy_hook(module: nn.Module, hook: Hook, name: str, nodes: dict[str, str]) -> Any:
    """What `module.register_backward_hook(hook)` does (TA 356-440, TO 624): after each forward,
    a hook on the autograd node that produced the module's output (the first tensor of a tuple
    output), called with that node's input gradients, which it replaces. Written out so that the
    node is known and checked: the softmax under `attn_drop` (eval dropout returns its input),
    the layer/batch norm of `norm2` and `norm`, the conv of PiT's pooling, the last batch norm
    of Visformer's patch embeddings."""

    def forward_hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        var = out
        while not isinstance(var, torch.Tensor):
            var = var[0]
        node = var.grad_fn
        if node is None:
            return
        nodes[name] = node.name()
        if name.endswith("attn_drop") and node.name() != "SoftmaxBackward0":
            raise RuntimeError(f"{name}: the attention map does not come from a softmax")

        def post(grad_inputs: tuple[torch.Tensor, ...], grad_outputs: Any) -> Any:
            return hook(grad_inputs)

        node.register_hook(post)

    return module.register_forward_hook(forward_hook)


def _install(net: nn.Module, run: _VDCRun, record: bool) -> list[Any]:
    """The hooks of one pass (record: TA 354-404, TO 562-585; add: TA 405-441, TO 587-605)."""
    names = {m: n for n, m in net.named_modules()}
    lay = run.layout
    hooks: list[tuple[nn.Module, Hook]] = []
    if record:
        hooks.append((net.norm, run.record_norm))
        hooks += [(p, run.record_pool) for p in lay.pools]
    for block in lay.blocks:
        hooks.append((block.norm2, run.record_mlp if record else run.add_mlp))
        hooks.append((block.attn.attn_drop, run.record_attn if record else run.add_attn))
    return [_legacy_hook(m, h, names[m], run.nodes) for m, h in hooks]


def _pass(
    model: nn.Module, net: nn.Module, run: _VDCRun, x: torch.Tensor, y: torch.Tensor, record: bool
) -> torch.Tensor:
    """One forward/backward with the pass's hooks: loss = mean cross-entropy of x + delta
    (TA 496-498 and 507-509 with `nn.CrossEntropyLoss()`, attack.py 110-115, 155-160;
    TO 131-138, 156-163). Returns d loss / d delta; the counters restart at 0 (TA 491-492,
    503-504; TO 126-127, 151-152)."""
    run.attn_block = run.mlp_block = 0
    run.fired.clear()
    delta = torch.zeros_like(x, requires_grad=True)
    handles = _install(net, run, record)
    try:
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
    finally:
        for h in handles:
            h.remove()
    n = len(run.layout.blocks)
    expected = {"mlp": n, "attn": n}
    if record:
        expected |= {"norm": 1, "pool": len(run.layout.pools)}
    fired = {k: run.fired[k] for k in expected}
    if fired != expected:
        raise RuntimeError(f"VDC hooks fired {fired}, expected {expected} (fused attention?)")
    return grad


def official_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    family: str,
    *,
    stage: list[np.ndarray] | None = None,
    report: dict[str, Any] | None = None,
    **constants: float,
) -> torch.Tensor:
    """d loss / d x of VDC's first step (delta = 0), as the re-implementations compute it.

    model: a `tgr_bench.models.PixelModel` (hooks go on `model.net`), in eval mode; x (1,3,H,W)
    in [0,1]; y (1,). Larger batches run as the re-implementations run them (mean loss, every
    record per sample). Constants default to `CONSTANTS[family]`; override any by keyword.

    stage: the PiT pooling records. Both re-implementations keep this list across steps, images
    and batches and only ever read its first two entries (TA 160, 172; TO 315, 327), those of the
    first record pass of their attack object. None (a new list) gives the first image of a run;
    pass the same list to later calls to reproduce the stale state.
    report: if given, filled with the hook counts of each pass and the hooked autograd nodes.

    The step (TA 484-510, TO 120-163): record pass, whose input gradient is dropped (TA 499,
    TO 144-145); add pass, whose input gradient is returned. Fused attention is switched off while
    the hooks are in place (else `attn_drop` never runs) and restored afterwards.
    """
    if family not in CONSTANTS:
        raise ValueError(f"VDC re-implementations support {list(FAMILIES)}, not {family!r}")
    unknown = set(constants) - set(CONSTANTS[family])
    if unknown:
        raise TypeError(f"unknown VDC constants {sorted(unknown)}; use {sorted(CONSTANTS[family])}")
    c = {**CONSTANTS[family], **constants}
    net = model.net
    layout = _layout(net, family)
    run = _VDCRun(layout, c, [] if stage is None else stage)
    previous = set_fused_attn(net, False)
    try:
        _pass(model, net, run, x, y, record=True)
        recorded = dict(run.fired)
        grad = _pass(model, net, run, x, y, record=False)
    finally:
        for m, flag in previous:
            m.fused_attn = flag
    if report is not None:
        report.update(
            record=recorded,
            add=dict(run.fired),
            nodes=dict(run.nodes),
            segments=list(layout.segments),
        )
    return grad
