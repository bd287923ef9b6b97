"""SGM against docs/baselines.md section 4, by hand on two blocks and on a ResNet."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from tests.attacks.support import assert_batch_invariant, capture
from tests.tiny import batch, grad_of, make, tiny
from tgr_bench.attacks.architectures import BRANCH, OUTPUT, BoundSite, Site
from tgr_bench.errors import UserError
from tgr_bench.models import PixelModel


# ---- SGM ----------------------------------------------------------------------------------------
class ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma):
        ctx.gamma = gamma
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.gamma, None


def test_sgm_branch_gradients_by_hand_on_two_blocks():
    model = tiny("vit")
    net = model.net
    x, y = batch(2)
    attack = make("sgm", "vit", gamma=0.3)
    with attack.source_context(model):
        got = grad_of(attack, model, x, y)

    def by_hand(pixels):  # the ViT forward written out, each residual branch's gradient scaled
        h = net.patch_embed((pixels - model.mean) / model.std)
        h = net.norm_pre(net._pos_embed(h))
        for blk in net.blocks:
            h = h + blk.ls1(ScaleGrad.apply(blk.attn(blk.norm1(h)), 0.3))
            h = h + blk.ls2(ScaleGrad.apply(blk.mlp(blk.norm2(h)), 0.3))
        return net.forward_head(net.norm(h))

    pixels = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy(by_hand(pixels), y, reduction="sum"), pixels)
    assert len(net.blocks) == 2 and attack.stats()["sgm_sites"] == {"attn": 2, "mlp": 2}
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * want.abs().max())
    assert not torch.allclose(got, grad_of(make("mi"), model, x, y), rtol=1e-2)


def two_unit_resnet() -> PixelModel:
    """The catalogue's test_resnet architecture with two units per stage (its own has one, all
    first units, which SGM leaves alone)."""
    torch.manual_seed(0)
    # zero_init_last=False: timm zero-inits the last BN of each unit, which kills the branch.
    net = timm.create_model(
        "test_resnet", pretrained=False, layers=(2, 2, 2, 2), zero_init_last=False
    )
    net = net.eval().requires_grad_(False)
    return PixelModel(net, (0.5,) * 3, (0.5,) * 3, 64).eval()


def test_sgm_on_a_resnet_source_scales_each_residual_unit_but_the_first():
    model = two_unit_resnet()
    net = model.net
    x, y = batch(2)
    attack = make("sgm", "resnet")
    with attack.source_context(model):
        g = grad_of(attack, model, x, y)
    # The original code hooks no `0.relu`: the first unit of each stage is left out.
    names = [b.name for b in attack._sites]
    assert names == ["layer1.1.bn2", "layer2.1.bn2", "layer3.1.bn3", "layer4.1.bn2"]
    assert attack.stats()["sgm_sites"] == {"branch": 4} and attack.fired["branch"] == 4
    assert not torch.allclose(g, grad_of(make("mi"), model, x, y), rtol=1e-2)
    one = make("sgm", "resnet", gamma=1.0)
    with one.source_context(model):  # gamma 1: exactly MI
        assert torch.equal(grad_of(one, model, x, y), grad_of(make("mi"), model, x, y))
    assert_batch_invariant(make("sgm", "resnet", steps=2), model)
    assert len(net.layer1) == 2


def test_sgm_gamma_defaults_per_family():
    """auto: 0.2 on residual CNNs (the paper's ResNet value, TransferAttack's default), 0.5 on
    transformer sources (unchanged); an explicit value wins everywhere."""
    for family in ("resnet", "resnetv2", "tf_resnet_v2"):
        assert make("sgm", family).gamma == 0.2 and make("sgm", family).params()["gamma"] == 0.2
    for family in ("vit", "pit", "cait", "visformer"):
        assert make("sgm", family).params()["gamma"] == 0.5
    assert make("sgm", "resnet", gamma=0.5).params()["gamma"] == 0.5
    assert make("sgm", "vit", gamma=0.2).params()["gamma"] == 0.2


def test_sgm_leaves_the_first_unit_of_each_stage_untouched():
    """The gradient arriving at each unit's branch output, and what leaves it for the producer:
    unchanged in first units, times 0.2 in the others."""
    model = two_unit_resnet()
    net = model.net
    x, y = batch(2)
    attack = make("sgm", "resnet")
    log: dict = {}
    handles = []
    with attack.source_context(model):
        for i in (1, 2, 3, 4):
            for j, unit in enumerate(getattr(net, f"layer{i}")):
                last = unit.bn3 if hasattr(unit, "bn3") else unit.bn2
                site = BoundSite(Site("branch", "bn", OUTPUT, BRANCH), last, f"{i}.{j}")
                handles.append(capture(site, log))
        grad_of(attack, model, x, y)
    for h in handles:
        h.remove()
    assert len(log) == 8
    for name, seen in log.items():
        arrive, reach = seen["arrive"], seen["reach"]
        assert arrive.abs().max() > 0, name
        if name.endswith(".0"):
            assert torch.equal(reach, arrive), name  # first unit: untouched
        else:
            assert torch.equal(reach, arrive * 0.2), name


def test_sgm_with_no_unit_to_scale_is_refused():
    """The catalogue's test_resnet has one unit per stage: SGM would be MI-FGSM, so it fails."""
    model = tiny_resnet_one_unit()
    with pytest.raises(UserError, match="SGM has no residual unit to scale"):
        make("sgm", "resnet").source_context(model).__enter__()


def tiny_resnet_one_unit() -> PixelModel:
    net = timm.create_model("test_resnet", pretrained=False).eval().requires_grad_(False)
    return PixelModel(net, (0.5,) * 3, (0.5,) * 3, 64).eval()
