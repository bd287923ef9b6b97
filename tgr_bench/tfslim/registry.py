"""Which network each converted weight file needs, and mapping a file's arrays onto it.

Ten files, as the TGR paper (Zhang et al., CVPR 2023) used them for its CNN and defended
targets. `released_name` is the name the paper's code (`jpzhang1810/TGR`) loads and the
converter's repository (`ylhz/tf_to_pytorch_model`, release v1.0) links today; `public_name` is
the `tf_*` name that repository linked before it renamed its files to `tf2torch_*`. Only the
content identifies a file (`is_tf2torch_file`, `key_for_weights`), never its name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from tgr_bench.errors import UserError
from tgr_bench.hashing import sha256_file
from tgr_bench.tfslim.inception import (
    INCEPTION_SPECS,
    InceptionResNetV2,
    InceptionV3,
    InceptionV4,
)
from tgr_bench.tfslim.layers import TF_NAME, LayerSpec, module_spec
from tgr_bench.tfslim.resnet_v2 import RESNET_V2_UNITS, ResNetV2
from tgr_bench.tfslim.weights import FORMAT, LayerArrays, read_weights, write_safetensors


class TFSlimFile(NamedTuple):
    architecture: str  # a key of ARCHITECTURES
    prefix: str  # top TF scope of every layer name in the file
    released_name: str  # as the TGR code loads it (tf2torch_*.npy)
    public_name: str  # as the converter's repository first linked it (tf_*.npy)


FILES: dict[str, TFSlimFile] = {
    "inc_v3": TFSlimFile(
        "inception_v3", "InceptionV3", "tf2torch_inception_v3.npy", "tf_inception_v3.npy"
    ),
    "inc_v4": TFSlimFile(
        "inception_v4", "InceptionV4", "tf2torch_inception_v4.npy", "tf_inception_v4.npy"
    ),
    "incres_v2": TFSlimFile(
        "inception_resnet_v2", "InceptionResnetV2", "tf2torch_inc_res_v2.npy", "tf_inc_res_v2.npy"
    ),
    "res_v2_50": TFSlimFile(
        "resnet_v2_50", "resnet_v2_50", "tf2torch_resnet_v2_50.npy", "tf_resnet_v2_50.npy"
    ),
    "res_v2_101": TFSlimFile(
        "resnet_v2_101", "resnet_v2_101", "tf2torch_resnet_v2_101.npy", "tf_resnet_v2_101.npy"
    ),
    "res_v2_152": TFSlimFile(
        "resnet_v2_152", "resnet_v2_152", "tf2torch_resnet_v2_152.npy", "tf_resnet_v2_152.npy"
    ),
    "inc_v3_ens3": TFSlimFile(
        "inception_v3",
        "Ens3AdvInceptionV3",
        "tf2torch_ens3_adv_inc_v3.npy",
        "tf_ens3_adv_inc_v3.npy",
    ),
    "inc_v3_ens4": TFSlimFile(
        "inception_v3",
        "Ens4AdvInceptionV3",
        "tf2torch_ens4_adv_inc_v3.npy",
        "tf_ens4_adv_inc_v3.npy",
    ),
    "incres_v2_ens": TFSlimFile(
        "inception_resnet_v2",
        "EnsAdvInceptionResnetV2",
        "tf2torch_ens_adv_inc_res_v2.npy",
        "tf_ens_adv_inc_res_v2.npy",
    ),
    "inc_v3_adv": TFSlimFile(
        "inception_v3", "AdvInceptionV3", "tf2torch_adv_inception_v3.npy", "tf_adv_inception_v3.npy"
    ),
}

# architecture -> network constructor taking the file's prefix
ARCHITECTURES: dict[str, Callable[[str], nn.Module]] = {
    "inception_v3": InceptionV3,
    "inception_v4": InceptionV4,
    "inception_resnet_v2": InceptionResNetV2,
    **{
        f"resnet_v2_{d}": (lambda prefix, u=u: ResNetV2(u, prefix))
        for d, u in RESNET_V2_UNITS.items()
    },
}

_SHOW = 5  # names listed per kind of mismatch in an error message


def _file(key: str) -> TFSlimFile:
    if key not in FILES:
        raise UserError(f"Unknown TF-slim model key {key!r}; known keys: {', '.join(FILES)}.")
    return FILES[key]


def create_network(key: str, device: str | torch.device = "meta") -> nn.Module:
    """The network for `key` WITHOUT weights (on the meta device by default: no memory)."""
    f = _file(key)
    with torch.device(device):
        return ARCHITECTURES[f.architecture](f.prefix)


def _tagged(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(getattr(m, TF_NAME), m) for m in net.modules() if hasattr(m, TF_NAME)]


def expected_layers(key: str) -> dict[str, LayerSpec]:
    """The layers the network takes from the file, by full TF name, in module order."""
    return {name: module_spec(m) for name, m in _tagged(create_network(key))}


def skipped_layers(key: str) -> dict[str, LayerSpec]:
    """Layers a file may hold that the network never uses (the Inception aux classifiers)."""
    f = _file(key)
    spec = INCEPTION_SPECS.get(f.architecture)
    if spec is None:
        return {}
    return {f"{f.prefix}/{name}": s for name, s in spec.aux_layers.items()}


def layer_names(key: str, include_skipped: bool = True) -> list[str]:
    """Every TF layer name of the file for `key` (its prefix substituted)."""
    names = list(expected_layers(key))
    return names + list(skipped_layers(key)) if include_skipped else names


def key_for_weights(weights: LayerArrays) -> str | None:
    """The model key whose prefix all layer names of `weights` share, if exactly one does."""
    prefixes = {name.split("/", 1)[0] for name in weights}
    if len(prefixes) != 1:
        return None
    (prefix,) = prefixes
    keys = [k for k, f in FILES.items() if f.prefix == prefix]
    return keys[0] if len(keys) == 1 else None


def _match(key: str, weights: LayerArrays) -> tuple[dict[str, LayerSpec], dict[str, LayerSpec]]:
    """(network layers, skipped layers present in the file); UserError on any mismatch."""
    expected = expected_layers(key)
    skipped = {n: s for n, s in skipped_layers(key).items() if n in weights}
    missing: list[str] = []
    unexpected: list[str] = []
    misshaped: list[str] = []
    for name, spec in {**expected, **skipped}.items():
        arrays = weights.get(name)
        if arrays is None:
            missing.append(name)
            continue
        missing += [f"{name}:{p}" for p in spec.required if p not in arrays]
        for p, arr in arrays.items():
            shape = spec.required.get(p, spec.optional.get(p))
            if shape is None:
                unexpected.append(f"{name}:{p}")
            elif tuple(arr.shape) != shape:
                misshaped.append(f"{name}:{p} (file {tuple(arr.shape)}, network {shape})")
    unexpected += [n for n in weights if n not in expected and n not in skipped]
    if missing or unexpected or misshaped:
        f = FILES[key]
        parts = []
        for what, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ):
            if items:
                shown = "; ".join(items[:_SHOW]) + ("; ..." if len(items) > _SHOW else "")
                parts.append(f"{len(items)} {what} ({shown})")
        other = key_for_weights(weights)
        hint = (
            f" Its layer names are those of key {other!r}; use that key."
            if other and other != key
            else ""
        )
        raise UserError(
            f"The weight file does not fit the {f.architecture} network of key {key!r} "
            f"(layer prefix {f.prefix!r}): {', '.join(parts)}.{hint} Pass the converted file "
            f"of this model ({f.released_name}, also published as {f.public_name}), or the "
            "key that matches the file."
        )
    return expected, skipped


def consumed_report(key: str, weights: LayerArrays) -> dict[str, Any]:
    """How much of the file the network reads: arrays and values, read vs held, and what is
    skipped by name (aux classifiers). Raises UserError if the file does not fit."""
    expected, skipped = _match(key, weights)

    def count(names: Any) -> tuple[int, int]:
        arrays = [a for n in names for a in weights[n].values()]
        return len(arrays), int(sum(a.size for a in arrays))

    read_a, read_v = count(expected)
    file_a, file_v = count(weights)
    skip_a, skip_v = count(skipped)
    return {
        "key": key,
        "architecture": FILES[key].architecture,
        "layers_read": len(expected),
        "arrays_read": read_a,
        "values_read": read_v,
        "layers_in_file": len(weights),
        "arrays_in_file": file_a,
        "values_in_file": file_v,
        "skipped_layers": sorted(skipped),
        "arrays_skipped": skip_a,
        "values_skipped": skip_v,
    }


def _tensor(arr: np.ndarray) -> torch.Tensor:
    # Arrays from safetensors or the unpickler may be read-only, which torch warns about.
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def build_network(key: str, weights: LayerArrays) -> nn.Module:
    """The network for `key` with every array of `weights` in place, in eval mode.

    A file with missing, unexpected or mis-shaped layers raises UserError naming them; the
    aux classifier layers are skipped by name (see `skipped_layers`).
    """
    _match(key, weights)
    net = create_network(key, "meta").to_empty(device="cpu")
    filled: set[int] = set()
    with torch.no_grad():
        for name, m in _tagged(net):
            arrays = weights[name]
            targets: dict[str, torch.Tensor | None]
            if isinstance(m, nn.BatchNorm2d):
                targets = {
                    "mean": m.running_mean,
                    "var": m.running_var,
                    "scale": m.weight,
                    "bias": m.bias,
                }
                m.weight.fill_(1.0)  # TF-slim without gamma (scale=False) multiplies by 1
                m.bias.zero_()  # and without beta adds 0
                m.num_batches_tracked.zero_()
                filled.update(id(t) for t in (m.weight, m.bias, m.num_batches_tracked))
            else:
                targets = {"weights": m.weight, "bias": m.bias}
            for p, arr in arrays.items():
                t = targets[p]
                assert t is not None  # _match checked the params against module_spec
                t.copy_(_tensor(arr))
                filled.add(id(t))
    unset = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if id(t) not in filled]
    if unset:  # a network built with an untagged layer: a bug here, not in the file
        raise RuntimeError(f"tfslim: no file array for {unset[:_SHOW]}")
    return net.eval()


def load_network(key: str, path: str | Path) -> nn.Module:
    """`build_network(key, read_weights(path))`."""
    return build_network(key, read_weights(path))


def convert(src_npy: str | Path, dst_safetensors: str | Path) -> dict[str, str]:
    """Rewrites a tf2torch .npy as safetensors so later runs load no pickle; returns metadata.

    The metadata records format=tf2torch, the model key and architecture when the layer
    names identify them, and the source file's name and sha256.
    """
    src = Path(src_npy)
    weights = read_weights(src)
    key = key_for_weights(weights)
    meta = {
        "source_file": src.name,
        "source_sha256": sha256_file(src),
        "key": key or "",
        "architecture": FILES[key].architecture if key else "",
    }
    write_safetensors(dst_safetensors, weights, meta)
    return {**meta, "format": FORMAT}
