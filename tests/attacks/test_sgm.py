"""SGM against docs/baselines.md section 4, by hand on two blocks and on a ResNet."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from tests.attacks.support import assert_batch_invariant
from tests.tiny import batch, grad_of, make, tiny
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


def test_sgm_on_a_resnet_source_scales_each_residual_unit():
    torch.manual_seed(0)
    # zero_init_last=False: timm zero-inits the last BN of each unit, which kills the branch.
    net = timm.create_model("test_resnet", pretrained=False, zero_init_last=False)
    net = net.eval().requires_grad_(False)
    model = PixelModel(net, (0.5,) * 3, (0.5,) * 3, 64).eval()
    x, y = batch(2)
    units = sum(len(getattr(net, f"layer{i}")) for i in (1, 2, 3, 4))
    attack = make("sgm", "resnet")
    with attack.source_context(model):
        g = grad_of(attack, model, x, y)
    assert attack.stats()["sgm_sites"] == {"branch": units}
    assert attack.fired["branch"] == units
    assert not torch.allclose(g, grad_of(make("mi"), model, x, y), rtol=1e-2)
    one = make("sgm", "resnet", gamma=1.0)
    with one.source_context(model):  # gamma 1: exactly MI
        assert torch.equal(grad_of(one, model, x, y), grad_of(make("mi"), model, x, y))
    assert_batch_invariant(make("sgm", "resnet", steps=2), model)
