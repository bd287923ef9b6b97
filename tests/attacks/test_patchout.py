"""PatchOut against docs/baselines.md section 6: masks, the per-image L2 term, presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.attacks.support import pngs
from tests.tiny import batch, make, tiny
from tgr_bench.attacks import build_attack
from tgr_bench.attacks.patchout import PatchOut
from tgr_bench.errors import UserError


# ---- PatchOut -----------------------------------------------------------------------------------
def test_patchout_keeps_exactly_n_whole_patches_per_image_and_step():
    p = PatchOut(n_patches=130, patch_size=16, mask="per_image")
    seeds = [1, 2, 3]
    masks = [p.masks(torch.Size((3, 3, 224, 224)), t, seeds, torch.device("cpu")) for t in range(3)]
    for m in masks:
        assert m.shape == (3, 1, 224, 224)
        patches = m.view(3, 14, 16, 14, 16).permute(0, 1, 3, 2, 4).reshape(3, 196, 256)
        assert ((patches == 0).all(-1) | (patches == 1).all(-1)).all()  # whole patches
        assert patches[..., 0].sum(1).tolist() == [130, 130, 130]
        assert not torch.equal(m[0], m[1])  # each image its own draw
    assert not torch.equal(masks[0], masks[1])  # a new draw every step
    alone = p.masks(torch.Size((1, 3, 224, 224)), 1, seeds[1:2], torch.device("cpu"))
    assert torch.equal(alone[0], masks[1][1])  # independent of the batch
    step = PatchOut(mask="step").masks(torch.Size((3, 3, 224, 224)), 4, seeds, torch.device("cpu"))
    assert torch.equal(step[0], step[1]) and torch.equal(step[1], step[2])


def test_patchout_update_outside_the_mask_is_the_l2_term_per_image():
    model = tiny("vit")
    x, y = batch(2)
    seeds = [3, 4]
    g = torch.Generator().manual_seed(1)
    delta = (torch.rand(x.shape, generator=g) - 0.5) * 0.1
    delta[1] *= 10  # image 1's perturbation is much larger
    for l2 in (0.0, 0.1):
        attack = make("mi", patchout={"enabled": True, "patch_size": 16, "l2": l2, "n_patches": 10})
        mask = attack.patchout.masks(x.shape, 0, seeds, x.device)
        grad = attack.input_gradient(model, x, delta, y, 0, seeds)
        outside = mask == 0
        expected = l2 * delta / delta.flatten(1).norm(dim=1).view(2, 1, 1, 1)
        assert torch.allclose(
            grad[outside.expand_as(grad)], expected[outside.expand_as(grad)], atol=1e-7
        )
        inside = grad[(~outside).expand_as(grad)]
        assert inside.abs().max() > 1e-6  # the CE gradient flows through the kept patches
        alone = attack.input_gradient(model, x[:1], delta[:1], y[:1], 0, seeds[:1])
        assert torch.allclose(alone, grad[:1], rtol=1e-4, atol=1e-7)  # the L2 term is per image


def test_patchout_errors():
    with pytest.raises(UserError, match="n_patches=300"):
        make("mi", patchout={"enabled": True, "n_patches": 300}).patchout.grid(224, 224)
    with pytest.raises(UserError, match="does not tile"):
        make("mi", patchout={"enabled": True, "patch_size": 15}).patchout.grid(224, 224)
    with pytest.raises(UserError, match="mask"):
        make("mi", patchout={"enabled": True, "mask": "random"})
    with pytest.raises(UserError, match="there is no key attack.patchout.lambda"):
        make("mi", patchout={"enabled": True, "lambda": 0.1})


@pytest.mark.parametrize("name", ["pna_patchout", "tgr_patchout"])
def test_patchout_presets_are_batch_invariant(make_cfg, name):
    attack = build_attack(make_cfg(f"attack={name}", "attack.steps=2").attack, "vit")
    assert attack.label == name
    model = tiny("vit")
    x, y = batch(3)
    x = F.interpolate(x, size=(224, 224), mode="nearest")  # PatchOut's 14x14 grid of 16x16
    seeds = [0, 1, 2]
    together = pngs(attack, model, x, y, seeds)
    alone = torch.cat(
        [pngs(attack, model, x[i : i + 1], y[i : i + 1], seeds[i : i + 1]) for i in range(3)]
    )
    assert torch.equal(together, alone)


# ---- presets, errors, end to end ----------------------------------------------------------------
def test_preset_defaults(make_cfg):
    vmi = build_attack(make_cfg("attack=vmi").attack)
    assert (vmi.n_samples, vmi.beta, vmi.eps_levels, vmi.steps) == (20, 1.5, 16.0, 10)
    assert build_attack(make_cfg("attack=sgm").attack, "vit").gamma == 0.5
    po = build_attack(make_cfg("attack=pna_patchout").attack, "vit").patchout
    assert (po.n_patches, po.patch_size, po.l2, po.mask) == (130, 16, 0.1, "per_image")
    po = build_attack(make_cfg("attack=tgr_patchout").attack, "vit").patchout
    assert (po.l2, po.mask) == (0.0, "step")
    mi = build_attack(make_cfg("attack=mi", "attack.patchout.enabled=true").attack)
    assert mi.label == "mi_patchout" and mi.patchout.n_patches == 130
