"""NRP: the published state-dict layout, safe loading from a file, the purification's shapes and
range, per-image noise independent of the batch, and the error lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tgr_bench.defenses.nrp import NRP, Purifier, read_purifier
from tgr_bench.errors import UserError


def small(seed: int = 0) -> Purifier:
    """A purifier in the published layout, small enough for a CPU test (2 blocks, 8 features)."""
    torch.manual_seed(seed)
    return Purifier(nf=8, nb=2, gc=4).eval()


def images(n: int, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(n + h))


def saved(net: Purifier, folder: Path, name: str = "NRP.pth") -> Path:
    path = folder / name
    torch.save(net.state_dict(), path)
    return path


def test_published_layout() -> None:
    net = Purifier()
    keys = net.state_dict()
    assert len(keys) == 2 * (2 + 23 * 3 * 5)  # weight and bias of every convolution
    assert keys["conv_first.weight"].shape == (64, 3, 3, 3)
    assert keys["RRDB_trunk.22.RDB3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert keys["trunk_conv.weight"].shape == (3, 64, 3, 3)
    assert sum(p.numel() for p in net.parameters()) == 16_550_275


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_round_trip(tmp_path: Path, suffix: str) -> None:
    net = small()
    path = tmp_path / f"NRP{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
    else:
        save_file(net.state_dict(), str(path))
    loaded = read_purifier(path)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    defense = NRP(weights=str(path), dynamic=False)
    assert torch.equal(defense(x), NRP(purifier=net, dynamic=False)(x))
    assert len(defense.params()["nrp_weights_sha256"]) == 64


def test_shapes_and_range() -> None:
    defense = NRP(purifier=small())
    x = images(2, 12, 20)
    out = defense(x, keys=[5, 6])
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out * 255, (out * 255).round())  # on the 8-bit grid, as saved PNGs


def test_batch_of_three_equals_each_alone() -> None:
    defense = NRP(purifier=small())
    x, keys = images(3), [11, 22, 33]
    together = defense(x, keys)
    alone = torch.cat([defense(x[i : i + 1], [keys[i]]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    assert torch.equal(defense.perturb(x, keys)[1:2], defense.perturb(x[1:2], keys[1:2]))


def test_noise_is_each_images_own() -> None:
    defense = NRP(purifier=small())
    x = images(1)
    assert torch.equal(defense.perturb(x, [7]), defense.perturb(x, [7]))
    assert not torch.equal(defense.perturb(x, [7]), defense.perturb(x, [8]))
    moved = defense.perturb(x, [7])
    assert (moved - x).abs().max() <= 16 / 255 + 1e-6
    assert moved.min() >= 0 and moved.max() <= 1
    # sigma 0.05 is well inside 16/255, so most of the noise survives the projection
    assert 0.03 < (moved - x).std() < 0.06


def test_static_purification_ignores_keys() -> None:
    net = small()
    x = images(2)
    static = NRP(purifier=net, dynamic=False)
    with torch.no_grad():
        expected = (net(x).clamp(0, 1) * 255).round() / 255
    assert torch.equal(static(x), expected)
    assert torch.equal(static(x, keys=[1, 2]), expected)


def test_keys_required_when_dynamic() -> None:
    defense = NRP(purifier=small())
    with pytest.raises(ValueError, match="one integer key per image"):
        defense(images(2))
    with pytest.raises(ValueError, match="got 1 keys for 2 images"):
        defense(images(2), keys=[1])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="NRP weights not found") as info:
        NRP(weights=str(tmp_path / "NRP.pth"))
    assert str(tmp_path / "NRP.pth") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"defense.nrp.weights=<path to NRP.pth>"):
        NRP()


def test_other_layout_names_keys(tmp_path: Path) -> None:
    state = small().state_dict()
    del state["trunk_conv.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="not in the layout of NRP.pth") as info:
        read_purifier(path)
    message = str(info.value)
    assert "1 missing keys ['trunk_conv.bias']" in message
    assert "1 unexpected keys ['extra.weight']" in message


def test_resnet_purifier_is_named(tmp_path: Path) -> None:
    state = {
        "conv_first.weight": torch.zeros(64, 3, 3, 3),
        "recon_trunk.0.conv1.weight": torch.zeros(64, 64, 3, 3),
        "conv_last.weight": torch.zeros(3, 64, 3, 3),
    }
    path = tmp_path / "NRP_resG.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="looks like NRP_resG.pth"):
        read_purifier(path)


def test_wrong_shape_is_one_line(tmp_path: Path) -> None:
    state = small().state_dict()
    state["trunk_conv.weight"] = torch.zeros(3, 8, 5, 5)
    path = tmp_path / "shapes.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="does not fit the NRP purifier") as info:
        read_purifier(path)
    assert "\n" not in str(info.value)


def test_settings_are_checked() -> None:
    with pytest.raises(UserError, match="defense.nrp.eps"):
        NRP(purifier=small(), eps=2.0)
