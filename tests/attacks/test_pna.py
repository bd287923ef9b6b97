"""PNA against docs/baselines.md section 5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.attacks.support import capture
from tests.tiny import batch, grad_of, make, tiny
from tgr_bench.attacks.hooks import set_fused_attn
from tgr_bench.errors import UserError
from tgr_bench.models import PixelModel
from tgr_bench.pipeline import run


# ---- PNA ----------------------------------------------------------------------------------------
def detached_attention(model: PixelModel) -> list:
    """Forward hooks that detach every attention map PNA cuts (after proj_w for CaiT's talking
    heads, after softmax elsewhere): the reference model of the PNA paper."""
    handles = []
    for m in model.net.modules():
        if hasattr(m, "attn_drop") and (hasattr(m, "qkv") or hasattr(m, "q")):
            handles.append(m.attn_drop.register_forward_hook(lambda mod, a, out: out.detach()))
    return handles


@pytest.mark.parametrize("family", ["vit", "deit", "pit", "cait", "visformer"])
def test_pna_equals_detached_attention_and_keeps_the_forward(family):
    model = tiny(family)
    x, y = batch(2)
    attack = make("pna", family)
    with torch.no_grad():
        logits_before = model(x)
    with attack.source_context(model):
        with torch.no_grad():
            logits_pna = model(x)
        got = grad_of(attack, model, x, y)
    assert torch.allclose(logits_pna, logits_before, rtol=1e-5, atol=1e-5)  # forward unchanged
    previous = set_fused_attn(model.net, False)
    handles = detached_attention(model)
    want = grad_of(make("mi"), model, x, y)
    for h in handles:
        h.remove()
    for m, flag in previous:
        m.fused_attn = flag
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * want.abs().max())
    n_maps = sum(
        1
        for m in model.net.modules()
        if hasattr(m, "attn_drop") and (hasattr(m, "qkv") or hasattr(m, "q"))
    )
    assert attack.stats()["pna_sites"] == {"attn": n_maps}  # every block with attention
    assert not torch.allclose(got, grad_of(make("mi"), model, x, y), rtol=1e-2)


@pytest.mark.parametrize("family", ["vit", "pit", "cait", "visformer"])
def test_pna_gradient_through_every_attention_map_is_exactly_zero(family):

    model = tiny(family)
    x, y = batch(2)
    attack = make("pna", family)
    log: dict = {}
    with attack.source_context(model):
        handles = []
        for b in attack._sites:
            h = capture(b, log)
            handles += h if isinstance(h, list) else [h]
        grad_of(attack, model, x, y)
    for h in handles:
        h.remove()
    assert len(log) == len(attack._sites) > 0
    for name, entry in log.items():
        assert entry["arrive"].abs().max() > 0, name
        assert (entry["reach"] == 0).all(), name


def test_pna_refuses_a_cnn_source(make_cfg, tmp_path: Path):
    cfg = make_cfg("experiment=smoke", "attack=pna", "source=test_resnet", "targets=none")
    with pytest.raises(UserError, match="PNA does not support"):
        run(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
