"""Attacks that edit the gradient inside the source's backward pass (TGR, PNA, SGM).

A subclass says which table of architectures.py it uses (`table`, `needs`), which of the
family's sites it edits (`sites`) and how (`edit`); this class installs the hooks while the
source is attacked, runs the source on the explicit attention path, and proves before any work,
with one probe forward/backward, that every site fires. Hooks only count in Python and call
torch ops: no host syncs.

The attack is built with the source's family (known from the model name before any network
exists, architectures.source_family), so settings that resolve per family (TGR's `auto`) are
settled at construction and `params()` is total. `source_context` checks that the network it
is given is of that family.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from tgr_bench.attacks.architectures import (
    INPUT,
    OUTPUT,
    SOFTMAX_INPUT,
    BoundSite,
    Family,
    family_named,
    family_of,
)
from tgr_bench.attacks.base import MIFGSM, MISettings
from tgr_bench.errors import UserError


def set_fused_attn(model: nn.Module, enabled: bool) -> list[tuple[nn.Module, bool]]:
    """Switch timm's fused attention; returns the previous settings to restore.

    The fused kernel never materializes the attention scores, so attention hooks would never
    fire (docs/tgr.md section 6): the source must run the explicit path while it is attacked.
    """
    previous = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in previous:
        m.fused_attn = enabled
    return previous


class GradientHookAttack(MIFGSM):
    table: ClassVar[str] = "tgr"  # the site table of architectures.py: "tgr" or "branches"
    needs: ClassVar[str | None] = None  # a TGR component the family must have (PNA: attn)

    def __init__(self, settings: MISettings | None = None, family: Family | None = None) -> None:
        super().__init__(settings, family)
        # A family without sites for this attack (or none) is refused here, before any work.
        self.family: Family = family_named(
            family.name if family else None, self.table, self.name.upper(), self.needs
        )
        self.fired: Counter[str] = Counter()
        self._sites: list[BoundSite] = []
        self._site_fired: Counter[str] = Counter()  # per bound site: the probe's proof
        self._attacked = False  # a resumed run may have nothing left to attack

    # ---- what a subclass decides -------------------------------------------------------------
    def sites(self, net: nn.Module, family: Family) -> list[BoundSite]:
        raise NotImplementedError

    def edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expected_components(self) -> list[str]:
        return sorted({b.site.component for b in self._sites})

    def validate(self) -> None:
        """Raise UserError after the probe when a setting does not fit the source."""

    # ---- machinery ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            f"{self.name}_fired": dict(self.fired),
            f"{self.name}_sites": dict(Counter(b.site.component for b in self._sites)),
            f"{self.name}_family": self.family.name,
        }

    def _edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        self.fired[bound.site.component] += 1
        self._site_fired[bound.name] += 1
        return self.edit(bound, g)

    def _bind(self, net: nn.Module) -> list[BoundSite]:
        family = family_of(net, self.table, self.name.upper(), self.needs)
        if family.name != self.family.name:
            raise UserError(
                f"The source network is a {type(net).__name__} of the {family.name} family, but "
                f"the attack was built for the {self.family.name} family (from the source's "
                f"model name), and its settings and identity were resolved for that. Fix the "
                f"timm_modules/tfslim entries of tgr_bench/attacks/architectures.py so that "
                f"source_family maps this model name to {family.name}."
            )
        return self.sites(net, family)

    def _install(self, bound: BoundSite) -> Any:
        where = bound.site.where

        def on_output(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            # A pre-hook on the producer's node, not a tensor hook: it still edits the gradient
            # when the caller modifies the output in place (a ResNet unit's `x += shortcut`).
            node = out.grad_fn
            if node is None:
                return
            slot = out.output_nr

            def pre(grad_outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                edited = list(grad_outputs)
                edited[slot] = self._edit(bound, grad_outputs[slot])
                return tuple(edited)

            node.register_prehook(pre)

        def on_softmax_output(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            node = out.grad_fn
            # Only a softmax directly upstream means Z = the pre-softmax scores; anything else
            # (fused kernel, a timm change) leaves the counter at zero and the probe fails.
            if node is not None and node.name() == "SoftmaxBackward0":
                node.register_hook(lambda gin, gout: (self._edit(bound, gin[0]),))

        def on_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            x = args[0]
            if not x.requires_grad:
                return None
            z = x.view_as(x)  # a private alias: only the gradient into this module is edited
            z.register_hook(lambda g: self._edit(bound, g))
            return (z, *args[1:])

        if where == OUTPUT:
            return bound.module.register_forward_hook(on_output)
        if where == SOFTMAX_INPUT:
            return bound.module.register_forward_hook(on_softmax_output)
        if where == INPUT:
            return bound.module.register_forward_pre_hook(on_input)
        raise ValueError(where)

    def _probe(self, model: nn.Module) -> None:
        size = getattr(model, "input_size", 224)
        device = next(iter(model.buffers()), torch.empty(0)).device
        ramp = torch.linspace(0.4, 0.6, 3 * size * size, device=device)  # any non-constant image
        x = ramp.view(1, 3, size, size).requires_grad_(True)
        self._site_fired.clear()
        model(x).logsumexp(-1).sum().backward()
        self.check(stage="probe")
        self.validate()
        self.fired.clear()

    def check(self, stage: str = "run") -> None:
        silent = [c for c in self.expected_components() if self.fired[c] == 0]
        if silent:
            raise UserError(
                f"{self.name.upper()} component(s) {silent} never fired on the {self.family.name} "
                f"source during the {stage}: the attack would silently be plain MI-FGSM there. "
                f"Is fused attention still on, or did the timm version change the module layout "
                f"of tgr_bench/attacks/architectures.py? Fired counts: {dict(self.fired)}."
            )
        # The probe runs every unit once: a site that stayed silent means part of the source
        # (a block whose layout differs, a module called another way) escapes the edit.
        missed = [b.name for b in self._sites if self._site_fired[b.name] == 0]
        if stage == "probe" and missed:
            shown = ", ".join(missed[:5]) + (", ..." if len(missed) > 5 else "")
            raise UserError(
                f"{self.name.upper()} edited nothing at {len(missed)} of {len(self._sites)} "
                f"sites of the {self.family.name} source during the probe ({shown}): those units "
                f"would silently run unedited. Did the timm version change how these modules are "
                f"called, or the layout of tgr_bench/attacks/architectures.py?"
            )

    def perturb(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._attacked = True
        adv = super().perturb(*args, **kwargs)
        # Host counters, no device sync: every batch proves the edits ran before its images
        # are saved (a failure only at the end would leave images that a re-run resumes).
        self.check()
        return adv

    @contextlib.contextmanager
    def source_context(self, model: nn.Module) -> Iterator[None]:
        net = getattr(model, "net", model)
        self._sites = self._bind(net)
        previous = set_fused_attn(net, False)
        handles = [self._install(b) for b in self._sites]
        self._attacked = False
        try:
            self._probe(model)
            yield
            if self._attacked:
                self.check()
        finally:
            for h in handles:
                h.remove()
            for m, flag in previous:
                m.fused_attn = flag
