"""Per-sample statistics of the gradients inside the source, recorded during an attack's own
loop by read-only hooks (docs/tgr.md section 9).

At each block's output a forward hook registers a pre-hook on the autograd node that produced
the output (as the attacks' own output sites do, tgr_bench/attacks/hooks.py), so it sees the
gradient arriving at that tensor with every downstream edit of the attack included, and still
sees it when a caller later modifies the output in place. The pre-hook only reads: it returns
None, and the attack computes exactly what it computes without it. Statistics are reduced on
the device with torch ops and kept per sample, never the gradients; nothing waits for the
device inside a hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench.attacks import MIFGSM


def block_statistics(g: torch.Tensor) -> torch.Tensor:
    """(2, B): per sample, the scale-free and the raw variance of a block-output gradient.

    raw_var = mean over channels of the population variance over positions: tokens of a
    (B,N,C) stream, H*W positions of a (B,C,H,W) map. scale_free_var is the same of G / m,
    m = mean |G| per sample over all of G, so a uniform rescaling of the gradient (TGR's
    gammas) cannot change it. Computed on G / m, whose entries are of order one: the raw
    gradients of deep early blocks can be small enough for their squares to underflow in fp32.
    """
    g = g.detach().float()
    if g.dim() == 3:  # (B, N, C): positions on dim 1
        per_channel = g.transpose(1, 2)
    elif g.dim() == 4:  # (B, C, H, W)
        per_channel = g.flatten(2)
    else:
        raise ValueError(f"block-output gradient of shape {tuple(g.shape)}: need 3 or 4 dims")
    m = g.abs().flatten(1).mean(1).clamp_min(torch.finfo(torch.float32).tiny)
    scale_free = (per_channel / m[:, None, None]).var(dim=2, correction=0).mean(1)
    raw = scale_free.double() * m.double().square()
    return torch.stack([scale_free.double(), raw])


def input_cosine(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """(B,): cosine similarity of two successive input gradients, per sample: the gradients the
    loop feeds its momentum update (after TI's smoothing, when TI is on)."""
    return F.cosine_similarity(previous.flatten(1).double(), current.flatten(1).double(), dim=1)


@dataclass
class BatchStats:
    """Per-sample values of one attacked batch, each averaged over the attack's iterations."""

    scale_free_var: torch.Tensor  # (blocks, B)
    raw_var: torch.Tensor  # (blocks, B)
    input_cos: torch.Tensor | None  # (B,); None with a single iteration (no successive pair)
    steps: int


class GradientRecorder:
    """Records, per block and iteration, the statistics of the gradient at each block's output
    during an attack's loop; only the backward pass of the first forward of each
    `input_gradient` call, i.e. at the current point x_t (VMI's neighbours come after it).

    Use `with recorder.recording(attack): attack.perturb(...)`, then `take()` per batch.
    """

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]], root: nn.Module) -> None:
        self.blocks = list(blocks)
        self.root = root  # the module whose forward ends after every block (disarms the hooks)
        self._armed = False
        self._fired = [0] * len(self.blocks)
        self._values: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._cos: list[torch.Tensor] = []
        self._previous: torch.Tensor | None = None
        self._steps = 0

    # ---- hooks -------------------------------------------------------------------------------
    def _on_block_output(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not self._armed or not isinstance(out, torch.Tensor) or out.grad_fn is None:
                return
            slot = out.output_nr

            def read(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
                g = grad_outputs[slot]
                if g is not None:
                    self._fired[index] += 1
                    self._values[index].append(block_statistics(g))

            out.grad_fn.register_prehook(read)

        return hook

    def _disarm(self, module: nn.Module, args: Any, out: Any) -> None:
        self._armed = False

    def _wrap(self, original: Any, smooth: Any = None) -> Any:
        """The attack's `input_gradient`, recording around it; `smooth`: the attack's TI (or
        None), which the loop applies before the momentum update, so input_cos sees it too."""

        def input_gradient(
            model: nn.Module,
            x: torch.Tensor,
            delta: torch.Tensor,
            y: torch.Tensor,
            step: int,
            seeds: Sequence[int],
            **where: Any,  # keys, ids: passed through untouched
        ) -> torch.Tensor:
            if step == 0:
                self._start_batch()
            self._fired = [0] * len(self.blocks)
            self._armed = True
            try:
                grad = original(model, x, delta, y, step, seeds, **where)
            finally:
                self._armed = False
            wrong = {n: c for (n, _), c in zip(self.blocks, self._fired, strict=True) if c != 1}
            if wrong:  # host-side counts: no device sync
                raise RuntimeError(
                    f"block output gradients seen other than once in one step {wrong}: the block "
                    f"table of tgr_bench/variance/blocks.py does not match how this network runs."
                )
            # The gradient the momentum update receives: TI runs on a detached copy, the loop
            # still gets (and smooths) the gradient itself.
            current = grad.detach() if smooth is None else smooth.apply(grad.detach())
            if self._previous is not None:
                self._cos.append(input_cosine(self._previous, current))
            self._previous = current.clone()
            self._steps += 1
            return grad

        return input_gradient

    def _start_batch(self) -> None:
        self._values = [[] for _ in self.blocks]
        self._cos = []
        self._previous = None
        self._steps = 0

    @contextlib.contextmanager
    def recording(self, attack: MIFGSM) -> Iterator[None]:
        """Hooks on the blocks and around `attack.input_gradient`, removed on exit."""
        handles = [
            module.register_forward_hook(self._on_block_output(i))
            for i, (_, module) in enumerate(self.blocks)
        ]
        handles.append(self.root.register_forward_hook(self._disarm))
        # An instance attribute shadows the method for the loop's own call only; the attack's
        # internal calls (VMI's neighbours, through super()) are not wrapped.
        shadowed = vars(attack).get("input_gradient")
        wrapped = self._wrap(attack.input_gradient, attack.ti)
        attack.input_gradient = wrapped  # type: ignore[method-assign]
        try:
            yield
        finally:
            if shadowed is None:
                del attack.input_gradient
            else:
                attack.input_gradient = shadowed  # type: ignore[method-assign]
            for h in handles:
                h.remove()
            self._armed = False

    def take(self) -> BatchStats:
        """The batch attacked since the last call: per sample, each statistic averaged over the
        iterations. Moves (blocks + 1) x B numbers to the host."""
        if self._steps == 0:
            raise RuntimeError("take() before any iteration was recorded")
        values = torch.stack([torch.stack(v) for v in self._values])  # (blocks, steps, 2, B)
        mean = values.mean(1).cpu()
        cos = torch.stack(self._cos).mean(0).cpu() if self._cos else None
        stats = BatchStats(mean[:, 0], mean[:, 1], cos, self._steps)
        self._start_batch()
        return stats
