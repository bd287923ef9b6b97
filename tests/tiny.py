"""Tiny real timm sources of each attacked family, image batches, and shared attack-test helpers."""

from __future__ import annotations

import timm
import torch

from tgr_bench.attacks import Attack
from tgr_bench.models import PixelModel

TINY = {  # the same kwargs as conf/source/test_*.yaml
    "vit": ("vit_base_patch16_224", dict(depth=2, embed_dim=48, num_heads=3, img_size=64)),
    "deit": (
        "deit_base_distilled_patch16_224",
        dict(depth=2, embed_dim=48, num_heads=3, img_size=64),
    ),
    "pit": ("pit_b_224", dict(base_dims=[8, 8, 8], heads=[2, 2, 2], depth=[2, 2, 1], img_size=64)),
    "cait": (
        "cait_s24_224",
        dict(depth=2, embed_dim=32, num_heads=4, img_size=64, init_values=1.0),
    ),
    "visformer": (
        "visformer_small",
        dict(init_channels=8, embed_dim=48, depth=(1, 1, 1), num_heads=2, img_size=64),
    ),
}


def tiny(family: str, seed: int = 0) -> PixelModel:
    name, kwargs = TINY[family]
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, **kwargs).eval()
    return PixelModel(net, (0.5,) * 3, (0.25,) * 3, 64).eval().requires_grad_(False)


def batch(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 64, 64, generator=g) * 255).round() / 255, torch.randint(
        0, 1000, (n,), generator=g
    )


def grad_of(attack: Attack, model, x, y) -> torch.Tensor:
    return attack.input_gradient(model, x, torch.zeros_like(x), y, 0, [0] * len(x))
