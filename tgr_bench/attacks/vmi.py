"""VMI-FGSM (Wang & He, CVPR 2021): momentum on the gradient plus the previous step's variance
of the gradient over a uniform neighbourhood (docs/baselines.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tgr_bench.attacks.architectures import Family
from tgr_bench.attacks.base import MIFGSM, MISettings, split_on_oom
from tgr_bench.attacks.draws import mix
from tgr_bench.schema import key


@dataclass(frozen=True)
class VMISettings(MISettings):
    """attack=vmi: variance tuning over a uniform neighbourhood."""

    name: str = key("vmi")
    n_samples: int = key(20, low=1, help="neighbours N per step, drawn per image from the seed")
    beta: float = key(1.5, low=0, help="neighbourhood radius, in units of eps")
    chunk: int | None = key(
        None,
        low=1,
        identity=False,  # the split changes no image (tests/attacks/test_vmi.py)
        help="neighbours per image in one pass; null = all N (halved on OOM)",
    )


class VMI(MIFGSM):
    name = "vmi"
    reference = (
        "VMI-FGSM: Wang & He, Enhancing the Transferability of Adversarial Attacks through "
        "Variance Tuning, CVPR 2021"
    )

    Settings = VMISettings

    def __init__(self, settings: VMISettings | None = None, family: Family | None = None) -> None:
        super().__init__(settings, family)
        s: VMISettings = self.settings  # type: ignore[assignment]
        self.n_samples = s.n_samples
        self.beta = float(s.beta)
        # Neighbours per image in one forward/backward; halved on CUDA out-of-memory.
        self.chunk = s.chunk or s.n_samples
        self._variance: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n_samples": self.n_samples, "beta": self.beta}

    def neighbour_noise(self, x: torch.Tensor, step: int, seeds: Sequence[int]) -> torch.Tensor:
        """(B, N, C, H, W) uniform draws in [-beta*eps, beta*eps], one generator per image."""
        radius = self.beta * self.eps
        draws = []
        for s in seeds:
            gen = torch.Generator(x.device).manual_seed((int(s) * 7_919 + step + 1) % (1 << 62))
            draws.append(torch.rand((self.n_samples, *x.shape[1:]), generator=gen, device=x.device))
        return (torch.stack(draws) * 2 - 1) * radius

    def _neighbour_mean(
        self,
        model: nn.Module,
        x: torch.Tensor,
        delta: torch.Tensor,
        y: torch.Tensor,
        step: int,
        seeds: Sequence[int],
        keys: Sequence[int],
        ids: Sequence[int] | None,
    ) -> torch.Tensor:
        noise = self.neighbour_noise(x, step, seeds)
        b, n = noise.shape[:2]

        def passes(chunk: int) -> torch.Tensor:
            total = torch.zeros_like(x)
            for start in range(0, n, chunk):
                r = noise[:, start : start + chunk]
                c = r.shape[1]
                grad = super(VMI, self).input_gradient(
                    model,
                    x.unsqueeze(1).expand_as(r).reshape(b * c, *x.shape[1:]),
                    (delta.unsqueeze(1) + r).reshape(b * c, *x.shape[1:]),
                    y.repeat_interleave(c),
                    step,
                    [s for s in seeds for _ in range(c)],
                    # Each neighbour draws its own DI and Admix (key, neighbour index).
                    keys=[mix(k, 0x4E, start + j) for k in keys for j in range(c)],
                    ids=None if ids is None else [i for i in ids for _ in range(c)],
                )
                total += grad.view(b, c, *x.shape[1:]).sum(1)
            return total / n

        mean, self.chunk = split_on_oom(passes, self.chunk, b)
        return mean

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
        if step == 0:
            self._variance = torch.zeros_like(x)
        keys = seeds if keys is None else keys
        grad = super().input_gradient(model, x, delta, y, step, seeds, keys, ids)
        tuned = grad + self._variance
        neighbours = self._neighbour_mean(model, x, delta, y, step, seeds, keys, ids)
        self._variance = neighbours - grad
        return tuned  # the base update normalizes it per sample: (g' + v_t) / mean|g' + v_t|
