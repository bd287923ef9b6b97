"""Tiny real timm sources of each attacked family, image batches, and shared attack-test helpers.

The families' tiny models are the catalogue's test entries (conf/source/test_*.yaml) with
seeded random weights; "vit" is a 64-pixel two-block ViT that only the tests use."""

from __future__ import annotations

from dataclasses import replace

import torch

from tgr_bench.attacks import MIFGSM, create
from tgr_bench.catalogue import model_spec
from tgr_bench.models import PixelModel, WeightFile, build_model

FAMILY = {"vit": "vit", "deit": "vit", "pit": "pit", "cait": "cait", "visformer": "visformer"}


def tiny_spec(family: str):
    if family == "vit":  # timm's own test_vit takes 160 pixels: this one takes the batches' 64
        return replace(
            model_spec("test_deit"),
            key="tiny_vit",
            model="vit_base_patch16_224",
            kwargs={"depth": 2, "embed_dim": 48, "num_heads": 3, "img_size": 64},
        )
    return model_spec(f"test_{family}")


def tiny(family: str, seed: int = 0) -> PixelModel:
    return build_model(tiny_spec(family), WeightFile("random"), "cpu", seed).model


def batch(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 64, 64, generator=g) * 255).round() / 255, torch.randint(
        0, 1000, (n,), generator=g
    )


def grad_of(attack: MIFGSM, model, x, y) -> torch.Tensor:
    return attack.input_gradient(model, x, torch.zeros_like(x), y, 0, [0] * len(x))


def make(name: str, family: str | None = None, **keys) -> MIFGSM:
    """The attack `name` as the CLI builds it (keys checked as on the command line), for a
    source of `family` (a key of FAMILY, or an architectures family name)."""
    return create(name, FAMILY.get(family, family), **keys)
