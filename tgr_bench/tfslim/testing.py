"""Random weight files in exactly the tf2torch layout, for tests that must not download.

The scales keep activations finite and of order one through 100+ layers: convs followed by
batch norm get He-normal weights (variance 2 / fan_in, which ReLU halves back), layers without
batch norm (residual outputs, shortcuts, classifiers) smaller ones so residual sums grow
slowly, and batch norms near-identity statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tgr_bench.tfslim.layers import LayerSpec
from tgr_bench.tfslim.registry import FILES, expected_layers, skipped_layers
from tgr_bench.tfslim.weights import LayerArrays


def _layer(spec: LayerSpec, rng: np.random.Generator, with_scale: bool) -> dict[str, np.ndarray]:
    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    if spec.kind == "bn":
        (c,) = spec.required["mean"]
        out = {
            "mean": normal((c,), 0.1),
            "var": rng.uniform(0.8, 1.25, c).astype(np.float32),
            "bias": normal((c,), 0.1),
        }
        if with_scale:
            out["scale"] = rng.uniform(0.8, 1.2, c).astype(np.float32)
        return out
    w_shape = spec.required["weights"]
    fan_in = int(np.prod(w_shape[1:]))
    has_bias = "bias" in spec.required
    # A conv with a bias has no batch norm after it (TF-slim drops the bias when one follows).
    std = np.sqrt((0.3 if has_bias else 2.0) / fan_in)
    out = {"weights": normal(w_shape, std)}
    if has_bias:
        out["bias"] = normal(spec.required["bias"], 0.05)
    return out


def random_weights(key: str, seed: int = 0) -> LayerArrays:
    """A full-size random weight dict for `key`, aux classifier layers included.

    Batch norms carry `scale` (gamma) only for ResNet-v2, as TF-slim trains gamma there but
    not in the Inception networks; all arrays are float32.
    """
    rng = np.random.default_rng(seed)
    with_scale = FILES[key].architecture.startswith("resnet")
    layers = {**expected_layers(key), **skipped_layers(key)}
    return {name: _layer(spec, rng, with_scale) for name, spec in layers.items()}


def write_npy(path: str | Path, weights: LayerArrays) -> Path:
    """Writes `weights` as the converter did: `np.save` of the dict (a pickle inside .npy)."""
    path = Path(path)
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, np.array(weights, dtype=object), allow_pickle=True)
    return path
