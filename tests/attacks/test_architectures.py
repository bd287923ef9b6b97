"""Per-family site tables: binding on full-size timm models, refusal of unsupported sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from tests.tiny import make
from tgr_bench.attacks.architectures import (
    bind_sites,
    family_of,
)
from tgr_bench.errors import UserError
from tgr_bench.models import PixelModel
from tgr_bench.pipeline import run


def test_unsupported_source_lists_supported_families():
    model = PixelModel(
        timm.create_model("test_convnext", pretrained=False), (0.5,) * 3, (0.5,) * 3, 64
    )
    context = make("tgr", "vit").source_context(model)
    with pytest.raises(UserError, match="supported families are vit .*pit .*cait .*visformer"):
        context.__enter__()


def test_unsupported_source_fails_before_any_work(make_cfg, tmp_path: Path):
    cfg = make_cfg("experiment=smoke", "attack=tgr", "source=test_convnext", "targets=none")
    with pytest.raises(UserError, match="does not support"):
        run(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- full-size layouts: every block that has attention ----------------------------------------
@pytest.mark.parametrize(
    "name,variant,expected",
    [
        ("vit_base_patch16_224", "official", {"attn": 12, "qkv": 12, "mlp": 12}),
        ("deit_base_distilled_patch16_224", "official", {"attn": 12, "qkv": 12, "mlp": 12}),
        ("pit_b_224", "official", {"attn": 13, "qkv": 13, "mlp": 13}),
        ("cait_s24_224", "official", {"attn": 25, "qkv": 26, "mlp": 25}),
        ("cait_s24_224", "clean", {"attn": 26, "qkv": 28, "mlp": 24}),
        ("visformer_small", "official", {"attn": 8, "qkv": 8, "mlp": 8}),
    ],
)
def test_full_size_models_bind_every_attention_block(name, variant, expected):
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False)
    counts: dict = {}
    for b in bind_sites(net, family_of(net), variant):
        counts[b.site.component] = counts.get(b.site.component, 0) + 1
    assert counts == expected
