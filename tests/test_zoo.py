"""The modern zoo, TransferAttack's eight targets and the RobustBench keys: each catalogue key names
the exact weights (timm tag, torchvision enum, RobustBench name), the target groups list exactly
their keys, and the models build at their real architecture with random weights, offline."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest
import torch

from tgr_bench.catalogue import model_spec
from tgr_bench.config import compose
from tgr_bench.errors import UserError
from tgr_bench.models import WeightFile, build_model, check_model_name, pretrained_cfg
from tgr_bench.models import resolve_weights as weights_of

TIMM = {
    "swin_t": ("swin_tiny_patch4_window7_224.ms_in1k", 224),
    "swin_b": ("swin_base_patch4_window7_224.ms_in22k_ft_in1k", 224),
    "convnext_b": ("convnext_base.fb_in1k", 224),
    "deit3_b": ("deit3_base_patch16_224.fb_in1k", 224),
    "beit_b": ("beit_base_patch16_224.in22k_ft_in22k_in1k", 224),
    "eva02_b": ("eva02_base_patch14_448.mim_in22k_ft_in22k_in1k", 448),
    "maxvit_b": ("maxvit_base_tf_224.in1k", 224),
    "resnet50": ("resnet50.tv2_in1k", 224),  # timm's config says 176, its training size
    "vgg16": ("vgg16.tv_in1k", 224),
    "inception_v3": ("inception_v3.tv_in1k", 299),
    "vit_b": ("vit_base_patch16_224.augreg2_in21k_ft_in1k", 224),
    "pit_b": ("pit_b_224.in1k", 224),
    "visformer_s": ("visformer_small.in1k", 224),
}
ROBUSTBENCH = {
    "rb_salman2020_r50": "Salman2020Do_R50",
    "rb_wong2020_fast": "Wong2020Fast",
    "rb_engstrom2019": "Engstrom2019Robustness",
    "rb_liu2023_swin_b": "Liu2023Comprehensive_Swin-B",
    "rb_liu2023_convnext_b": "Liu2023Comprehensive_ConvNeXt-B",
    "rb_singh2023_convnext_b_cs": "Singh2023Revisiting_ConvNeXt-B-ConvStem",
}


def test_target_groups_list_exactly_their_keys():
    transferattack = ["resnet50", "vgg16", "mobilenet_v2", "inception_v3"]
    transferattack += ["vit_b", "pit_b", "visformer_s", "swin_t"]
    assert list(compose(["targets=transferattack"]).targets) == transferattack
    modern = ["swin_t", "swin_b", "convnext_b", "deit3_b", "beit_b", "eva02_b", "maxvit_b"]
    assert list(compose(["targets=modern"]).targets) == modern
    assert list(compose(["targets=robustbench"]).targets) == list(ROBUSTBENCH)


@pytest.mark.parametrize("key", sorted(TIMM))
def test_each_timm_key_names_its_tag_and_input_size(key):
    spec = model_spec(key)
    tag, size = TIMM[key]
    assert spec.model == tag and spec.pretrained
    cfg = pretrained_cfg(spec)  # timm knows the tag, with its hub repository
    assert cfg["hf_hub_id"] == f"timm/{tag}"
    assert (spec.input_size or cfg["input_size"][-1]) == size


def test_mobilenet_v2_is_torchvisions_default_weights():
    from torchvision.models import MobileNet_V2_Weights

    spec = model_spec("mobilenet_v2")
    assert (spec.model, spec.torchvision) == ("mobilenet_v2", "IMAGENET1K_V2")
    assert MobileNet_V2_Weights.DEFAULT is MobileNet_V2_Weights.IMAGENET1K_V2
    check_model_name(spec)


def _built(spec, seed: int = 0):
    return build_model(replace(spec, pretrained=False), WeightFile("random"), "cpu", seed).model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))


def test_mobilenet_v2_builds_offline_through_torchvision():
    spec = model_spec("mobilenet_v2")
    model = _built(spec)
    assert model.input_size == 224 and model.mean.flatten().tolist() == pytest.approx(
        [0.485, 0.456, 0.406]
    )
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's MobileNet-V2
    first = _logits(model)
    assert first.shape == (1, 1000)
    assert torch.equal(_logits(_built(spec)), first)  # seeded: the same network each time


# Every timm key at its real architecture: about a minute on two cores, so in the slow tier.
@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(TIMM))
def test_every_timm_key_builds_offline(key):
    model = _built(model_spec(key))
    assert model.input_size == TIMM[key][1]
    assert _logits(model).shape == (1, 1000)


def test_torchvision_weights_missing_offline_name_the_url_and_path(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def unreachable(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(UserError, match=r"mobilenet_v2-7ebf99e0\.pth and copy it to that path"):
        weights_of(model_spec("mobilenet_v2"))


def test_robustbench_keys_name_their_model_and_need_the_extra():
    for key, name in ROBUSTBENCH.items():
        spec = model_spec(key)
        assert spec.robustbench == name and spec.model is None
    try:
        import robustbench  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r'pip install "tgr-bench\[robust\]"'):
            check_model_name(model_spec("rb_salman2020_r50"))


def test_a_present_robustbench_file_is_found_without_robustbench(tmp_path):
    spec = replace(model_spec("rb_wong2020_fast"), model_dir=str(tmp_path))
    path = tmp_path / "imagenet" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, path)
    found = weights_of(spec)
    assert found.path == str(path.resolve()) and found.kind == "checkpoint"


@pytest.mark.parametrize(
    "key,family",
    [("deit3_b", "vit"), ("vit_b", "vit"), ("resnet50", "resnet"), ("swin_t", None)],
)
def test_zoo_keys_the_attacks_support_are_sources_of_their_family(key: str, family: str | None):
    from tgr_bench.attacks import create
    from tgr_bench.attacks.architectures import source_family

    spec = model_spec(key)
    assert source_family(spec.arch) == family
    if family is None:  # no site table: a hook attack refuses it, naming the families it has
        with pytest.raises(UserError, match="vit"):
            create("tgr", source_family(spec.arch), source=key)


def test_a_deit3_source_fires_every_tgr_site():
    import timm

    from tgr_bench.attacks import create
    from tgr_bench.models import PixelModel

    net = timm.create_model(
        "deit3_base_patch16_224", pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=64
    )
    model = PixelModel(net.eval(), (0.5,) * 3, (0.5,) * 3, 64).eval().requires_grad_(False)
    attack = create("tgr", "vit", steps=2)
    x, y = (
        torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        torch.tensor([1, 2]),
    )
    with attack.source_context(model):
        adv = attack.perturb(model, x, y, [0, 1])
    assert dict(attack.fired) == {"attn": 4, "qkv": 4, "mlp": 4}  # 2 blocks x 2 steps
    assert 0 < (adv - x).abs().max() <= 16 / 255 + 1e-6
