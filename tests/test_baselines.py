"""VMI, SGM, PNA and PatchOut against baselines.md, on tiny random-weight timm models."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from tests.conftest import cli
from tests.test_tgr import TINY, batch, grad_of, tiny
from tgr_bench.attacks import PNA, SGM, VMI, Attack, build_attack
from tgr_bench.attacks.hooks import set_fused_attn
from tgr_bench.attacks.patchout import PatchOut
from tgr_bench.errors import UserError
from tgr_bench.images import quantize
from tgr_bench.models import PixelModel
from tgr_bench.pipeline import run


def pngs(attack: Attack, model, x, y, seeds) -> torch.Tensor:
    with attack.source_context(model):
        adv = attack.perturb(model, x, y, seeds)
    return quantize(adv, (x * 255).round().to(torch.uint8), attack.eps_levels)


def assert_batch_invariant(attack: Attack, model, n: int = 3) -> None:
    x, y = batch(n)
    seeds = list(range(100, 100 + n))
    together = pngs(attack, model, x, y, seeds)
    alone = torch.cat(
        [pngs(attack, model, x[i : i + 1], y[i : i + 1], seeds[i : i + 1]) for i in range(n)]
    )
    assert torch.equal(together, alone)


# ---- VMI --------------------------------------------------------------------------------------
def reference_vmi(model, x, y, seeds, attack: VMI) -> torch.Tensor:
    """baselines.md, one image and one neighbour at a time, with the attack's own noise draws."""

    def grad(inp, label):
        inp = inp.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(inp), label, reduction="sum"), inp)
        return g

    out = []
    for b in range(len(x)):
        xb, yb, sb = x[b : b + 1], y[b : b + 1], seeds[b : b + 1]
        delta, g, v = torch.zeros_like(xb), torch.zeros_like(xb), torch.zeros_like(xb)
        for t in range(attack.steps):
            g_cur = grad(xb + delta, yb)
            tuned = g_cur + v
            g = attack.decay * g + tuned / tuned.abs().mean()
            noise = attack.neighbour_noise(xb, t, sb)[0]  # (N, C, H, W), the fixed draw
            v = sum(grad(xb + delta + noise[i : i + 1], yb) for i in range(len(noise)))
            v = v / len(noise) - g_cur
            delta = (delta + attack.alpha * g.sign()).clamp(-attack.eps, attack.eps)
            delta = (xb + delta).clamp(0, 1) - xb
        out.append(xb + delta)
    return torch.cat(out)


def test_vmi_equals_step_by_step_reference():
    model = tiny("vit")
    x, y = batch(2)
    seeds = [11, 12]
    attack = VMI(steps=3, n_samples=4, beta=1.5)
    adv = attack.perturb(model, x, y, seeds)
    ref = reference_vmi(model, x, y, seeds, attack)
    clean = (x * 255).round().to(torch.uint8)
    assert torch.equal(quantize(adv, clean, 16), quantize(ref, clean, 16))
    mi = Attack(steps=3).perturb(model, x, y, seeds)
    assert not torch.equal(adv, mi)  # the variance term changes the result


def test_vmi_noise_is_uniform_in_the_neighbourhood_and_per_image():
    attack = VMI(n_samples=6, beta=1.5)
    x = torch.zeros(2, 3, 8, 8)
    both = attack.neighbour_noise(x, 2, [5, 9])
    assert both.shape == (2, 6, 3, 8, 8)
    assert both.abs().max() <= 1.5 * 16 / 255 and both.abs().max() > 1.3 * 16 / 255
    assert torch.equal(both[1:], attack.neighbour_noise(x[:1], 2, [9]))
    assert not torch.equal(both[0], both[1])
    assert not torch.equal(both, attack.neighbour_noise(x, 3, [5, 9]))


def test_vmi_batch_invariance():
    assert_batch_invariant(VMI(steps=2, n_samples=3), tiny("vit"))


@pytest.mark.parametrize("chunk,passes", [(None, 1), (8, 3)])
def test_vmi_neighbours_are_batched(chunk, passes):
    model = tiny("vit")
    sizes = []
    handle = model.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    x, y = batch(2)
    VMI(steps=1, n_samples=20, chunk=chunk).perturb(model, x, y, [0, 1])
    handle.remove()
    assert sizes[0] == 2  # the gradient at x_t
    assert sizes[1:] == ([40] if chunk is None else [16, 16, 8])
    assert len(sizes) == 1 + passes


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
    torch.manual_seed(0)
    net = timm.create_model("vit_base_patch16_224", pretrained=False, **TINY["vit"][1]).eval()
    net.requires_grad_(False)
    model = PixelModel(net, (0.5,) * 3, (0.25,) * 3, 64).eval()
    x, y = batch(2)
    attack = SGM(gamma=0.3)
    with attack.source_context(model):
        got = grad_of(attack, model, x, y)

    def by_hand(pixels):  # the ViT forward written out, each residual branch's gradient scaled
        h = net.patch_embed((pixels - 0.5) / 0.25)
        h = net.norm_pre(net._pos_embed(h))
        for blk in net.blocks:
            h = h + blk.ls1(ScaleGrad.apply(blk.attn(blk.norm1(h)), 0.3))
            h = h + blk.ls2(ScaleGrad.apply(blk.mlp(blk.norm2(h)), 0.3))
        return net.forward_head(net.norm(h))

    pixels = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy(by_hand(pixels), y, reduction="sum"), pixels)
    assert len(net.blocks) == 2 and attack.stats()["sgm_sites"] == {"attn": 2, "mlp": 2}
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * want.abs().max())
    assert not torch.allclose(got, grad_of(Attack(), model, x, y), rtol=1e-2)


def test_sgm_on_a_resnet_source_scales_each_residual_unit():
    torch.manual_seed(0)
    # zero_init_last=False: timm zero-inits the last BN of each unit, which kills the branch.
    net = timm.create_model("test_resnet", pretrained=False, zero_init_last=False)
    net = net.eval().requires_grad_(False)
    model = PixelModel(net, (0.5,) * 3, (0.5,) * 3, 64).eval()
    x, y = batch(2)
    units = sum(len(getattr(net, f"layer{i}")) for i in (1, 2, 3, 4))
    attack = SGM()
    with attack.source_context(model):
        g = grad_of(attack, model, x, y)
    assert attack.stats()["sgm_sites"] == {"branch": units}
    assert attack.fired["branch"] == units
    assert not torch.allclose(g, grad_of(Attack(), model, x, y), rtol=1e-2)
    with SGM(gamma=1.0).source_context(model):  # gamma 1: exactly MI
        assert torch.equal(grad_of(SGM(gamma=1.0), model, x, y), grad_of(Attack(), model, x, y))
    assert_batch_invariant(SGM(steps=2), model)


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
    attack = PNA()
    with torch.no_grad():
        logits_before = model(x)
    with attack.source_context(model):
        with torch.no_grad():
            logits_pna = model(x)
        got = grad_of(attack, model, x, y)
    assert torch.allclose(logits_pna, logits_before, rtol=1e-5, atol=1e-5)  # forward unchanged
    previous = set_fused_attn(model.net, False)
    handles = detached_attention(model)
    want = grad_of(Attack(), model, x, y)
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
    assert not torch.allclose(got, grad_of(Attack(), model, x, y), rtol=1e-2)


@pytest.mark.parametrize("family", ["vit", "pit", "cait", "visformer"])
def test_pna_gradient_through_every_attention_map_is_exactly_zero(family):
    from tests.test_tgr import capture

    model = tiny(family)
    x, y = batch(2)
    attack = PNA()
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
        attack = Attack(patchout={"enabled": True, "patch_size": 16, "l2": l2, "n_patches": 10})
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
        Attack(patchout={"enabled": True, "n_patches": 300}).patchout.grid(224, 224)
    with pytest.raises(UserError, match="does not tile"):
        Attack(patchout={"enabled": True, "patch_size": 15}).patchout.grid(224, 224)
    with pytest.raises(UserError, match="mask"):
        Attack(patchout={"enabled": True, "mask": "random"})
    with pytest.raises(UserError, match="no keys"):
        Attack(patchout={"enabled": True, "lambda": 0.1})


@pytest.mark.parametrize("name", ["pna_patchout", "tgr_patchout"])
def test_patchout_presets_are_batch_invariant(make_cfg, name):
    attack = build_attack(make_cfg(f"attack={name}", "attack.steps=2").attack)
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
    assert build_attack(make_cfg("attack=sgm").attack).gamma == 0.5
    po = build_attack(make_cfg("attack=pna_patchout").attack).patchout
    assert (po.n_patches, po.patch_size, po.l2, po.mask) == (130, 16, 0.1, "per_image")
    po = build_attack(make_cfg("attack=tgr_patchout").attack).patchout
    assert (po.l2, po.mask) == (0.0, "step")
    mi = build_attack(make_cfg("attack=mi", "attack.patchout.enabled=true").attack)
    assert mi.label == "mi_patchout" and mi.patchout.n_patches == 130


@pytest.mark.parametrize(
    "params,match",
    [
        ({"name": "vmi", "n_samples": 0}, "n_samples"),
        ({"name": "vmi", "beta": -1}, "beta"),
        ({"name": "sgm", "gamma": 2}, "gamma"),
        ({"name": "pna", "gamma": 0.5}, "no parameters"),
    ],
)
def test_bad_baseline_parameters(params, match):
    with pytest.raises(UserError, match=match):
        build_attack(params)


def test_pna_refuses_a_cnn_source(make_cfg, tmp_path: Path):
    cfg = make_cfg("experiment=smoke", "attack=pna", "source=test_resnet", "targets=none")
    with pytest.raises(UserError, match="PNA does not support"):
        run(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_same_seed_same_pngs_other_seed_other_pngs(make_cfg, tmp_path: Path):
    common = (
        "experiment=smoke",
        "attack=vmi",
        "attack.steps=2",
        "attack.n_samples=2",
        "data.n=2",
        "targets=none",
    )
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(make_cfg(*common, f"seed={seed}"), output_dir=tmp_path / name)
    a, b, c = (sorted((tmp_path / n / "images").iterdir()) for n in "abc")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]


@pytest.mark.parametrize(
    "attack,source",
    [
        ("vmi", "test_vit"),
        ("sgm", "test_pit"),
        ("sgm", "test_resnet"),
        ("pna", "test_cait"),
        ("pna_patchout", "test_visformer"),
        ("tgr_patchout", "test_deit"),
    ],
)
def test_every_attack_runs_through_the_cli(tmp_path: Path, attack, source):
    out = tmp_path / "run"
    r = subprocess.run(
        cli(
            "experiment=smoke",
            f"attack={attack}",
            f"source={source}",
            "data.n=2",
            "attack.steps=2",
            "targets=smoke",
            f"hydra.run.dir={out}",
        ),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "results.csv")
    assert set(df.attack) == {attack} and set(df.source) == {source}
    assert len(list((out / "images").glob("*.png"))) == 2
