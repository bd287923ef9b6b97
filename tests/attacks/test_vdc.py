"""VDC against the reference port of its re-implementations (tests/attacks/official/vdc.py), on
tiny random-weight sources of each supported family."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.attacks.official.vdc import official_gradient
from tests.attacks.support import assert_batch_invariant
from tests.attacks.test_host_sync import forbid_host_sync
from tests.tiny import batch, grad_of, make, tiny, tiny_spec
from tgr_bench.attacks import build_attack
from tgr_bench.errors import UserError
from tgr_bench.models import WeightFile, build_model

# Deeper variants than the catalogue's tiny sources, so that every stage rule acts: PiT with
# three blocks in its inner stages (the record stops summing after a stage's deepest block),
# Visformer with several blocks per hooked stage (records summed within each stage).
DEEPER = {
    "pit_deep": ("pit", {"depth": [3, 3, 2]}),
    "visformer_deep": ("visformer", {"depth": [1, 2, 3]}),
}
SOURCES = ("vit", "deit", "pit", "visformer", *DEEPER)


def source(name: str):
    """(model, family key of tests.tiny, the port's family name)."""
    if name in DEEPER:
        family, extra = DEEPER[name]
        spec = tiny_spec(family)
        spec = replace(spec, key=f"tiny_{name}", kwargs={**spec.kwargs, **extra})
        return build_model(spec, WeightFile("random"), "cpu", 0).model, family, family
    return tiny(name), name, name


def ours(attack, model, x, y, delta=None):
    with attack.source_context(model):
        d = torch.zeros_like(x) if delta is None else delta
        return attack.input_gradient(model, x, d, y, 0 if delta is None else 1, [0] * len(x))


# ---- 1. the first step's gradient equals the port's -------------------------------------------
@pytest.mark.parametrize("name", SOURCES)
def test_first_step_gradient_equals_the_port(name):
    model, family, port_family = source(name)
    x, y = batch(1)
    attack = make("vdc", family)
    reference = official_gradient(model, x, y, port_family)
    got = ours(attack, model, x, y)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7)
    # VDC changes the gradient: far from plain MI-FGSM's on the same source.
    plain = grad_of(make("mi", family), model, x, y)
    assert (got - plain).abs().max() > 0.05 * plain.abs().max()


@pytest.mark.parametrize("name", ["vit", "pit_deep", "visformer_deep"])
def test_every_key_is_the_ports_constant(name):
    model, family, port_family = source(name)
    x, y = batch(1)
    keys = {"scale": 0.3, "block_decay": 0.8, "link": 2.0}
    gamma = {"attn": 0.6, "mlp": 0.9, "record": 0.7}
    attack = make("vdc", family, **keys, gamma=gamma)
    constants = {"scale": 0.3, "decay": 0.8, "link": 2.0}
    constants |= {"gamma_attn": 0.6, "gamma_mlp": 0.9, "gamma_record": 0.7}
    reference = official_gradient(model, x, y, port_family, **constants)
    torch.testing.assert_close(ours(attack, model, x, y), reference, rtol=1e-5, atol=1e-7)
    default = official_gradient(model, x, y, port_family)
    assert (reference - default).abs().max() > 0.05 * default.abs().max()


def test_the_pit_inner_stage_rule_matters():
    """The comparison can tell the PiT rule apart: summing records inside PiT's inner stages
    (the rule of the last stage) gives another gradient than the port's."""
    model, family, port_family = source("pit_deep")
    x, y = batch(1)
    attack = make("vdc", family)
    reference = official_gradient(model, x, y, port_family)
    with attack.source_context(model):
        attack.layout = replace(attack.layout, accumulate_inner=True)
        summed = attack.input_gradient(model, x, torch.zeros_like(x), y, 0, [0])
    assert (summed - reference).abs().max() > 1e-3 * reference.abs().max()


def test_records_are_fresh_at_every_step():
    """Step 2 equals the port's first step at the same input with a new record list, not the
    re-implementations' stale PiT pooling records of step 1 (the documented departure)."""
    model, family, port_family = source("pit_deep")
    x, y = batch(1)
    stale: list = []
    official_gradient(model, x, y, port_family, stage=stale)  # step 1 fills the kept list
    delta = torch.full_like(x, 4 / 255) * torch.linspace(-1, 1, x.numel()).view_as(x).sign()
    delta = (x + delta).clamp(0, 1) - x
    got = ours(make("vdc", family), model, x, y, delta)
    fresh = official_gradient(model, x + delta, y, port_family)
    torch.testing.assert_close(got, fresh, rtol=1e-5, atol=1e-7)
    kept = official_gradient(model, x + delta, y, port_family, stage=stale)
    assert (kept - fresh).abs().max() > 1e-4 * fresh.abs().max()


# ---- 2. batch invariance ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "deit", "pit", "visformer"])
def test_batch_of_three_equals_one_by_one(family):
    attack = make("vdc", family, steps=2)
    assert_batch_invariant(attack, tiny(family), 3)


def test_batch_invariant_with_diverse_inputs():
    """Both passes of a step see the same DI draw of each image (keyed per image and step)."""
    attack = make("vdc", "vit", steps=2, di={"enabled": True})
    assert_batch_invariant(attack, tiny("vit"), 3)


def test_records_stay_per_image_in_a_batch():
    """In a batch, each image's first-step gradient is its own port gradient at batch 1."""
    model, family, port_family = source("pit_deep")
    x, y = batch(3)
    got = ours(make("vdc", family), model, x, y)
    for i in range(3):
        alone = official_gradient(model, x[i : i + 1], y[i : i + 1], port_family)
        torch.testing.assert_close(got[i : i + 1], alone, rtol=1e-5, atol=1e-7)


# ---- 3. every site fires in both passes ---------------------------------------------------------
@pytest.mark.parametrize("name", ["deit", "pit_deep", "visformer"])
def test_every_site_fires_once_in_both_passes(name):
    model, family, port_family = source(name)
    attack = make("vdc", family, steps=1)
    passes = []
    end = attack._end

    def spy(stage):
        passes.append((stage, attack.mode, dict(attack._pass_fired)))
        end(stage)

    attack._end = spy
    report: dict = {}
    x, y = batch(1)
    official_gradient(model, x, y, port_family, report=report)
    with attack.source_context(model):
        attack.perturb(model, x, y, [0])
    assert [(s, m) for s, m, _ in passes] == [
        ("probe", "record"), ("probe", "add"), ("run", "record"), ("run", "add")
    ]  # fmt: skip
    names = {b.name for b in attack._sites}
    for _, _, fired in passes:
        assert fired == dict.fromkeys(names, 1)
    blocks = sum(report["segments"])
    components = [b.site.component for b in attack._sites]
    assert components.count("attn") == components.count("mlp") == blocks
    assert components.count("norm") == 1
    assert components.count("pool") == (2 if family == "pit" else 0)


def test_the_probe_refuses_a_silent_site():
    """An attention map that no longer comes straight from the softmax leaves its site silent:
    the probe stops the run before any image is attacked."""
    model = tiny("vit")
    handle = model.net.blocks[1].attn.attn_drop.register_forward_hook(lambda m, a, out: out * 1)
    attack = make("vdc", "vit")
    with (
        pytest.raises(UserError, match=r"blocks\.1\.attn\.attn_drop"),
        attack.source_context(model),
    ):
        pass
    handle.remove()


def test_no_host_sync_in_the_loop():
    attack = make("vdc", "pit", steps=2)
    model = tiny("pit")
    x, y = batch(2)
    with attack.source_context(model), forbid_host_sync() as calls:
        attack.perturb(model, x, y, [1, 2])
    assert calls == []


# ---- 4. settings --------------------------------------------------------------------------------
def test_scale_resolves_per_family():
    assert make("vdc", "vit").params()["scale"] == 0.1
    assert make("vdc", "deit").params()["scale"] == 0.1
    assert make("vdc", "visformer").params()["scale"] == 0.1
    assert make("vdc", "pit").params()["scale"] == 0.03
    assert make("vdc", "pit", scale=0.1).params()["scale"] == 0.1
    p = make("vdc", "vit").params()
    shared = {"block_decay": 0.5, "link": 0.5}
    shared |= {"gamma_attn": 0.25, "gamma_mlp": 0.5, "gamma_record": 1.0}
    assert {k: p[k] for k in shared} == shared


def test_the_config_preset(make_cfg):
    attack = build_attack(make_cfg("attack=vdc").attack, "pit")
    assert attack.label == "vdc" and attack.params()["scale"] == 0.03


@pytest.mark.parametrize("family", ["cait", "resnet", "resnetv2", "tf_resnet_v2"])
def test_unsupported_families_are_refused(family):
    with pytest.raises(UserError, match=r"ViT/DeiT \(vit\), PiT \(pit\) and Visformer"):
        make("vdc", family)


@pytest.mark.parametrize(
    "keys,match",
    [
        ({"scale": -0.1}, "attack.scale"),
        ({"scale": "x"}, "attack.scale"),
        ({"block_decay": 1.5}, "attack.block_decay"),
        ({"link": -1}, "attack.link"),
        ({"gamma": {"attn": 2}}, "attack.gamma.attn"),
        ({"gamma": {"skip": 1}}, "attack.gamma.skip"),
    ],
)
def test_bad_values_are_refused(keys, match):
    with pytest.raises(UserError, match=match):
        make("vdc", "vit", **keys)
