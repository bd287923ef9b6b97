"""GNS-HFA against the reference port of the released code (tests/attacks/official/gns.py), on
tiny random-weight sources of every supported family."""

from __future__ import annotations

import pytest
import torch

from tests.attacks.official import gns as official
from tests.attacks.support import assert_batch_invariant
from tests.attacks.test_host_sync import forbid_host_sync
from tests.tiny import batch, grad_of, make, tiny
from tgr_bench.attacks.gns import HFA_MODES, dct_2d, idct_2d, qkv_rule
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.errors import UserError

FAMILIES = ("vit", "deit", "pit", "cait", "visformer")
# The release's mode names: `uniform` is its --mhf "".
RELEASE_MODE = {"search": "search", "both": "both", "noise": "noise", "uniform": ""}


@pytest.fixture(scope="module")
def models():
    return {f: tiny(f) for f in FAMILIES}


def gns_gradient(attack, model, x, y) -> torch.Tensor:
    with attack.source_context(model):
        return grad_of(attack, model, x, y)


# ---- GNS: the first step's gradient equals the release's --------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_gradient_equals_the_release(models, family):
    model, (x, y) = models[family], batch(1)
    ours = gns_gradient(make("gns", family, hfa={"enabled": False}), model, x, y)
    # DeiT: the release's qkv hook passes the gradient unchanged (its model-name test); our
    # default applies the rule as on ViT, and attack.qkv=false is the release.
    rule = {"qkv_rule": "tokens"} if family == "deit" else {}
    ref = official.official_gradient(model, x, y, family, **rule)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    plain = grad_of(make("mi"), model, x, y)
    assert (ours - plain).abs().max() > 0.1 * plain.abs().max()  # the edits matter


@pytest.mark.parametrize("family", ["deit", "cait"])
def test_deit_release_and_non_default_constants(models, family):
    model, (x, y) = models[family], batch(1, seed=5)
    keys = {"u": 1.0, "attn": 0.25, "mlp": 0.75, "hfa": {"enabled": False}}
    if family == "deit":
        keys["qkv"] = False
    ours = gns_gradient(make("gns", family, **keys), model, x, y)
    ref = official.official_gradient(model, x, y, family, u=1.0, attn=0.25, mlp=0.75)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_qkv_rule_is_per_image_and_equals_the_release_at_one_image():
    g = torch.randn(3, 7, 12) * torch.linspace(0.1, 2, 12)
    ours = qkv_rule(g, "tokens", 0.6)
    for i in range(3):
        alone = g[i : i + 1]
        ref = alone * official.official_qkv_factor(alone, "tokens", 0.6).view(1, 1, -1)
        torch.testing.assert_close(ours[i : i + 1], ref, rtol=1e-5, atol=0)
        assert torch.equal(ours[i : i + 1], qkv_rule(alone, "tokens", 0.6))
    # The release pools the channel means over the batch: a different factor per image.
    pooled = g * official.official_qkv_factor(g, "tokens", 0.6).view(1, 1, -1)
    assert not torch.allclose(ours, pooled)
    spatial = torch.randn(1, 6, 4, 5) * torch.linspace(0.1, 2, 6).view(1, 6, 1, 1)
    ref = spatial * official.official_qkv_factor(spatial, "spatial", 1.0).view(1, -1, 1, 1)
    torch.testing.assert_close(qkv_rule(spatial, "spatial", 1.0), ref, rtol=1e-5, atol=0)
    # Every channel equal (sigma = 0): factor 0 where the release divides 0 by 0.
    flat = torch.ones(1, 4, 8)
    assert torch.equal(qkv_rule(flat, "tokens", 0.6), torch.zeros_like(flat))


# ---- HFA ---------------------------------------------------------------------------------------
def test_dct_round_trip_and_equals_dct_py():
    x = torch.rand(2, 3, 16, 12)
    torch.testing.assert_close(idct_2d(dct_2d(x)).float(), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(dct_2d(x).float(), official.official_dct_2d(x), rtol=1e-5, atol=1e-4)
    c = official.official_dct_2d(x)
    torch.testing.assert_close(idct_2d(c).float(), official.official_idct_2d(c), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", HFA_MODES)
def test_hfa_inputs_equal_the_release_for_the_same_draws(mode):
    attack = make("gns", "vit", hfa={"n": 4, "mode": mode, "rho": 0.4, "noise": 8})
    x, _ = batch(2)
    z, u = attack.hfa.draws(x, 3, [7, 8], 0, 4)
    ours = attack.hfa.inputs(x, z, u)
    ref = official.official_hfa_inputs(
        x, z.transpose(0, 1), u.transpose(0, 1), rho=0.4, sigma=8, mode=RELEASE_MODE[mode]
    )
    torch.testing.assert_close(ours, ref.transpose(0, 1), rtol=0, atol=2e-6)


def test_hfa_draws_are_per_image_sample_and_step():
    attack = make("gns", "vit", hfa={"n": 6})
    x = torch.zeros(2, 3, 32, 32)
    z, u = attack.hfa.draws(x, 1, [5, 9], 0, 6)
    assert z.shape == u.shape == (2, 6, 3, 32, 32)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02  # standard normal
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01  # uniform on [0, 1)
    alone = attack.hfa.draws(x[1:], 1, [9], 0, 6)
    assert torch.equal(z[1:], alone[0]) and torch.equal(u[1:], alone[1])
    part = attack.hfa.draws(x, 1, [5, 9], 2, 5)  # any split of the samples draws the same
    assert torch.equal(z[:, 2:5], part[0]) and torch.equal(u[:, 2:5], part[1])
    assert not torch.equal(z[0], z[1]) and not torch.equal(z[:, 0], z[:, 1])
    assert not torch.equal(z, attack.hfa.draws(x, 2, [5, 9], 0, 6)[0])


@pytest.mark.parametrize("family", ["vit", "visformer"])
def test_hfa_gradient_equals_the_release_for_the_same_draws(models, family):
    model, (x, y) = models[family], batch(1)
    attack = make("gns", family, hfa={"n": 2})
    got = gns_gradient(attack, model, x, y)
    z, u = attack.hfa.draws(x, 0, [0], 0, 2)
    ref = official.official_hfa_gradient(model, x, y, family, z.transpose(0, 1), u.transpose(0, 1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


def test_hfa_samples_are_chunked_without_changing_the_gradient(models):
    model, (x, y) = models["vit"], batch(2)
    sizes = []
    handle = model.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    whole = gns_gradient(make("gns", "vit", hfa={"n": 5}), model, x, y)
    chunked = make("gns", "vit", hfa={"n": 5, "chunk": 2})
    parts = gns_gradient(chunked, model, x, y)
    handle.remove()
    assert sizes == [1, 10, 1, 4, 4, 2]  # probe, all samples; probe, chunks of 2, 2, 1
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-8)
    assert chunked.stats()["hfa_samples_per_pass"] == 2


# ---- sites, counts, batch invariance -----------------------------------------------------------
SITES = {  # per component: the release's hooked modules on the tiny sources
    "vit": {"attn": 2, "qkv": 2, "mlp": 2},
    "deit": {"attn": 2, "qkv": 2, "mlp": 2},
    "pit": {"attn": 5, "qkv": 5, "mlp": 5},
    "cait": {"attn": 3, "qkv": 4, "mlp": 3},  # 2 blocks + blocks_token_only[1] (k and v)
    "visformer": {"attn": 2, "qkv": 2, "mlp": 2},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_fires_and_counts_are_per_component(models, family):
    model, (x, y) = models[family], batch(1)
    attack = make("gns", family, steps=1, hfa={"n": 3, "chunk": 2})
    with attack.source_context(model):
        attack.perturb(model, x, y, [1])
        ours = [(b.site.component, b.name) for b in attack._sites]
    stats = attack.stats()
    assert stats["gns_sites"] == SITES[family]
    # The release's hooked modules, but CaiT's q (its edit reaches only a bias gradient).
    release = official.official_sites(model.net, family)
    # Visformer: the release's `mlp` hook edits the input gradient of its last conv, conv3.
    names = sorted(n.removesuffix(".conv3") for _, n in ours)
    assert names == sorted(n for r, n, _ in release if r != "q")
    passes = 2  # 1 step, 2 passes of samples (2 + 1)
    assert stats["gns_fired"] == {c: n * passes for c, n in SITES[family].items()}
    off = make("gns", family, qkv=False, hfa={"enabled": False})
    with off.source_context(model):
        grad_of(off, model, x, y)
    assert "qkv" not in off.stats()["gns_sites"]


@pytest.mark.parametrize("family", ["vit", "pit", "cait", "visformer"])  # DeiT: ViT's code
def test_batch_of_three_equals_each_image_alone(models, family):
    assert_batch_invariant(make("gns", family, steps=2, hfa={"n": 2}), models[family])


# ---- refusals ----------------------------------------------------------------------------------
def test_unsupported_families_are_refused():
    with pytest.raises(UserError, match="GNS does not support.*vit.*pit.*cait.*visformer"):
        make("gns", "resnet")
    with pytest.raises(UserError, match="GNS does not support"):
        make("gns", None)


@pytest.mark.parametrize(
    "keys,match",
    [
        ({"attn": 1.5}, r"attack.attn=1.5"),
        ({"mlp": -0.1}, r"attack.mlp=-0.1"),
        ({"u": -1}, r"attack.u=-1"),
        ({"hfa": {"n": 0}}, r"attack.hfa.n=0"),
        ({"hfa": {"rho": 1.5}}, r"attack.hfa.rho=1.5"),
        ({"hfa": {"noise": 0.0627}}, r"below one pixel level"),
        ({"hfa": {"mode": "high"}}, r"attack.hfa.mode"),
        ({"si": {"enabled": True}}, r"attack.hfa and attack.si are both on"),
        ({"admix": {"enabled": True}}, r"attack.hfa and attack.admix are both on"),
        ({"patchout": {"enabled": True}}, r"attack.hfa and attack.patchout are both on"),
    ],
)
def test_bad_values_are_refused(keys, match):
    with pytest.raises(UserError, match=match):
        make("gns", "vit", **keys)


def test_si_without_hfa_is_accepted_and_gns_is_a_hook_attack():
    attack = make("gns", "vit", si={"enabled": True, "m": 2}, hfa={"enabled": False})
    assert isinstance(attack, GradientHookAttack) and attack.label == "gns_si"
    assert attack.params()["hfa"] is False and "hfa_n" not in attack.params()
    assert make("gns", "pit").params()["hfa_n"] == 20


@pytest.mark.parametrize("family,di", [("cait", False), ("visformer", True)])
def test_the_loop_and_the_hooks_never_sync(models, family, di):
    modifier = {"di": {"enabled": True, "rate": 1.25}} if di else {}
    attack = make("gns", family, steps=1, hfa={"n": 2}, **modifier)
    x, y = batch(2)
    with attack.source_context(models[family]), forbid_host_sync() as calls:
        attack.perturb(models[family], x, y, [1, 2])
    assert calls == []
