"""Building blocks shared by the TF-slim networks: TF's padding rules and conv/BN/ReLU units.

Every module that receives arrays from a weight file carries the TF layer name those arrays are
stored under in a plain string attribute (`TF_NAME`), so the loader can walk the module tree
instead of keeping a second, hand-maintained name table in sync with the networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The attribute naming the TF layer (scope of the `Conv2D`, `FusedBatchNorm` or `MatMul` op)
# whose arrays a Conv2d, BatchNorm2d or Linear receives.
TF_NAME = "tf_name"

# TF-slim's batch-norm epsilons (0.001 in the Inception arg scopes, 1.001e-5 in ResNet's),
# rounded to float32 as the graphs stored them, so the conversion is bit-for-bit comparable.
INCEPTION_BN_EPS = float(np.float32(1e-3))
RESNET_BN_EPS = float(np.float32(1.001e-5))


@dataclass(frozen=True)
class LayerSpec:
    """The arrays one TF layer of a weight file holds: param name -> shape.

    `optional` arrays may be absent (a batch norm without `scale` has gamma 1, without `bias`
    beta 0, exactly as the MMdnn-generated loaders treat them).
    """

    kind: str  # "conv", "bn" or "dense"
    required: dict[str, tuple[int, ...]]
    optional: dict[str, tuple[int, ...]] = field(default_factory=dict)


def conv_spec(out_ch: int, in_ch: int, kh: int, kw: int, bias: bool) -> LayerSpec:
    req = {"weights": (out_ch, in_ch, kh, kw)}
    if bias:
        req["bias"] = (out_ch,)
    return LayerSpec("conv", req)


def bn_spec(ch: int) -> LayerSpec:
    return LayerSpec("bn", {"mean": (ch,), "var": (ch,)}, {"scale": (ch,), "bias": (ch,)})


def dense_spec(out_f: int, in_f: int) -> LayerSpec:
    return LayerSpec("dense", {"weights": (out_f, in_f), "bias": (out_f,)})


def module_spec(module: nn.Module) -> LayerSpec:
    """What a tagged Conv2d / BatchNorm2d / Linear expects from the file."""
    if isinstance(module, nn.Conv2d):
        o, i, kh, kw = module.weight.shape
        return conv_spec(o, i, kh, kw, module.bias is not None)
    if isinstance(module, nn.BatchNorm2d):
        return bn_spec(module.num_features)
    if isinstance(module, nn.Linear):
        return dense_spec(module.out_features, module.in_features)
    raise TypeError(f"no weight-file layout for {type(module).__name__}")


def tag(module: nn.Module, tf_name: str) -> nn.Module:
    """Record which TF layer's arrays `module` takes; returns the module for chaining."""
    setattr(module, TF_NAME, tf_name)
    return module


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF's 'SAME' along one axis of length `size`.

    TF keeps ceil(size / stride) outputs and puts the odd pixel of the padding after the
    input (bottom/right), unlike a symmetric PyTorch `padding=`; this matters for stride 2
    on even sizes and for even kernels.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFSamePad(nn.Module):
    """Pads like TF 'SAME' for a following VALID conv or pool; the amount depends on the input.

    `value` is -inf in front of a max pool, where TF ignores the padded cells.
    """

    def __init__(
        self, kernel: int | tuple[int, int], stride: int | tuple[int, int], value: float = 0.0
    ) -> None:
        super().__init__()
        self.kernel = _pair(kernel)
        self.stride = _pair(stride)
        self.value = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=self.value)
        return x

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, value={self.value}"


def _symmetric_same(kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int] | None:
    """PyTorch `padding=` equal to TF 'SAME' for every input size, or None where none is.

    With stride 1 and odd kernels TF's padding is symmetric and independent of the input size,
    so the conv's own zero padding reproduces it exactly (and runs faster than a separate pad).
    """
    if stride == (1, 1) and kernel[0] % 2 == 1 and kernel[1] % 2 == 1:
        return kernel[0] // 2, kernel[1] // 2
    return None


class ConvBNReLU(nn.Module):
    """slim.conv2d with batch norm and ReLU: Conv2D (no bias) -> FusedBatchNorm -> Relu.

    Attributes: `pad` (a TFSamePad, only where 'SAME' is not a symmetric constant), `conv`
    (nn.Conv2d), `bn` (nn.BatchNorm2d); the ReLU is functional.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: str = "SAME",
        scope: str = "",
        eps: float = INCEPTION_BN_EPS,
    ) -> None:
        super().__init__()
        k, s = _pair(kernel), _pair(stride)
        conv_pad: tuple[int, int] = (0, 0)
        self.pad: nn.Module | None = None
        if padding == "SAME":
            sym = _symmetric_same(k, s)
            if sym is None:
                self.pad = TFSamePad(k, s)
            else:
                conv_pad = sym
        elif padding != "VALID":
            raise ValueError(f"padding must be 'SAME' or 'VALID', not {padding!r}")
        self.conv = tag(
            nn.Conv2d(in_channels, out_channels, k, s, conv_pad, bias=False), f"{scope}/Conv2D"
        )
        self.bn = tag(nn.BatchNorm2d(out_channels, eps=eps), f"{scope}/BatchNorm/FusedBatchNorm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return F.relu(self.bn(self.conv(x)))


def make_pool(kind: str, kernel: int, stride: int, padding: str) -> nn.Module:
    """slim.max_pool2d / slim.avg_pool2d with TF padding semantics.

    TF's 'SAME' average pool divides by the number of real (unpadded) cells, which is
    `count_include_pad=False`; its 'SAME' max pool never picks a padded cell (-inf padding).
    """
    k, s = _pair(kernel), _pair(stride)
    if padding == "VALID":
        return nn.MaxPool2d(k, s) if kind == "max" else nn.AvgPool2d(k, s)
    if padding != "SAME":
        raise ValueError(f"padding must be 'SAME' or 'VALID', not {padding!r}")
    sym = _symmetric_same(k, s)
    if kind == "max":
        if sym is not None:
            return nn.MaxPool2d(k, s, sym)
        return nn.Sequential(TFSamePad(k, s, value=float("-inf")), nn.MaxPool2d(k, s))
    if sym is None:
        # No network here needs it, and zero padding would make the average wrong at the edges.
        raise ValueError("a 'SAME' average pool with stride > 1 or an even kernel is unsupported")
    return nn.AvgPool2d(k, s, sym, count_include_pad=False)


class Fork(nn.Module):
    """Parallel convs on one input whose outputs are concatenated (Inception-v3/v4 'C' blocks)."""

    def __init__(self, convs: list[nn.Module]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([c(x) for c in self.convs], 1)


class Mixed(nn.Module):
    """An Inception block: branches on one input, concatenated along channels.

    `branches` holds one nn.Sequential per TF `Branch_<i>`, in TF's concat order.
    """

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


class ResidualMixed(Mixed):
    """An Inception-ResNet block: x + scale * up(concat(branches)), then ReLU unless the last.

    `up` is the block's `Conv2d_1x1` (nn.Conv2d with bias, no batch norm): its output is the
    residual before scaling.
    """

    def __init__(
        self, branches: list[nn.Module], up: nn.Conv2d, scale: float, activate: bool
    ) -> None:
        super().__init__(branches)
        self.up = up
        # The graph multiplies by a float32 constant; keep exactly that value.
        self.scale = float(np.float32(scale))
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.up(super().forward(x)) * self.scale
        return F.relu(out) if self.activate else out

    def extra_repr(self) -> str:
        return f"scale={self.scale}, activate={self.activate}"
