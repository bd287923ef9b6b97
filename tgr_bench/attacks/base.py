"""The MI-FGSM loop that every attack in tgr-bench shares, with one hook per way to change it.

An attack is this loop plus optional changes to
- the source model's backward pass (`source_context`: TGR, PNA, SGM install gradient hooks),
- the input of the forward pass (`model_input`: PatchOut's mask; `expand`: SI/Admix copies and
  DI, modifiers.py),
- the loss (`loss`: PatchOut's per-image L2 term, the mean over copies, targeted attacks),
- the gradient estimate (`input_gradient`: VMI's neighbourhood samples; TI's smoothing),
- the momentum update (`update`).
Everything is per sample: an image's result never depends on the other images of its batch.
PatchOut, DI, TI, SI and Admix are modifiers of any attack (`attack.<name>.enabled=true`).
`attack.targeted=true` descends the cross-entropy toward a target label instead of ascending it
away from the true one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench.attacks.architectures import Family
from tgr_bench.attacks.draws import mix
from tgr_bench.attacks.modifiers import DI, MODIFIERS, SI, TI, Admix, PartnerPool
from tgr_bench.attacks.patchout import PatchOut
from tgr_bench.errors import UserError
from tgr_bench.pixels import Pixels
from tgr_bench.schema import Levels, key

# Where a targeted attack's target label comes from: auto = the labels.csv `target` column when
# the data has one, else a seeded draw; random = uniform over the other 999 classes per image;
# least_likely = the source's least likely class on the clean image; labels = the column.
TARGET_MODES = ("auto", "random", "least_likely", "labels")


@dataclass(frozen=True)
class MISettings:
    """attack=mi: the MI-FGSM loop every attack shares, and the modifiers every attack takes."""

    name: str = key("mi", help="the attack's class (attack=<choice> picks a preset of it)")
    eps: Levels = key(16.0, help="L-inf budget in 0-255 pixel levels")
    steps: int = key(10, low=1)
    alpha: Levels | None = key(None, help="step size in pixel levels; null = eps / steps")
    decay: float = key(1.0, low=0, help="momentum mu")
    patchout: PatchOut = key(PatchOut, help="PatchOut (Wei et al., AAAI 2022)")
    di: DI = key(DI, help="diverse inputs (Xie et al., CVPR 2019)")
    ti: TI = key(TI, help="translation invariance (Dong et al., CVPR 2019)")
    si: SI = key(SI, help="scale invariance (Lin et al., ICLR 2020)")
    admix: Admix = key(Admix, help="Admix (Wang et al., ICCV 2021)")
    targeted: bool = key(False, help="true: descend the cross-entropy toward a target label")
    target: str = key(
        "auto",
        options=TARGET_MODES,
        needs="targeted",
        help="auto (labels.csv target column, else random) | random | least_likely | labels",
    )

    def check(self, where: str) -> None:
        if self.si.enabled and self.admix.enabled:
            raise UserError(
                f"{where}.si and {where}.admix are both on: Admix already averages over "
                f"{where}.admix.m1 scales (SI's copies); enable one of them."
            )


T = TypeVar("T")


def split_on_oom(run: Callable[[int], T], chunk: int, images: int) -> tuple[T, int]:
    """`run(chunk)`, and the chunk it ran with: when one image's copies, neighbours or samples
    do not fit on the device, again with half as many per pass. With several images the error
    goes up, and the crafting loop halves the batch, which changes no image's result."""
    while True:
        try:
            return run(chunk), chunk
        except torch.cuda.OutOfMemoryError:
            if chunk == 1 or images > 1:
                raise
            chunk = max(1, chunk // 2)
            torch.cuda.empty_cache()


class MIFGSM:
    """The MI-FGSM loop (Dong et al., CVPR 2018), the base of every attack here: built once
    from its validated settings and the source's family (None: a source of no family, which
    the loop itself does not need)."""

    name: ClassVar[str] = "mi"
    Settings: ClassVar[type[MISettings]] = MISettings
    reference: ClassVar[str] = (
        "MI-FGSM: Dong et al., Boosting Adversarial Attacks with Momentum, CVPR 2018"
    )
    # The source's timm model name, set by attacks.create when known (the run's plan knows it).
    source_arch: str | None = None

    def __init__(self, settings: MISettings | None = None, family: Family | None = None) -> None:
        s = settings if settings is not None else self.Settings()
        self.settings, self.family = s, family
        self.eps_levels = float(s.eps)
        self.steps = int(s.steps)
        self.alpha_levels = float(s.alpha) if s.alpha is not None else self.eps_levels / self.steps
        self.decay = float(s.decay)
        self.eps = self.eps_levels / 255.0
        self.alpha = self.alpha_levels / 255.0
        self.patchout = s.patchout if s.patchout.enabled else None
        self.di = s.di if s.di.enabled else None
        self.ti = s.ti if s.ti.enabled else None
        self.si = s.si if s.si.enabled else None
        self.admix = s.admix if s.admix.enabled else None
        self.targeted, self.target = s.targeted, s.target
        self.pool: PartnerPool | None = None  # Admix's clean images (use_pool)
        # SI/Admix copies per image in one pass; None = all at once, halved on out-of-memory.
        self.copy_chunk: int | None = None

    @property
    def label(self) -> str:
        """The name results are filed under: the attack and every active modifier in a fixed
        order, `tgr_patchout_di_ti`."""
        on = [m for m in ("patchout", *MODIFIERS) if getattr(self, m) is not None]
        return "_".join([self.name, *on])

    @property
    def copies(self) -> int:
        """Inputs per image in one forward pass: SI's m scales, or Admix's m1 * m2."""
        if self.si:
            return self.si.m
        return self.admix.m1 * self.admix.m2 if self.admix else 1

    def use_pool(self, pixels: Pixels) -> None:
        """Give Admix its partners: the clean images of the whole data set, in listing order."""
        self.pool = PartnerPool(pixels)

    def params(self) -> dict[str, Any]:
        """Every hyper-parameter that decides the result, in pixel units, for the results table."""
        return {
            "eps": self.eps_levels,
            "steps": self.steps,
            "alpha": round(self.alpha_levels, 6),
            "decay": self.decay,
            **(self.patchout.params() if self.patchout else {}),
            **{k: v for m in MODIFIERS if (on := getattr(self, m)) for k, v in on.params().items()},
            **({"targeted": True, "target": self.target} if self.targeted else {}),
        }

    def check_data(self, height: int, width: int) -> None:
        """Refuse, before any work, modifier settings that cannot act on images of the data
        set's stored size (Admix's pool is checked with the data: ImageSet.checked_pool)."""
        if self.di is not None:
            self.di.check_size(height, width)

    def defaults(self) -> dict[str, Any]:
        """`params()` of this attack with every setting at its default, on the same source
        family (the sweep plots mark the default value)."""
        return type(self)(self.Settings(), self.family).params()

    # ---- hook points -------------------------------------------------------------------------
    @contextlib.contextmanager
    def source_context(self, model: nn.Module) -> Iterator[None]:
        """Changes to the source model's backward pass, active while attacking."""
        yield

    def model_input(
        self, x: torch.Tensor, delta: torch.Tensor, step: int, seeds: Sequence[int]
    ) -> torch.Tensor:
        if self.patchout is None:
            return x + delta
        return x + delta * self.patchout.masks(x.shape, step, seeds, x.device)

    def expand(
        self,
        model: nn.Module,
        x: torch.Tensor,
        step: int,
        keys: Sequence[int],
        ids: Sequence[int] | None,
    ) -> torch.Tensor:
        """(B * copies, 3, H, W): each image's SI or Admix copies, then DI on every copy with
        its own draw (key, step, copy); with no modifier, x itself."""
        b, c = len(x), self.copies
        if self.si:
            stacked = self.si.copies(x, getattr(model, "mean", 0.5))
        elif self.admix:
            if self.pool is None or ids is None:
                raise UserError("attack.admix needs the data set's images (use_pool and ids).")
            index = self.admix.partner_index(ids, [mix(k, step) for k in keys], len(self.pool))
            partners = self.pool.load(index, x.device).view(b, self.admix.m2, *x.shape[1:])
            stacked = self.admix.copies(x, partners, getattr(model, "mean", 0.5))
        else:
            stacked = x.unsqueeze(1)
        flat = stacked.reshape(b * c, *x.shape[1:])
        if self.di:
            flat = self.di.apply(flat, [mix(k, step, j) for k in keys for j in range(c)])
        return flat

    def loss(
        self, logits: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, copies: int = 1
    ) -> torch.Tensor:
        # Summed over images, not averaged: a sample's gradient must not depend on the batch
        # size; averaged over an image's copies (SI, Admix). Targeted: descend toward y.
        loss = F.cross_entropy(logits, y, reduction="sum")
        if copies > 1:
            loss = loss / copies
        if self.targeted:
            loss = -loss
        if self.patchout is not None and self.patchout.l2 > 0:
            # One norm per image (the released PNA code took one over the whole batch tensor).
            loss = loss + self.patchout.l2 * delta.flatten(1).norm(dim=1).sum()
        return loss

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
        """d loss / d delta, averaged over the image's copies. `seeds` drive PatchOut's masks;
        `keys` (default: the seeds) the draws of DI and Admix, so that a VMI neighbour draws its
        own; `ids` are the images' places in the data set (Admix)."""
        delta = delta.detach().requires_grad_(True)
        inputs = self.model_input(x, delta, step, seeds)
        c = self.copies
        if self.si is None and self.admix is None and self.di is None:
            (grad,) = torch.autograd.grad(self.loss(model(inputs), y, delta), delta)
            return grad
        inputs = self.expand(model, inputs, step, seeds if keys is None else keys, ids)
        y = y.repeat_interleave(c)

        def passes(chunk: int) -> torch.Tensor:
            if chunk >= c:
                (grad,) = torch.autograd.grad(self.loss(model(inputs), y, delta, c), delta)
                return grad
            return self._chunked_gradient(model, inputs, y, delta, chunk)

        # The float summation order changes with the split; the draws are keyed per copy.
        grad, chunk = split_on_oom(passes, min(self.copy_chunk or c, c), len(x))
        if chunk < c:
            self.copy_chunk = chunk
        return grad

    def _chunked_gradient(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        y: torch.Tensor,
        delta: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        """The copies' gradient in passes of `chunk` copies per image, summed. Only the first
        pass sees `delta` itself in the loss, so a penalty on delta (PatchOut's L2) counts once;
        the others reach delta through `inputs` alone."""
        b, c = len(delta), self.copies
        inputs = inputs.view(b, c, *inputs.shape[1:])
        y = y.view(b, c)
        grad = torch.zeros_like(delta)
        for start in range(0, c, chunk):
            part = slice(start, min(c, start + chunk))
            logits = model(inputs[:, part].reshape(-1, *inputs.shape[2:]))
            own = delta if start == 0 else delta.detach()
            loss = self.loss(logits, y[:, part].reshape(-1), own, c)
            (g,) = torch.autograd.grad(loss, delta, retain_graph=start + chunk < c)
            grad += g
        return grad

    def update(self, g: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        # Per-sample L1 normalization; the floor only matters for an all-zero gradient, which
        # would otherwise turn the momentum into NaN.
        norm = grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(grad.dtype).tiny)
        return self.decay * g + grad / norm

    def stats(self) -> dict[str, Any]:
        """Counters the attack wants recorded in run.json (e.g. how often hooks fired)."""
        # Recorded because a split changes the float summation order of the copies' gradients.
        return {"copies_per_pass": self.copy_chunk} if self.copy_chunk else {}

    # ---- the loop ----------------------------------------------------------------------------
    def perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        seeds: Sequence[int],
        ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Adversarial images for clean pixels `x` in [0,1] (B,3,H,W) and labels `y` (the target
        labels of a targeted attack).

        `seeds` (Python ints, one per image) drive every random draw of that image; being host
        values, reading them never waits for the device. `ids` place the images in the data set
        (Admix draws its partners from the other images).
        """
        # The loss is taken at logit y + label_offset (1 on the TF-slim networks, whose logit 0
        # is a background class), as the released code did.
        y = y + int(getattr(model, "label_offset", 0))
        delta = torch.zeros_like(x)
        g = torch.zeros_like(x)
        for step in range(self.steps):
            grad = self.input_gradient(model, x, delta, y, step, seeds, ids=ids)
            if self.ti is not None:
                grad = self.ti.apply(grad)
            g = self.update(g, grad, step)
            # In place, the same float operations as (delta + alpha * sign(g)).clamp(-eps, eps)
            # and then (x + delta).clamp(0, 1) - x: one buffer instead of five per step.
            delta.add_(g.sign().mul_(self.alpha)).clamp_(-self.eps, self.eps)
            delta.add_(x).clamp_(0, 1).sub_(x)
        return (x + delta).detach()
