"""The MI-FGSM loop against an independent step-by-step reading of docs/tgr.md section 1."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from tests.tiny import make
from tgr_bench.attacks import ATTACKS, build_attack
from tgr_bench.errors import UserError
from tgr_bench.images import quantize
from tgr_bench.models import PixelModel


def tiny_vit(seed: int = 0) -> PixelModel:
    torch.manual_seed(seed)
    net = timm.create_model("test_vit.r160_in1k", pretrained=False)
    cfg = net.pretrained_cfg
    return (
        PixelModel(net, cfg["mean"], cfg["std"], cfg["input_size"][-1]).eval().requires_grad_(False)
    )


def images(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 64, 64, generator=g) * 255).round() / 255
    y = torch.randint(0, 1000, (n,), generator=g)
    return x, y


def reference_mi(net, mean, std, size, x, y, eps, steps, alpha, mu):
    """Written from the spec, without tgr_bench: resize, normalize, CE per sample, momentum."""
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    delta = torch.zeros_like(x)
    g = torch.zeros_like(x)
    for _ in range(steps):
        d = delta.clone().requires_grad_(True)
        z = F.interpolate(x + d, size=(size, size), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(net((z - mean) / std), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, d)
        g = mu * g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)
        delta = torch.clamp(delta + alpha * torch.sign(g), -eps, eps)
        delta = torch.clamp(x + delta, 0, 1) - x
    return x + delta


@pytest.mark.parametrize("steps,alpha,decay", [(10, None, 1.0), (4, 3.0, 0.5)])
def test_mi_equals_step_by_step_reference(steps, alpha, decay):
    model = tiny_vit()
    x, y = images(3)
    attack = make("mi", eps=16, steps=steps, alpha=alpha, decay=decay)
    adv = attack.perturb(model, x, y, [0, 0, 0])
    a = (alpha if alpha is not None else 16 / steps) / 255
    ref = reference_mi(
        model.net,
        model.mean.flatten().tolist(),
        model.std.flatten().tolist(),
        model.input_size,
        x,
        y,
        16 / 255,
        steps,
        a,
        decay,
    )
    assert torch.equal(adv, ref)
    assert (adv - x).abs().max() <= 16 / 255 + 1e-7
    assert ((adv - x).abs() > 1e-6).float().mean() > 0.5  # the attack moved most pixels
    # The attack works on its own source: the loss went up.
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_image_result_does_not_depend_on_its_batch():
    model = tiny_vit()
    x, y = images(4)
    attack = make("mi")
    seeds = [0, 1, 2, 3]
    together = quantize(attack.perturb(model, x, y, seeds), (x * 255).round().to(torch.uint8), 16)
    alone = torch.cat(
        [
            quantize(
                attack.perturb(model, x[i : i + 1], y[i : i + 1], seeds[i : i + 1]),
                (x[i : i + 1] * 255).round().to(torch.uint8),
                16,
            )
            for i in range(4)
        ]
    )
    assert torch.equal(together, alone)


def test_all_zero_gradient_leaves_momentum_finite():
    attack = make("mi")
    g = attack.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), 0)
    assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize(
    "params,match",
    [
        ({"eps": 0}, "outside"),
        ({"eps": 256}, "outside"),
        ({"steps": 0}, "steps"),
        ({"alpha": -1}, "alpha"),
        ({"decay": -0.1}, "decay"),
        ({"gamma": 0.5}, "there is no key attack.gamma"),
    ],
)
def test_bad_attack_parameters_are_clear_errors(params, match):
    with pytest.raises(UserError, match=match):
        build_attack({"name": "mi", **params})


def test_unknown_attack_lists_the_valid_ones():
    with pytest.raises(UserError, match="available: " + ", ".join(sorted(ATTACKS))):
        build_attack({"name": "nope"})


def test_alpha_defaults_to_eps_over_steps():
    assert build_attack({"name": "mi", "eps": 8, "steps": 4}).params()["alpha"] == 2.0
