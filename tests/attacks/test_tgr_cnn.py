"""TGR (and SGM, PNA refusals) on residual CNN sources: timm ResNet and ResNetV2, TF-slim
ResNet-v2; the `auto` defaults resolved per family, and the run identity they give."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn

from tests.attacks.support import assert_batch_invariant
from tests.attacks.test_host_sync import forbid_host_sync
from tests.tiny import batch, grad_of, make, tiny
from tgr_bench.attacks import build_attack, create
from tgr_bench.attacks.architectures import (
    SCALE,
    SPATIAL,
    bind_sites,
    family_of,
    source_family,
)
from tgr_bench.attacks.hooks import set_fused_attn
from tgr_bench.attacks.tgr import regularize
from tgr_bench.errors import UserError
from tgr_bench.models import PixelModel
from tgr_bench.tfslim.registry import build_network, create_network
from tgr_bench.tfslim.testing import random_weights

TINY_CNN = {  # tiny random-weight residual CNNs, one per timm family and unit type
    "resnet": ("test_resnet.r160_in1k", dict(zero_init_last=False)),  # Basic + Bottleneck units
    "resnetv2": ("resnetv2_50", dict(layers=[1, 1, 1, 1], channels=(16, 32, 48, 64), stem_chs=16)),
    "resnetv2_basic": (
        "resnetv2_18",
        dict(layers=[1, 1, 1, 1], channels=(8, 16, 24, 32), stem_chs=8),
    ),
    # Two units per stage: SGM leaves each stage's first unit alone, so it needs a second.
    "resnetv2_two": (
        "resnetv2_50",
        dict(layers=[2, 2, 2, 2], channels=(16, 32, 48, 64), stem_chs=16),
    ),
    "resnetv2_basic_two": (
        "resnetv2_18",
        dict(layers=[2, 2, 2, 2], channels=(8, 16, 24, 32), stem_chs=8),
    ),
}


def tiny_cnn(kind: str, seed: int = 0) -> PixelModel:
    name, kwargs = TINY_CNN[kind]
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, **kwargs).eval()
    return PixelModel(net, (0.5,) * 3, (0.5,) * 3, 64).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tf_net() -> nn.Module:
    """A full-size TF-slim ResNet-v2-50 from a random weight dict in the converted layout."""
    return build_network("res_v2_50", random_weights("res_v2_50")).requires_grad_(False)


def spatial_by_hand(g: torch.Tensor, gamma: float, k: int) -> torch.Tensor:
    """docs/tgr.md section 2 read loop by loop: per sample and channel, the k largest and k
    smallest of the H*W positions (first position on ties) zeroed after scaling."""
    out = g.clone() * gamma
    w = g.shape[3]
    for b in range(g.shape[0]):
        for c in range(g.shape[1]):
            flat = g[b, c].flatten()
            top = torch.sort(flat, descending=True, stable=True).indices[:k]
            bottom = torch.sort(flat, stable=True).indices[:k]
            for p in set(top.tolist()) | set(bottom.tolist()):
                out[b, c, p // w, p % w] = 0
    return out


# ---- 1. the spatial rule on hand-made gradients --------------------------------------------------
def test_spatial_rule_clean_by_hand():
    g = torch.tensor(
        [
            [  # sample 0
                [[1.0, 4.0, -2.0], [0.5, 3.0, 2.0]],  # max 4 at (0,1), min -2 at (0,2)
                [[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]],  # max 1 at (0,2), min -1 at (1,0)
            ],
            [  # sample 1: the same channel 0 negated, so its extremes swap places
                [[-1.0, -4.0, 2.0], [-0.5, -3.0, -2.0]],  # max 2 at (0,2), min -4 at (0,1)
                [[5.0, 5.0, 5.0], [5.0, 5.0, 5.0]],  # constant: max = min = the first position
            ],
        ]
    )  # (B=2, C=2, H=2, W=3)
    out = regularize(g, SPATIAL, 0.25, 1)
    want = torch.tensor(
        [
            [[[0.25, 0.0, 0.0], [0.125, 0.75, 0.5]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]],
            [[[-0.25, 0.0, 0.0], [-0.125, -0.75, -0.5]], [[0.0, 1.25, 1.25], [1.25, 1.25, 1.25]]],
        ]
    )
    assert torch.equal(out, want)
    # k = 2: the two largest and two smallest of sample 0 channel 0 (4, 3 and -2, 0.5) go.
    out2 = regularize(g[:1, :1], SPATIAL, 1.0, 2)
    assert out2.flatten().tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 2.0]
    assert torch.equal(regularize(g, SPATIAL, 0.25, 2), spatial_by_hand(g, 0.25, 2))


def test_official_rule_only_scales():
    g = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(regularize(g, SCALE, 0.25, 1), g * 0.25)
    assert torch.equal(regularize(g, SCALE, 0.25, 1000), g * 0.25)  # no k limit: nothing zeroed


# ---- 2. the gradient at every unit's conv1 input, by hand ----------------------------------------
def capture_conv1(bound, log: dict) -> list:
    """The branch gradient arriving at conv1's input (its conv node's input gradient) and the
    one leaving the attack's private alias of that input (after the attack's tensor hook)."""
    key = bound.name

    def post(module, args, out):
        def arrive(gin, gout):
            log.setdefault(key, {})["arrive"] = gin[0].detach().clone()

        out.grad_fn.register_hook(arrive)

        def leave(grad_outputs):
            log.setdefault(key, {})["leave"] = grad_outputs[0].detach().clone()

        args[0].grad_fn.register_prehook(leave)  # args[0]: the alias the attack handed in

    return [bound.module.register_forward_hook(post)]


class RegularizeBranch(torch.autograd.Function):
    """Identity forward; backward applies `fn` to the gradient: the reference edit, placed by
    rewiring the unit, independently of the attack's hooks."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.fn(g), None


class EditedInput(nn.Module):
    def __init__(self, conv: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.conv, self.fn = conv, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(RegularizeBranch.apply(x, self.fn))


def reference_gradient(model: PixelModel, units: list[nn.Module], fn, x, y) -> torch.Tensor:
    """The pixel gradient with `fn` applied only to the gradient flowing into each unit's conv1,
    the shortcut untouched by construction."""
    ref = copy.deepcopy(model)
    for unit in [dict(ref.net.named_modules())[name] for name in units]:
        unit.conv1 = EditedInput(unit.conv1, fn)
    return grad_of(make("mi"), ref, x, y)


def check_every_unit(model: PixelModel, variant: str, x, y, n_units: int) -> None:
    net = model.net
    family = family_of(net)
    attack = make("tgr", family.name, variant=variant)
    sites = bind_sites(net, family, variant)
    assert len(sites) == n_units and {b.site.component for b in sites} == {"conv"}
    log: dict = {}
    handles = []
    with attack.source_context(model):
        for b in sites:
            handles += capture_conv1(b, log)
        got = grad_of(attack, model, x, y)
    for h in handles:
        h.remove()
    assert attack.stats()["tgr_sites"] == {"conv": n_units}
    assert attack.fired["conv"] == n_units  # every unit, once per backward
    assert set(log) == {b.name for b in sites}
    for b in sites:
        arrive, leave = log[b.name]["arrive"], log[b.name]["leave"]
        assert arrive.dim() == 4 and arrive.abs().max() > 0, b.name
        if variant == "official":
            assert torch.equal(leave, arrive * 0.25), b.name  # scaled, nothing zeroed
        else:
            want = spatial_by_hand(arrive, 0.25, 1)
            assert torch.equal(leave, want), b.name
            zeroed = ((want == 0) & (arrive != 0)).flatten(2).sum(-1)  # by the rule
            assert (zeroed <= 2).all() and zeroed.sum() > 0, b.name
    fn = (lambda g: g * 0.25) if variant == "official" else (lambda g: spatial_by_hand(g, 0.25, 1))
    units = [b.name.removesuffix(".conv1") for b in sites]
    want = reference_gradient(model, units, fn, x, y)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())


@pytest.mark.parametrize("kind", ["resnet", "resnetv2", "resnetv2_basic"])
@pytest.mark.parametrize("variant", ["clean", "official"])
def test_timm_every_unit_is_the_spec_transform(kind: str, variant: str):
    x, y = batch(2)
    check_every_unit(tiny_cnn(kind), variant, x, y, n_units=4)


@pytest.mark.slow
def test_tfslim_every_unit_is_the_spec_transform(tf_net):
    x, y = batch(1)
    check_every_unit(PixelModel(tf_net, (0.5,) * 3, (0.5,) * 3, 299), "clean", x, y, 16)


def test_the_shortcut_gradient_is_untouched():
    """timm ResNet layer1.0 has an identity shortcut: the gradient at the unit input is the
    edited branch gradient plus, unedited, the gradient at the residual sum."""
    model = tiny_cnn("resnet")
    unit = model.net.layer1[0]
    assert unit.downsample is None
    log: dict = {}

    def on_input(module, args):  # the stem's output, before the attack's alias
        args[0].grad_fn.register_prehook(lambda go: log.update(total=go[0].clone()))

    def on_output(module, args, out):  # out = act2(branch + shortcut): its input is the sum
        add = out.grad_fn.next_functions[0][0]
        assert add.name().startswith("AddBackward")
        add.register_prehook(lambda go: log.update(at_sum=go[0].clone()))

    def on_conv1(module, args, out):
        args[0].grad_fn.register_prehook(lambda go: log.update(branch=go[0].clone()))

    attack = make("tgr", "resnet")
    x, y = batch(1)
    with attack.source_context(model):
        handles = [
            unit.register_forward_pre_hook(on_input, prepend=True),
            unit.register_forward_hook(on_output),
            unit.conv1.register_forward_hook(on_conv1),
        ]
        grad_of(attack, model, x, y)
    for h in handles:
        h.remove()
    assert log["at_sum"].abs().max() > 0 and log["branch"].abs().max() > 0
    assert torch.allclose(log["total"], log["branch"] + log["at_sum"], atol=1e-6)


def test_the_probe_refuses_a_unit_whose_site_stays_silent():
    """Counts per component would still be positive here: the probe checks every site."""

    class Unhooked(nn.Conv2d):  # called without module hooks, as a changed layout might
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight, self.bias)

    model = tiny_cnn("resnet")
    model.net.layer2[0].conv1.__class__ = Unhooked
    with pytest.raises(UserError, match=r"edited nothing at 1 of 4 sites .*\(layer2.0.conv1\)"):
        make("tgr", "resnet").source_context(model).__enter__()


# ---- 3. variants, zero, and batch invariance -----------------------------------------------------
def test_official_and_clean_differ_and_zero_false_is_official():
    model = tiny_cnn("resnet")
    x, y = batch(2)

    def grad(**kwargs) -> torch.Tensor:
        attack = make("tgr", "resnet", **kwargs)
        with attack.source_context(model):
            return grad_of(attack, model, x, y)

    mi = grad_of(make("mi"), model, x, y)
    clean, official = grad(variant="clean"), grad(variant="official")
    assert (clean - official).abs().max() > 1e-3 * official.abs().max()
    assert (official - mi).abs().max() > 1e-3 * mi.abs().max()
    assert torch.equal(grad(variant="clean", zero=False), official)  # gammas only = official
    assert torch.equal(grad(variant="clean", gamma={"conv": 1.0}, zero=False), mi)
    assert torch.equal(grad(), clean)  # auto: clean on CNNs


def test_zero_false_on_a_vit_keeps_only_the_gammas():
    model = tiny("vit")
    x, y = batch(1)
    previous = set_fused_attn(model, False)  # TGR runs the explicit path: compare like with like
    mi = grad_of(make("mi"), model, x, y)
    for module, flag in previous:
        module.fused_attn = flag

    def grad(attack) -> torch.Tensor:
        with attack.source_context(model):
            return grad_of(attack, model, x, y)

    ones = {"attn": 1.0, "qkv": 1.0, "mlp": 1.0}
    assert torch.equal(grad(make("tgr", "vit", zero=False, gamma=ones)), mi)
    scaled, regularized = grad(make("tgr", "vit", zero=False)), grad(make("tgr", "vit"))
    assert (scaled - regularized).abs().max() > 1e-3 * regularized.abs().max()
    assert (scaled - mi).abs().max() > 1e-3 * mi.abs().max()


@pytest.mark.parametrize("kind", ["resnet", "resnetv2"])
def test_timm_batch_equals_alone(kind: str):
    assert_batch_invariant(make("tgr", kind, steps=2), tiny_cnn(kind), n=3)


def test_tfslim_batch_equals_alone_and_never_syncs(tf_net):
    model = PixelModel(tf_net, (0.5,) * 3, (0.5,) * 3, 96)  # a small input keeps the test short
    assert_batch_invariant(make("tgr", "tf_resnet_v2", steps=1), model, n=2)
    attack = make("tgr", "tf_resnet_v2", steps=1)
    x, y = batch(2)
    with attack.source_context(model), forbid_host_sync() as calls:
        attack.perturb(model, x, y, [1, 2])
    assert calls == []


def test_timm_cnn_loop_and_hooks_never_sync():
    model = tiny_cnn("resnetv2")
    x, y = batch(2)
    attacks = [
        (make("tgr", "resnetv2", steps=2), model),
        (make("tgr", "resnetv2", steps=2, variant="official"), model),
        (make("sgm", "resnetv2", steps=2), tiny_cnn("resnetv2_two")),
    ]
    for attack, net in attacks:
        with attack.source_context(net), forbid_host_sync() as calls:
            attack.perturb(net, x, y, [1, 2])
        assert calls == [], attack.name


def test_sgm_on_resnet_v2_sources_scales_every_unit_but_each_stages_first(tf_net):
    for kind, last in (("resnetv2_two", "conv3"), ("resnetv2_basic_two", "conv2")):
        net = tiny_cnn(kind).net
        sites = bind_sites(net, family_of(net, "branches"), table="branches")
        blocks = [stage.blocks[1] for stage in net.stages]  # the first unit has the projection
        assert [b.module for b in sites] == [getattr(blk, last) for blk in blocks]
        assert all(b.name.endswith(f".{last}") for b in sites)
    model = tiny_cnn("resnetv2_two")
    x, y = batch(2)
    attack = make("sgm", "resnetv2")
    with attack.source_context(model):
        g = grad_of(attack, model, x, y)
    assert attack.fired["branch"] == 4
    assert (g - grad_of(make("mi"), model, x, y)).abs().max() > 1e-3 * g.abs().max()
    tf_sites = bind_sites(tf_net, family_of(tf_net, "branches"), table="branches")
    assert len(tf_sites) == 16 - 4 and all(b.name.endswith(".conv3") for b in tf_sites)


# ---- 4. full-size layouts ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,family,units",
    [
        ("resnet50", "resnet", 16),
        ("resnet101", "resnet", 33),
        ("seresnext50_32x4d", "resnet", 16),
        ("resnetv2_50x1_bit", "resnetv2", 16),
        ("resnetv2_101", "resnetv2", 33),
        ("resnetv2_18", "resnetv2", 8),
        ("res_v2_101", "tf_resnet_v2", 33),
        ("res_v2_152", "tf_resnet_v2", 50),
    ],
)
def test_full_size_cnns_bind_every_unit(name: str, family: str, units: int):
    if name.startswith("res_v2"):
        net = create_network(name)  # meta device: no memory
    else:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False)
    assert source_family(name) == family == family_of(net).name
    for variant in ("clean", "official"):
        bound = bind_sites(net, family_of(net), variant)
        assert len(bound) == units and all(b.name.endswith(".conv1") for b in bound)
    # SGM: every unit but the first of each of the four stages.
    assert len(bind_sites(net, family_of(net, "branches"), table="branches")) == units - 4


# ---- 5. auto, params() and the run identity ------------------------------------------------------
VIT_PARAMS = {  # what a default ViT TGR run records
    "eps": 16.0,
    "steps": 10,
    "alpha": 1.6,
    "decay": 1.0,
    "k": 1,
    "gamma_attn": 0.25,
    "gamma_qkv": 0.75,
    "gamma_mlp": 0.5,
    "components": "attn+qkv+mlp",
    "variant": "official",
}


def built(make_cfg, *overrides: str):
    cfg = make_cfg("attack=tgr", *overrides)
    return build_attack(cfg.attack, source_family(cfg.source.model), cfg.source.key)


@pytest.mark.parametrize("source", ["vit_base", "deit_b", "pit_b", "cait_s24", "visformer_s"])
def test_vit_defaults_resolve_to_the_paper_params(make_cfg, source: str):
    attack = built(make_cfg, f"source={source}")
    assert attack.params() == VIT_PARAMS
    assert list(attack.params()) == list(VIT_PARAMS)  # the same order, too
    assert attack.defaults() == VIT_PARAMS
    explicit = built(make_cfg, "attack.components=[attn,qkv,mlp]", "attack.variant=official")
    assert explicit.params() == VIT_PARAMS


def test_cnn_defaults_resolve_to_conv_clean(make_cfg):
    attack = built(make_cfg, "source=test_resnet")
    params = attack.params()
    assert {k: params[k] for k in ("k", "gamma_conv", "components", "variant")} == {
        "k": 1,
        "gamma_conv": 0.25,
        "components": "conv",
        "variant": "clean",
    }
    assert not {"gamma_attn", "gamma_qkv", "gamma_mlp", "zero"} & set(params)
    assert attack.defaults() == params
    assert make("tgr", "tf_resnet_v2", variant="official").params()["variant"] == "official"


def test_zero_appears_in_params_only_when_off(make_cfg):
    on = built(make_cfg, "attack.zero=true")
    off = built(make_cfg, "attack.zero=false")
    assert "zero" not in on.params()
    assert off.params() == {**VIT_PARAMS, "zero": False}
    assert "zero" not in off.defaults()
    with pytest.raises(UserError, match="attack.zero"):
        make("tgr", "vit", zero="no")


def test_an_attack_with_sites_is_built_with_its_family():
    """The family is known before the attack exists: params() is total from the start."""
    for name in ("tgr", "sgm", "pna"):
        with pytest.raises(UserError, match=f"{name.upper()} does not support the source"):
            make(name, None)
    attack = make("tgr", "resnet")
    assert attack.params()["components"] == "conv" and attack.family.name == "resnet"


def test_the_network_must_be_of_the_attack_family():
    attack = make("tgr", "vit")
    with pytest.raises(UserError, match="built for the vit family"):
        attack.source_context(tiny_cnn("resnet")).__enter__()


def test_components_must_exist_on_the_family():
    with pytest.raises(UserError, match="resnet family has no"):
        make("tgr", "resnet", components=["attn", "qkv"])
    with pytest.raises(UserError, match="no source family has all"):
        make("tgr", "resnet", components=["attn", "conv"])
    tgr = make("tgr", "resnet", components="conv", variant="clean")
    assert tgr.params()["components"] == "conv"


# ---- 6. refusals ---------------------------------------------------------------------------------
ALL_FAMILIES = (
    "supported families are vit .*pit .*cait .*visformer .*resnet .*resnetv2 .*tf_resnet_v2"
)


def test_pna_on_a_cnn_is_refused_with_the_supported_families():
    with pytest.raises(UserError, match="PNA does not support .*families are vit .*visformer") as e:
        make("pna", "resnet")
    assert "resnet" not in str(e.value).split("supported families are")[1]
    with pytest.raises(UserError, match="PNA does not support the source test_resnet"):
        create("pna", source_family("test_resnet.r160_in1k"), source="test_resnet")


@pytest.mark.parametrize("model", ["inception_v3.tf_in1k", "inc_v3", "incres_v2", "test_convnext"])
def test_tgr_on_a_source_without_sites_is_refused(model: str):
    assert source_family(model) is None
    with pytest.raises(UserError, match=f"TGR does not support the source {model}: {ALL_FAMILIES}"):
        create("tgr", source_family(model), source=model)
    with pytest.raises(UserError, match="SGM does not support"):
        create("sgm", source_family(model), source=model)


@pytest.mark.parametrize("key", ["inc_v3", "inc_v4", "incres_v2"])
def test_tfslim_inception_networks_are_refused(key: str):
    """An attack built for another family refuses the network it is given."""
    model = PixelModel(create_network(key), (0.5,) * 3, (0.5,) * 3, 299)
    for name in ("tgr", "sgm", "pna"):
        with pytest.raises(UserError, match=f"{name.upper()} does not support"):
            make(name, "vit").source_context(model).__enter__()


def test_timm_inception_network_is_refused():
    with torch.device("meta"):
        net = timm.create_model("inception_v3", pretrained=False)
    with pytest.raises(
        UserError, match=f"support the source architecture InceptionV3: {ALL_FAMILIES}"
    ):
        make("tgr", "vit").source_context(PixelModel(net, (0.5,) * 3, (0.5,) * 3, 299)).__enter__()
