"""The variance analysis' input_cos against docs/tgr.md section 9: the cosine of successive
gradients that the loop feeds its momentum update (after TI, when TI is on), by hand."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import batch, tiny
from tgr_bench.attacks import MIFGSM, build_attack
from tgr_bench.variance.blocks import source_blocks
from tgr_bench.variance.recorder import GradientRecorder


class Fed(MIFGSM):
    """MI-FGSM that keeps every gradient its momentum update receives, and every gradient
    `input_gradient` returns (before TI)."""

    def input_gradient(self, *args, **kwargs) -> torch.Tensor:
        grad = super().input_gradient(*args, **kwargs)
        self.raw.append(grad.detach().clone())
        return grad

    def update(self, g: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        self.fed.append(grad.detach().clone())
        return super().update(g, grad, step)


def by_hand(fed: list[torch.Tensor]) -> torch.Tensor:
    """Per sample: the mean over t of <f_t, f_t+1> / (|f_t| |f_t+1|), in float64."""
    cos = []
    for a, b in zip(fed, fed[1:], strict=False):
        a, b = a.flatten(1).double(), b.flatten(1).double()
        cos.append((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))
    return torch.stack(cos).mean(0)


@pytest.mark.parametrize("ti", [False, True])
def test_input_cos_is_taken_on_the_gradient_fed_to_the_momentum(ti: bool):
    model = tiny("vit")
    x, y = batch(2)
    keys = {"steps": 3, **({"ti": {"enabled": True, "size": 5}} if ti else {})}
    attack = Fed(build_attack({"name": "mi", **keys}).settings)
    attack.fed, attack.raw = [], []
    recorder = GradientRecorder(source_blocks(model), model.net)
    with recorder.recording(attack):
        attack.perturb(model, x, y, [0, 1])
    stats = recorder.take()
    assert len(attack.fed) == 3 and stats.steps == 3
    want = by_hand(attack.fed)
    assert torch.allclose(stats.input_cos, want, rtol=1e-9, atol=1e-12)
    if ti:  # the smoothing matters: the cosine of the unsmoothed gradients differs
        assert (by_hand(attack.raw) - want).abs().max() > 1e-3
    else:
        assert all(torch.equal(a, b) for a, b in zip(attack.raw, attack.fed, strict=True))
