"""Weights: local checkpoints (.pth, .safetensors), the Hugging Face cache layout, and the
offline message; the [0,1]-pixel wrapper."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tgr_bench.errors import UserError
from tgr_bench.models import ModelSpec, PixelModel, build_model, resolve_weights


def spec(**kw) -> ModelSpec:
    return ModelSpec.of(
        {"key": "test_vit", "model": "test_vit.r160_in1k", "pretrained": False, **kw}
    )


def trained_like_net(seed: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit.r160_in1k", pretrained=False).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_gives_the_same_logits(tmp_path: Path, suffix: str):
    net = trained_like_net()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    else:
        save_file(net.state_dict(), str(path))
    s = spec(checkpoint=str(path))
    w = resolve_weights(s)
    assert w.kind == "checkpoint" and len(w.sha256) == 64
    torch.manual_seed(999)  # a different random init must be fully overwritten
    loaded = build_model(s, w, "cpu")
    x = torch.rand(2, 3, 160, 160)
    cfg = net.pretrained_cfg
    expected = net(
        (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    )
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), expected, atol=1e-6)


def test_hub_cache_layout_is_used_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Weights that timm would download are read from the Hugging Face cache, by tag."""
    from huggingface_hub import constants

    net = trained_like_net(7)
    snap = tmp_path / "models--timm--test_vit.r160_in1k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file(net.state_dict(), str(snap / "model.safetensors"))
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    s = spec(pretrained=True)
    w = resolve_weights(s)
    assert (w.kind, w.revision) == ("hub", "abc123")
    loaded = build_model(s, w, "cpu")
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.model.net.state_dict()[k], v)


@pytest.mark.slow
def test_offline_without_cache_says_how_to_fix_within_seconds(tmp_path: Path):
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }  # unreachable even where network exists
    env.pop("HF_HUB_CACHE", None)
    code = (
        "from tgr_bench.models import ModelSpec, resolve_weights\n"
        "resolve_weights(ModelSpec(key='vit_base',\n"
        "                          model='vit_base_patch16_224.augreg_in21k_ft_in1k'))"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert time.monotonic() - t0 < 30
    assert "vit_base_patch16_224.augreg_in21k_ft_in1k" in out.stderr
    assert "checkpoint=" in out.stderr and "HF_HOME" in out.stderr


def test_wrong_architecture_checkpoint_names_keys(tmp_path: Path):
    torch.manual_seed(0)
    other = timm.create_model("test_convnext.r160_in1k", pretrained=False)
    path = tmp_path / "convnext.pth"
    torch.save(other.state_dict(), path)
    s = spec(checkpoint=str(path))
    with pytest.raises(UserError, match="missing keys .*unexpected keys"):
        build_model(s, resolve_weights(s), "cpu")


def test_checkpoint_that_is_not_a_state_dict(tmp_path: Path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    s = spec(checkpoint=str(path))
    with pytest.raises(UserError, match="not a state dict"):
        build_model(s, resolve_weights(s), "cpu")


def test_missing_checkpoint_file(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        resolve_weights(spec(checkpoint=str(tmp_path / "nope.pth")))


def test_model_timm_lacks_asks_for_its_file_and_says_where_it_is_published():
    s = ModelSpec.of({"key": "res_v2_101", "tfslim": "res_v2_101"})
    with pytest.raises(
        UserError, match="tf2torch_resnet_v2_101.npy .*ylhz/tf_to_pytorch_model"
    ) as e:
        resolve_weights(s)
    assert "tf2torch_dir=" in str(e.value) and "targets.res_v2_101.checkpoint" in str(e.value)


@pytest.mark.parametrize(
    "name,match",
    [
        ("not_a_model_xyz.in1k", "Unknown timm architecture"),
        ("vit_base_patch16_224.no_such_tag", "no weight tag"),
    ],
)
def test_unknown_model_names(name: str, match: str):
    with pytest.raises(UserError, match=match):
        resolve_weights(ModelSpec(key="x", model=name))


def test_pixel_model_resizes_and_normalizes():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))

    m = PixelModel(Probe(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 299)
    m(torch.full((1, 3, 224, 224), 0.75))
    assert seen["x"].shape == (1, 3, 299, 299)
    assert torch.allclose(seen["x"], torch.ones(1, 3, 299, 299))
    m224 = PixelModel(Probe(), (0.0,) * 3, (1.0,) * 3, 224)
    x = torch.rand(1, 3, 224, 224)
    m224(x)
    assert torch.equal(seen["x"], x)  # no resize for 224-input models


def test_protocol_weight_tags_exist_in_timm(make_cfg):
    cfg = make_cfg("targets=paper")
    tfslim_only = set()
    for key, entry in cfg.targets.items():
        s = ModelSpec.of(entry)
        if s.model is None:
            tfslim_only.add(key)
            continue
        arch, tag = timm.models.split_model_name_tag(s.model)
        assert timm.is_model(arch), key
        assert timm.models.get_pretrained_cfg(s.model) is not None, s.model
    assert tfslim_only == {"res_v2_101", "inc_v3_ens3", "inc_v3_ens4"}
    assert cfg.targets.vit_base.model == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert cfg.targets.tnt_s.model == "tnt_s_legacy_patch16_224.in1k"
    assert cfg.targets.deit_b.model == "deit_base_distilled_patch16_224.fb_in1k"
