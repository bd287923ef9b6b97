"""VDC, Virtual Dense Connection (Zhang et al., AAAI 2024), docs/vdc.md.

MI-FGSM where each step runs the source forward and backward twice on the same input and loss.
The record pass leaves the backward unchanged and records, for every attention block k counted
from the output, the gradient of the pre-softmax attention scores and the gradient that the MLP
branch sends into the residual stream (the input gradient of `norm2`), each weighted
scale * block_decay**k and summed over the deeper blocks of the same stage (the first record of
the last stage also holds the final norm's token-0 gradient; on PiT the first record of an earlier
stage holds the pooling gradient on its patch tokens). The add pass scales the arriving gradients
(attention gamma.attn, MLP gamma.mlp) and adds, at block k, the summed records of the blocks deeper
than k: the virtual dense connections. Its input gradient is the step's gradient.

No code from the paper's authors is public; this follows the two re-implementations, which
agree on every constant: TransferAttack `transferattack/model_related/vdc.py` and torchattack
`torchattack/vdc.py`. Departures (docs/vdc.md): records are device tensors, one row per image
and fresh for every step (the re-implementations keep PiT's pooling records from the first step
of their first batch for the rest of the run); the summed loss keeps an image's gradient
independent of its batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tgr_bench.attacks.architectures import (
    INPUT,
    SCALE,
    SOFTMAX_INPUT,
    BoundSite,
    Family,
    Site,
)
from tgr_bench.attacks.base import MISettings
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.errors import UserError
from tgr_bench.schema import AUTO, key

# The record weight `scale` per family (TransferAttack vdc.py: 0.1 in the ViT/DeiT and Visformer
# hooks, 0.03 in the PiT hooks; torchattack vdc.py the same).
SCALE_AUTO = {"vit": 0.1, "pit": 0.03, "visformer": 0.1}
SUPPORTED = "ViT/DeiT (vit), PiT (pit) and Visformer (visformer)"

# The sites VDC hooks, in the sense of architectures.py (whose tables hold TGR's and SGM's):
# the legacy module backward hooks of the re-implementations edit the input gradients of the
# autograd node that produced the module's output. For `norm2`, the final `norm` and PiT's
# pooling conv that is the gradient into the module's input (INPUT); for `attn_drop` (eval
# dropout returns its input) the node is the softmax, whose input is the pre-softmax scores.
ATTN = Site("attn", "attn.attn_drop", SOFTMAX_INPUT, SCALE)
MLP = Site("mlp", "norm2", INPUT, SCALE)
NORM = Site("norm", "norm", INPUT, SCALE)
POOL = Site("pool", "conv", INPUT, SCALE)

RECORD, ADD = "record", "add"


@dataclass(frozen=True)
class Gamma:
    """Factors of the gradient arriving at each hooked block site, per pass."""

    attn: float = key(0.25, low=0, high=1, help="add pass: attention score gradient")
    mlp: float = key(0.5, low=0, high=1, help="add pass: MLP branch gradient into the stream")
    record: float = key(1.0, low=0, high=1, help="record pass, both sites (1: unchanged)")


@dataclass(frozen=True)
class VDCSettings(MISettings):
    """attack=vdc: virtual dense connections between the attention blocks' gradients."""

    name: str = key("vdc")
    scale: float = key(
        AUTO, low=0, auto=True, help="record weight; auto: 0.1 on ViT/DeiT and Visformer, 0.03 PiT"
    )
    block_decay: float = key(
        0.5, low=0, high=1, help="record of block k (counted from the output) times decay**k"
    )
    link: float = key(
        0.5, low=0, help="factor, after scale, of the final norm's token-0 and PiT's pool gradient"
    )
    gamma: Gamma = key(Gamma)


@dataclass(frozen=True)
class Layout:
    """How a family's attention blocks split into stages, and its stage rules."""

    segments: tuple[int, ...]  # blocks per stage, counted from the output
    # PiT: inside every stage but the last, the record stops accumulating after the stage's
    # deepest block (the re-implementations comment the sum out there); ViT and Visformer sum.
    accumulate_inner: bool
    # PiT adds the pooling gradient to the patch tokens of a stage's deepest block; Visformer's
    # re-implementations record their patch-embedding gradient but comment the add out, so the
    # record is never read and is not taken here.
    link_stages: bool


@dataclass
class Records:
    """One step's records, device tensors with one row per image (per copy with SI/Admix):
    built by the record pass and read by the add pass of the same step, then dropped."""

    norm: torch.Tensor | None = None  # final norm's token-0 gradient * scale * link
    pool: dict[int, torch.Tensor] = field(default_factory=dict)  # by stage from the output
    add: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: {"attn": {}, "mlp": {}})
    total: dict[str, dict[int, torch.Tensor]] = field(
        default_factory=lambda: {"attn": {}, "mlp": {}}
    )


def _stages(
    net: nn.Module, family: str
) -> tuple[list[list[nn.Module]], list[tuple[int, nn.Module]], bool]:
    """(attention blocks per stage in forward order; PiT's pooling convs, each with the forward
    stage whose output it reads; whether the PiT stage rules apply), refusing layouts the
    re-implementations' rules do not cover."""
    if isinstance(getattr(net, "norm", None), nn.Identity | None):
        raise UserError(
            f"VDC records the gradient of the final norm, which this {type(net).__name__} does not "
            f"have (a pooled-head variant): use a source whose features end in a norm."
        )
    if family == "vit":
        return [list(net.blocks)], [], False
    if family == "pit":
        if net.cls_token.shape[1] != 1:
            raise UserError(
                "VDC's PiT rules treat token 0 as the class token and the others as patches; "
                "this PiT has several class tokens (distilled): use a non-distilled PiT."
            )
        stages = list(net.transformers)
        # timm's pooling starts a stage (transformers[i].pool reads stage i - 1); the timm of
        # TransferAttack ended a stage with it: the same two convs either way.
        pools = [(i - 1, t.pool.conv) for i, t in enumerate(stages) if t.pool is not None]
        return [list(t.blocks) for t in stages], pools, True
    stages = [list(net.stage2), list(net.stage3)]
    if any(getattr(b, "attn", None) is None for s in stages for b in s):
        raise UserError(
            "VDC's Visformer rules hook attention in every stage2 and stage3 block; this "
            "Visformer has blocks without attention there."
        )
    return stages, [], False


class VDC(GradientHookAttack):
    name = "vdc"
    reference = (
        "VDC: Zhang et al., Improving the Adversarial Transferability of Vision Transformers "
        "with Virtual Dense Connection, AAAI 2024"
    )

    Settings = VDCSettings

    def __init__(self, settings: VDCSettings | None = None, family: Family | None = None) -> None:
        # Refused here with the families VDC has rules for: the tgr table also holds CaiT and
        # the residual CNNs, which neither re-implementation covers.
        if family is None or family.name not in SCALE_AUTO:
            what = f"the {family.name} family" if family else "a source of no known family"
            raise UserError(
                f"VDC does not support {what}: its rules (both re-implementations) cover "
                f"{SUPPORTED} sources only; CaiT and CNN sources have none. Choose such a source."
            )
        super().__init__(settings, family)
        s: VDCSettings = self.settings  # type: ignore[assignment]
        self.scale = SCALE_AUTO[self.family.name] if s.scale == AUTO else float(s.scale)
        self.block_decay = float(s.block_decay)
        self.link = float(s.link)
        self.gamma = {c: float(getattr(s.gamma, c)) for c in ("attn", "mlp", "record")}
        self.mode: str | None = (
            None  # RECORD or ADD during a pass; None: gradients pass as they are
        )
        self.records = Records()
        self.layout = Layout((), True, False)
        self._block: dict[str, tuple[int, int, bool]] = {}  # site -> (k, stage s, deepest of s)
        self._pool: dict[str, int] = {}  # pooling site -> stage whose output it reads
        self._pass_fired: Counter[str] = Counter()

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "scale": self.scale,
            "block_decay": self.block_decay,
            "link": self.link,
            **{f"gamma_{c}": v for c, v in self.gamma.items()},
        }

    # ---- sites -------------------------------------------------------------------------------
    def sites(self, net: nn.Module, family: Family) -> list[BoundSite]:
        stages, pools, pit = _stages(net, family.name)
        names = {m: n for n, m in net.named_modules()}
        self.layout = Layout(tuple(len(s) for s in reversed(stages)), not pit, pit)
        bound = [BoundSite(NORM, net.norm, names[net.norm])]
        self._block.clear()
        self._pool.clear()
        blocks = [b for s in stages for b in s]
        k = len(blocks)
        for s, stage in enumerate(stages):
            from_output = len(stages) - 1 - s
            for i, block in enumerate(stage):
                k -= 1
                deepest = i == len(stage) - 1
                for site, module in ((ATTN, block.attn.attn_drop), (MLP, block.norm2)):
                    b = BoundSite(site, module, names[module])
                    self._block[b.name] = (k, from_output, deepest)
                    bound.append(b)
        for reads, conv in pools:
            b = BoundSite(POOL, conv, names[conv])
            self._pool[b.name] = len(stages) - 1 - reads  # that stage, counted from the output
            bound.append(b)
        return bound

    # ---- the two passes ----------------------------------------------------------------------
    def edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        if self.mode is None:  # a backward outside the step's two passes: nothing to read
            return g
        self._pass_fired[bound.name] += 1
        component = bound.site.component
        if component in ("norm", "pool"):
            if self.mode == RECORD:
                self._record_link(bound, g)
            return g
        k, s, deepest = self._block[bound.name]
        if self.mode == RECORD:
            return self._record(component, k, s, deepest, g)
        # gamma * G + the summed records of the deeper blocks of this stage.
        return g * self.gamma[component] + self.records.add[component][k]

    def _record_link(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        """The final norm's token-0 gradient (ViT/DeiT, PiT: the class token; Visformer's
        (B, C, H, W) map: channel 0), or PiT's pooling-conv input gradient as patch tokens
        (B, H*W, C), already weighted: new tensors, so that autograd may reuse g's buffer."""
        r = self.records
        if bound.site.component == "norm":
            r.norm = g[:, 0] * self.scale * self.link
        else:
            r.pool[self._pool[bound.name]] = g.flatten(2).transpose(1, 2) * self.scale * self.link
        return g

    def _record(
        self, component: str, k: int, s: int, deepest: bool, g: torch.Tensor
    ) -> torch.Tensor:
        """Record pass at block k: add[k] = the summed records of the deeper blocks of its
        stage (zero, or the link term, at the stage's deepest block); total[k] = add[k] plus this
        block's weighted gradient (PiT's inner stages: no longer summed past the deepest)."""
        r = self.records
        own = g * self.scale * self.block_decay**k
        if deepest:
            add = torch.zeros_like(own)
            # A record missing here (a silent site) leaves a zero; the pass's site count then
            # stops the run with the silent site's name (`_end`).
            if component == "mlp" and s == 0 and r.norm is not None:
                add[:, 0] = r.norm
            elif component == "mlp" and self.layout.link_stages and s in r.pool:
                add[:, 1:] = r.pool[s]
            r.add[component][k] = add
            r.total[component][k] = own + add if component == "mlp" else own
        else:
            before = r.total[component].get(k - 1)
            if before is None:
                before = torch.zeros_like(own)
            r.add[component][k] = before
            summed = s == 0 or self.layout.accumulate_inner
            r.total[component][k] = before + own if summed else before
        return g * self.gamma["record"]

    def _begin(self, mode: str) -> None:
        self.mode = mode
        self._pass_fired.clear()
        if mode == RECORD:
            self.records = Records()  # fresh per step: nothing carries across steps or batches

    def _end(self, stage: str) -> None:
        """Every site fired exactly once in this pass (host counters: no sync); a site that
        fired twice would pair records of different forward calls."""
        wrong = {b.name: self._pass_fired[b.name] for b in self._sites}
        wrong = {n: c for n, c in wrong.items() if c != 1}
        if wrong:
            shown = ", ".join(f"{n}: {c}" for n, c in list(wrong.items())[:5])
            raise UserError(
                f"VDC's {self.mode} pass during the {stage} fired {len(wrong)} of "
                f"{len(self._sites)} sites of the {self.family.name} source not exactly once "
                f"({shown}). Is fused attention on, or did the timm version change how these "
                f"modules are called?"
            )

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
        """The add pass's d loss / d delta after a record pass, both backward through one
        forward of the step's inputs (the hooks read the pass's mode while the gradient flows
        back, so the forward is shared; the modifiers' draws are taken once)."""
        delta = delta.detach().requires_grad_(True)
        inputs = self.model_input(x, delta, step, seeds)
        c = self.copies
        if self.si is not None or self.admix is not None or self.di is not None:
            inputs = self.expand(model, inputs, step, seeds if keys is None else keys, ids)
            y = y.repeat_interleave(c)
        loss = self.loss(model(inputs), y, delta, c)
        self._begin(RECORD)
        torch.autograd.grad(loss, delta, retain_graph=True)  # records only
        self._end("run")
        self._begin(ADD)
        (grad,) = torch.autograd.grad(loss, delta)
        self._end("run")
        self.records = Records()
        self.mode = None
        return grad

    def _probe(self, model: nn.Module) -> None:
        """One forward/backward per pass, each of which must fire every site exactly once."""
        size = getattr(model, "input_size", 224)
        device = next(iter(model.buffers()), torch.empty(0)).device
        ramp = torch.linspace(0.4, 0.6, 3 * size * size, device=device)  # any non-constant image
        x = ramp.view(1, 3, size, size).requires_grad_(True)
        for mode in (RECORD, ADD):
            self._begin(mode)
            self._site_fired.clear()
            model(x).logsumexp(-1).sum().backward()
            self.check(stage="probe")
            self._end("probe")
        self.validate()
        self.fired.clear()
        self.records = Records()
        self.mode = None
