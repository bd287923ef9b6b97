"""RobustBench's adversarially trained ImageNet models (L-inf) as targets, built by robustbench's
own loader so that every checkpoint gets the key fixes and the architecture robustbench applies.

robustbench finds a model's weights at `<model_dir>/imagenet/Linf/<name>.pt` and downloads them
from Google Drive when the file is missing. Here the file is looked for first: present, nothing
is downloaded; missing with Google Drive unreachable, the run stops with the path to put it at.

robustbench evaluates on ImageNet validation images resized and centre-cropped by its own
transform (`Preprocessing`) and feeds [0,1] pixels: the models that need a normalization carry it
inside (an `ImageNormalizer` named `normalize`), the ConvStem models were trained on [0,1] pixels.
The stored images of a data set are already at their final size, so they go in as they are,
resized only when the model's input is another size (Wong2020Fast: 288): a second resize and crop
would enlarge the image, and its perturbation, by 256/224.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tgr_bench.errors import UserError
from tgr_bench.hashing import sha256_file
from tgr_bench.models import PixelModel, WeightFile

INSTALL = 'pip install "tgr-bench[robust]"'
DATASET, THREAT = "imagenet", "Linf"
DRIVE = ("drive.google.com", 443)  # where robustbench downloads from (gdown)


@dataclass(frozen=True)
class Preprocessing:
    """What robustbench's transform does to a validation image before the model sees it."""

    name: str  # robustbench's key, e.g. "Res256Crop224"
    resize: int | None  # resized to this first (None: no resize)
    keep_aspect: bool  # resize the shorter side (True) or to a resize x resize square
    interpolation: str  # of that resize
    crop: int | None  # then a centre crop of this side (None: no crop)

    @property
    def input_size(self) -> int:
        """The side of the square image the network gets."""
        return int(self.crop or self.resize or 224)

    def describe(self) -> str:
        steps = []
        if self.resize:
            side = "shorter side" if self.keep_aspect else "both sides"
            steps.append(f"resize {side} to {self.resize} ({self.interpolation})")
        if self.crop:
            steps.append(f"centre crop {self.crop}")
        return ", ".join(steps) or "none"


PREPROCESSINGS = {
    "Res256Crop224": Preprocessing("Res256Crop224", 256, True, "bilinear", 224),
    "BicubicRes256Crop224": Preprocessing("BicubicRes256Crop224", 256, True, "bicubic", 224),
    "Crop288": Preprocessing("Crop288", None, True, "bilinear", 288),
    "Res224": Preprocessing("Res224", 224, False, "bilinear", None),
}

# The models tgr-bench documents, known without robustbench installed: robustbench's
# preprocessing key and the architecture its zoo builds (checked against robustbench in tests).
KNOWN = {
    "Salman2020Do_R50": ("Res256Crop224", "torchvision resnet50, ImageNormalizer inside"),
    "Wong2020Fast": ("Crop288", "torchvision resnet50, ImageNormalizer inside"),
    "Engstrom2019Robustness": ("Res256Crop224", "torchvision resnet50, ImageNormalizer inside"),
    "Liu2023Comprehensive_Swin-B": (
        "BicubicRes256Crop224",
        "timm swin_base_patch4_window7_224, ImageNormalizer inside",
    ),
    "Liu2023Comprehensive_ConvNeXt-B": (
        "BicubicRes256Crop224",
        "timm convnext_base, ImageNormalizer inside",
    ),
    "Singh2023Revisiting_ConvNeXt-B-ConvStem": (
        "BicubicRes256Crop224",
        "timm convnext_base with a convolutional stem, no normalization ([0,1] pixels)",
    ),
}


@dataclass
class RobustModel:
    """A loaded RobustBench model: `model` takes [0,1] pixels (resized to `model.input_size` when
    they are another size) and returns 1000 logits."""

    name: str
    model: PixelModel
    preprocessing: Preprocessing
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None  # (mean, std) inside
    weights: WeightFile

    def facts(self) -> dict[str, Any]:
        """What a run records about how this model sees its input."""
        mean, std = self.normalization or (None, None)
        return {
            "robustbench": self.name,
            "input_size": self.model.input_size,
            "robustbench_preprocessing": self.preprocessing.name,
            "robustbench_transform": self.preprocessing.describe(),
            "normalization_inside": self.normalization is not None,
            "mean": list(mean) if mean else None,
            "std": list(std) if std else None,
            "weight_file": self.weights.path,
            "sha256": self.weights.sha256,
        }


def checkpoint_path(name: str, model_dir: str | os.PathLike[str]) -> Path:
    """Where robustbench reads (and downloads) the weights of `name`."""
    return Path(model_dir).expanduser() / DATASET / THREAT / f"{name}.pt"


def preprocessing_of(name: str) -> Preprocessing:
    """robustbench's transform for `name`: from its zoo when installed, else from KNOWN."""
    if name in KNOWN:
        return PREPROCESSINGS[KNOWN[name][0]]
    _, zoo = _robustbench()
    return _preprocessing(name, _entry(zoo, name))


def load_robust_model(
    name: str,
    model_dir: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    input_size: int | None = None,
    known: WeightFile | None = None,
) -> RobustModel:
    """Build `name` through robustbench.utils.load_model from `model_dir`, offline when its file
    is there; eval mode, no parameter gradients. `input_size` overrides the side the stored
    images are resized to (default: robustbench's, e.g. 288 for Wong2020Fast); `known` is the
    file as resolved before (its hash is not computed again)."""
    load_model, zoo = _robustbench()
    entry = _entry(zoo, name)
    path = checkpoint_path(name, model_dir)
    present = path.is_file()
    if present:
        _check_safe(path)
    elif not _drive_reachable():
        raise UserError(_missing_message(name, path, entry, "Google Drive cannot be reached"))
    root = str(Path(model_dir).expanduser())
    try:
        net = load_model(name, model_dir=root, dataset=DATASET, threat_model=THREAT)
    except Exception as e:  # a failed download or a file that does not fit: one line each
        raise UserError(_load_failed(name, path, present, e)) from e
    if not path.is_file():
        raise UserError(_missing_message(name, path, entry, "robustbench's download wrote nothing"))
    prep = _preprocessing(name, entry)
    size = int(input_size or prep.input_size)
    # Normalization is robustbench's business (inside the network, or none): identity here.
    model = PixelModel(net, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), size, key=name).eval().to(device)
    model.requires_grad_(False)
    if known is not None and known.sha256:
        weights = known
    else:
        weights = WeightFile("checkpoint", str(path.resolve()), sha256_file(path))
    return RobustModel(name, model, prep, normalization_inside(net), weights)


def normalization_inside(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of robustbench's `normalize` layer, or None for a model fed [0,1] pixels."""
    layer = getattr(net, "normalize", None)
    mean, std = getattr(layer, "mean", None), getattr(layer, "std", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
        return None
    return tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())


def _robustbench() -> tuple[Callable[..., nn.Module], Mapping[str, Any]]:
    """robustbench's loader and its ImageNet L-inf zoo, or a one-line error saying what to
    install."""
    _alias_autoattack()
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import load_model
    except ImportError as e:
        raise UserError(import_hint(e)) from e
    return load_model, model_dicts[BenchmarkDataset.imagenet][ThreatModel.Linf]


def _alias_autoattack() -> None:
    """robustbench imports `autoattack` when imported (for its own evaluation, unused here); its
    release on PyPI depends on `pyautoattack`, the same package under another name, so an
    install from PyPI alone cannot import it. Lend it that name when only pyautoattack exists."""
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    if importlib.util.find_spec("pyautoattack") is None:
        return
    import pyautoattack
    import pyautoattack.state

    sys.modules["autoattack"] = pyautoattack
    sys.modules["autoattack.state"] = pyautoattack.state


def import_hint(error: ImportError) -> str:
    """The fix for an import of robustbench that failed."""
    missing = getattr(error, "name", None) or ""
    if missing == "robustbench" or missing.startswith("robustbench."):
        return f"RobustBench models need the robustbench package: {INSTALL}."
    if missing == "pkg_resources":
        return (
            "robustbench imports pkg_resources, which setuptools 81 removed: "
            'pip install "setuptools<81".'
        )
    return (
        f"robustbench cannot be imported ({type(error).__name__}: {error}); reinstall: {INSTALL}."
    )


def _entry(zoo: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The zoo entry of a model robustbench keeps as one downloadable file."""
    if name not in zoo:
        raise UserError(
            f"{name!r} is not a RobustBench ImageNet L-inf model; names: {', '.join(zoo)}."
        )
    entry = zoo[name]
    if not isinstance(entry.get("gdrive_id"), str) or not entry["gdrive_id"]:
        single = [
            n for n, e in zoo.items() if isinstance(e.get("gdrive_id"), str) and e["gdrive_id"]
        ]
        raise UserError(
            f"{name!r} is not one robustbench weight file (an ensemble, or weights from another "
            f"source); the models with one file are: {', '.join(single)}."
        )
    return entry


def _preprocessing(name: str, entry: Mapping[str, Any]) -> Preprocessing:
    key = entry.get("preprocessing")
    if key not in PREPROCESSINGS:
        raise UserError(
            f"{name!r} uses robustbench preprocessing {key!r}, which tgr-bench does not know; "
            f"known: {', '.join(PREPROCESSINGS)}."
        )
    return PREPROCESSINGS[key]


def _drive_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(DRIVE, timeout=timeout):
            return True
    except OSError:
        return False


def _missing_message(name: str, path: Path, entry: Mapping[str, Any], why: str) -> str:
    url = f"https://drive.google.com/uc?id={entry['gdrive_id']}"
    return (
        f"The weights of RobustBench model {name!r} are not at {path} and {why}: download "
        f"{url} (on a connected machine) and copy it to that exact path, or point model_dir "
        f"at a folder that holds imagenet/Linf/{name}.pt."
    )


def _unsafe_message(path: Path, error: Exception) -> str | None:
    """The fix for a file torch's safe loader refused for its Python objects; None when the
    error is something else (not a torch file at all, say)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if not isinstance(error, pickle.UnpicklingError) or found is None:
        return None
    return (
        f"{path} holds Python objects besides tensors ({found.group(1)}), which torch's safe "
        f"loader refuses to unpickle: from a copy you trust, save only its state dict, "
        f"torch.save(torch.load(path, weights_only=False)['state_dict'], path)."
    )


def _load_failed(name: str, path: Path, present: bool, error: Exception) -> str:
    unsafe = _unsafe_message(path, error)
    if unsafe:
        return unsafe
    text = " ".join(str(error).split())[:300]
    if not present:
        return (
            f"Downloading the weights of {name!r} to {path} failed: {type(error).__name__}: {text}"
        )
    return (
        f"robustbench could not build {name!r} from {path} ({type(error).__name__}: {text}); "
        f"is it the file robustbench publishes for this model?"
    )


def _torch_loads_safely() -> bool:
    """Whether torch.load defaults to weights_only=True, as robustbench calls it without."""
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6) and os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (
        None,
        "",
        "0",
    )


def _check_safe(path: Path) -> None:
    """On a torch that would unpickle anything, read the file safely once before robustbench
    reads it: a file that holds only tensors runs no code when robustbench loads it."""
    if _torch_loads_safely():
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(_load_failed(path.stem, path, True, e)) from e


# ---- the catalogue's RobustBench keys (conf/source/rb_*.yaml, targets=robustbench) --------------
def check_robust_name(spec: Any) -> None:
    """Before anything runs: robustbench importable, and `spec.robustbench` one of its ImageNet
    L-inf models kept as one weight file."""
    _, zoo = _robustbench()
    _entry(zoo, str(spec.robustbench))


def robust_weights(spec: Any) -> WeightFile:
    """The weight file of a RobustBench key: `<model_dir>/imagenet/Linf/<name>.pt` when there
    (hashed now); otherwise robustbench downloads it when the target is built, or, with Google
    Drive unreachable, one line naming the file to fetch and where to put it."""
    name = str(spec.robustbench)
    path = checkpoint_path(name, spec.model_dir)
    if path.is_file():
        return WeightFile("checkpoint", str(path.resolve()), sha256_file(path))
    _, zoo = _robustbench()
    entry = _entry(zoo, name)
    if not _drive_reachable():
        raise UserError(_missing_message(name, path, entry, "Google Drive cannot be reached"))
    return WeightFile("robustbench", str(path))
