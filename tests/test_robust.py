"""RobustBench models through robustbench's own loader: the file layout, the preprocessing facts
and the error lines without the package (a stand-in robustbench), and a real round trip when the
package is installed."""

from __future__ import annotations

import enum
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from tgr_bench import robust
from tgr_bench.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Normalizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def tiny(normalized: bool = True) -> nn.Module:
    """A small classifier laid out as robustbench's zoo builds them."""
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )
    if not normalized:
        return net
    return nn.Sequential(OrderedDict(normalize=Normalizer(), model=net))


class Dataset(enum.Enum):
    imagenet = "imagenet"


class Threat(enum.Enum):
    Linf = "Linf"


@pytest.fixture
def fake_rb(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A stand-in robustbench package: its zoo layout and a loader that reads the file from
    <model_dir>/<dataset>/<threat>/<name>.pt as robustbench does. Returns the loader's calls."""
    calls: list[dict] = []
    zoo = {
        "Salman2020Do_R50": {"model": tiny, "gdrive_id": "abc", "preprocessing": "Res256Crop224"},
        "Wong2020Fast": {"model": tiny, "gdrive_id": "def", "preprocessing": "Crop288"},
        "Singh2023Revisiting_ConvNeXt-B-ConvStem": {
            "model": lambda: tiny(normalized=False),
            "gdrive_id": "ghi",
            "preprocessing": "BicubicRes256Crop224",
        },
        "Debenedetti2022Light_XCiT-S12": {"model": tiny, "gdrive_id": None},
    }

    def load_model(model_name: str, model_dir: str, dataset: str, threat_model: str) -> nn.Module:
        calls.append({"name": model_name, "model_dir": model_dir, "dataset": dataset})
        net = zoo[model_name]["model"]()
        state = torch.load(
            Path(model_dir) / dataset / threat_model / f"{model_name}.pt", weights_only=True
        )
        inner = net.model if hasattr(net, "model") else net
        inner.load_state_dict(state)
        return net.eval()

    pkg = types.ModuleType("robustbench")
    utils = types.ModuleType("robustbench.utils")
    utils.load_model = load_model
    model_zoo = types.ModuleType("robustbench.model_zoo")
    model_zoo.model_dicts = {Dataset.imagenet: {Threat.Linf: zoo}}
    enums = types.ModuleType("robustbench.model_zoo.enums")
    enums.BenchmarkDataset, enums.ThreatModel = Dataset, Threat
    for name, module in [
        ("robustbench", pkg),
        ("robustbench.utils", utils),
        ("robustbench.model_zoo", model_zoo),
        ("robustbench.model_zoo.enums", enums),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(robust, "_drive_reachable", lambda timeout=3.0: False)
    return calls


def save_weights(model_dir: Path, name: str, normalized: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = tiny(normalized).eval()
    path = robust.checkpoint_path(name, model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save((net.model if normalized else net).state_dict(), path)
    return net


def test_checkpoint_path_is_robustbench_layout(tmp_path: Path) -> None:
    path = robust.checkpoint_path("Salman2020Do_R50", tmp_path)
    assert path == tmp_path / "imagenet" / "Linf" / "Salman2020Do_R50.pt"


def test_preprocessing_facts_without_the_package() -> None:
    salman = robust.preprocessing_of("Salman2020Do_R50")
    assert (salman.resize, salman.keep_aspect, salman.crop) == (256, True, 224)
    assert salman.interpolation == "bilinear" and salman.input_size == 224
    assert robust.preprocessing_of("Wong2020Fast").input_size == 288
    swin = robust.preprocessing_of("Liu2023Comprehensive_Swin-B")
    assert swin.interpolation == "bicubic" and swin.input_size == 224
    assert robust.PREPROCESSINGS["Res224"].describe() == "resize both sides to 224 (bilinear)"


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "robustbench", None)  # import raises ModuleNotFoundError
    with pytest.raises(UserError, match=r'pip install "tgr-bench\[robust\]"'):
        robust.load_robust_model("Salman2020Do_R50", tmp_path)


def test_import_hints() -> None:
    hint = robust.import_hint(ModuleNotFoundError("no", name="pkg_resources"))
    assert 'pip install "setuptools<81"' in hint
    assert "tgr-bench[robust]" in robust.import_hint(ImportError("broken", name="geotorch"))


def test_loads_offline_through_robustbench(fake_rb: list[dict], tmp_path: Path) -> None:
    net = save_weights(tmp_path, "Salman2020Do_R50")
    loaded = robust.load_robust_model("Salman2020Do_R50", tmp_path)
    assert fake_rb == [
        {"name": "Salman2020Do_R50", "model_dir": str(tmp_path), "dataset": "imagenet"}
    ]
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(loaded.model(x), net(x))
    assert loaded.normalization == (pytest.approx(MEAN), pytest.approx(STD))
    facts = loaded.facts()
    assert facts["input_size"] == 224 and facts["normalization_inside"] is True
    assert facts["robustbench_preprocessing"] == "Res256Crop224"
    assert facts["weight_file"] == str(robust.checkpoint_path("Salman2020Do_R50", tmp_path))
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_resizes_to_the_model_input(fake_rb: list[dict], tmp_path: Path) -> None:
    net = save_weights(tmp_path, "Wong2020Fast")
    loaded = robust.load_robust_model("Wong2020Fast", tmp_path)
    assert loaded.model.input_size == 288
    x = torch.rand(1, 3, 224, 224)
    up = torch.nn.functional.interpolate(x, size=(288, 288), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loaded.model(x), net(up))
    assert (
        robust.load_robust_model("Wong2020Fast", tmp_path, input_size=224).model.input_size == 224
    )


def test_model_without_normalization(fake_rb: list[dict], tmp_path: Path) -> None:
    name = "Singh2023Revisiting_ConvNeXt-B-ConvStem"
    save_weights(tmp_path, name, normalized=False)
    loaded = robust.load_robust_model(name, tmp_path)
    assert loaded.normalization is None and loaded.facts()["mean"] is None


def test_missing_file_offline_names_the_path(fake_rb: list[dict], tmp_path: Path) -> None:
    expected = tmp_path / "imagenet" / "Linf" / "Salman2020Do_R50.pt"
    with pytest.raises(UserError, match="Google Drive cannot be reached") as info:
        robust.load_robust_model("Salman2020Do_R50", tmp_path)
    assert str(expected) in str(info.value) and "uc?id=abc" in str(info.value)
    assert "\n" not in str(info.value)
    assert fake_rb == [] and not (tmp_path / "imagenet").exists()


def test_unreadable_file_is_one_line(fake_rb: list[dict], tmp_path: Path) -> None:
    path = robust.checkpoint_path("Salman2020Do_R50", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not build 'Salman2020Do_R50'") as info:
        robust.load_robust_model("Salman2020Do_R50", tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_pickled_objects_are_refused(fake_rb: list[dict], tmp_path: Path) -> None:
    path = robust.checkpoint_path("Salman2020Do_R50", tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({"args": types.SimpleNamespace(lr=0.1)}, path)
    with pytest.raises(UserError, match="besides tensors"):
        robust.load_robust_model("Salman2020Do_R50", tmp_path)


def test_unknown_and_unsupported_names(fake_rb: list[dict], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a RobustBench ImageNet L-inf model"):
        robust.load_robust_model("Nobody2099", tmp_path)
    with pytest.raises(UserError, match="not one robustbench weight file"):
        robust.load_robust_model("Debenedetti2022Light_XCiT-S12", tmp_path)


# The real package: skipped where it is not installed.


def real_robustbench() -> types.ModuleType:
    robust._alias_autoattack()
    return pytest.importorskip("robustbench.utils", reason=f"robustbench absent ({robust.INSTALL})")


def test_known_table_matches_robustbench() -> None:
    real_robustbench()
    _, zoo = robust._robustbench()
    for name, (key, _) in robust.KNOWN.items():
        assert zoo[name]["preprocessing"] == key, name


def test_real_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_robustbench()
    monkeypatch.setattr(robust, "_drive_reachable", lambda timeout=3.0: False)
    _, zoo = robust._robustbench()
    torch.manual_seed(0)
    reference = zoo["Salman2020Do_R50"]["model"]().eval()
    path = robust.checkpoint_path("Salman2020Do_R50", tmp_path)
    path.parent.mkdir(parents=True)
    # The released files hold the bare network's state dict, as robustbench reads them.
    torch.save({"state_dict": reference.model.state_dict()}, path)
    loaded = robust.load_robust_model("Salman2020Do_R50", tmp_path)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x))
    assert loaded.normalization is not None and loaded.model.input_size == 224
