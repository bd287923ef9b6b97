"""Inception-v3, Inception-v4 and Inception-ResNet-v2 as in TF-slim, built from data tables.

One module class (`InceptionNet`) runs all three; a table (`InceptionSpec`) lists each
network's layers with their TF scope names, widths, kernels, strides and paddings, following
TF-slim's `inception_v3.py`, `inception_v4.py` and `inception_resnet_v2.py`.

Module tree (what forward hooks see)::

    net.features      nn.ModuleDict, in forward order, keyed by TF scope
                      ("Conv2d_1a_3x3", "MaxPool_3a_3x3", "Mixed_5b", ..., "block35_1", ...)
        ConvBNReLU    .conv (nn.Conv2d), .bn (nn.BatchNorm2d); ReLU is functional
        Mixed         .branches[i] = nn.Sequential of ConvBNReLU / pools / Fork
        ResidualMixed .branches, .up (the block's Conv2d_1x1), .scale, .activate
    net.logits        nn.Conv2d 1x1 (Inception-v3) or nn.Linear (v4, Inception-ResNet-v2),
                      applied to the global average of the last feature map

The auxiliary classifier (`AuxLogits`) is not built: its arrays are listed in `aux_layers` so
the loader can skip them by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tgr_bench.tfslim.layers import (
    INCEPTION_BN_EPS,
    ConvBNReLU,
    Fork,
    LayerSpec,
    Mixed,
    ResidualMixed,
    bn_spec,
    conv_spec,
    dense_spec,
    make_pool,
    tag,
)

NUM_CLASSES = 1001  # TF-slim's ImageNet heads: index 0 is "background"


@dataclass(frozen=True)
class Conv:
    """A ConvBNReLU; `name` is its TF scope inside the block/branch, e.g. 'Conv2d_0b_3x3'."""

    name: str
    out: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: str = "SAME"


@dataclass(frozen=True)
class Pool:
    """A max or average pool (no arrays); `name` only documents the TF scope."""

    name: str
    kind: str  # "max" or "avg"
    kernel: int = 3
    stride: int = 1
    padding: str = "SAME"


@dataclass(frozen=True)
class Split:
    """Convs run side by side on the branch's current tensor, outputs concatenated."""

    convs: tuple[Conv, ...]


Op = Conv | Pool | Split


@dataclass(frozen=True)
class Block:
    """A Mixed block (branches concatenated) or, with `scale`, an Inception-ResNet block."""

    name: str  # key in net.features, e.g. "Mixed_5b", "block35_3"
    scope: str  # TF scope below the body scope, e.g. "Mixed_5b", "Repeat/block35_3"
    branches: tuple[tuple[Op, ...], ...]
    scale: float | None = None  # residual scale; None: plain concatenation
    activate: bool = True  # ReLU after the residual sum


@dataclass(frozen=True)
class InceptionSpec:
    """A whole network: the ops in forward order, the classifier, and the skipped aux head."""

    name: str
    features: tuple[Conv | Pool | Block, ...]
    head: str  # "conv": Logits/Conv2d_1c_1x1 (1x1 conv); "dense": Logits/Logits (MatMul)
    # Aux classifier layers the files hold but the network never uses, by TF name below the
    # prefix.
    aux_layers: dict[str, LayerSpec] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Tables. Branch order is the TF concat order; names are TF-slim's, quirks included (e.g.
# Inception-v3's Mixed_6a/Branch_0/Conv2d_1a_1x1 is a 3x3 stride-2 conv, Mixed_5c names its
# 5x5 conv Conv_1_0c_5x5).


def _avg_proj(width: int, conv_name: str = "Conv2d_0b_1x1") -> tuple[Op, ...]:
    return (Pool("AvgPool_0a_3x3", "avg"), Conv(conv_name, width, 1))


def _max_reduce() -> tuple[Op, ...]:
    return (Pool("MaxPool_1a_3x3", "max", 3, 2, "VALID"),)


def _v3_mixed_5(name: str, pool_width: int, b1_names: tuple[str, str]) -> Block:
    return Block(
        name,
        name,
        (
            (Conv("Conv2d_0a_1x1", 64, 1),),
            (Conv(b1_names[0], 48, 1), Conv(b1_names[1], 64, 5)),
            (
                Conv("Conv2d_0a_1x1", 64, 1),
                Conv("Conv2d_0b_3x3", 96, 3),
                Conv("Conv2d_0c_3x3", 96, 3),
            ),
            _avg_proj(pool_width),
        ),
    )


def _v3_mixed_6(name: str, c: int) -> Block:
    return Block(
        name,
        name,
        (
            (Conv("Conv2d_0a_1x1", 192, 1),),
            (
                Conv("Conv2d_0a_1x1", c, 1),
                Conv("Conv2d_0b_1x7", c, (1, 7)),
                Conv("Conv2d_0c_7x1", 192, (7, 1)),
            ),
            (
                Conv("Conv2d_0a_1x1", c, 1),
                Conv("Conv2d_0b_7x1", c, (7, 1)),
                Conv("Conv2d_0c_1x7", c, (1, 7)),
                Conv("Conv2d_0d_7x1", c, (7, 1)),
                Conv("Conv2d_0e_1x7", 192, (1, 7)),
            ),
            _avg_proj(192),
        ),
    )


def _v3_mixed_7(name: str, b1_second: str) -> Block:
    return Block(
        name,
        name,
        (
            (Conv("Conv2d_0a_1x1", 320, 1),),
            (
                Conv("Conv2d_0a_1x1", 384, 1),
                Split((Conv("Conv2d_0b_1x3", 384, (1, 3)), Conv(b1_second, 384, (3, 1)))),
            ),
            (
                Conv("Conv2d_0a_1x1", 448, 1),
                Conv("Conv2d_0b_3x3", 384, 3),
                Split((Conv("Conv2d_0c_1x3", 384, (1, 3)), Conv("Conv2d_0d_3x1", 384, (3, 1)))),
            ),
            _avg_proj(192),
        ),
    )


def _stem_v3() -> tuple[Conv | Pool, ...]:
    """The stem Inception-v3 and Inception-ResNet-v2 share, up to MaxPool_5a_3x3."""
    return (
        Conv("Conv2d_1a_3x3", 32, 3, 2, "VALID"),
        Conv("Conv2d_2a_3x3", 32, 3, 1, "VALID"),
        Conv("Conv2d_2b_3x3", 64, 3),
        Pool("MaxPool_3a_3x3", "max", 3, 2, "VALID"),
        Conv("Conv2d_3b_1x1", 80, 1, 1, "VALID"),
        Conv("Conv2d_4a_3x3", 192, 3, 1, "VALID"),
        Pool("MaxPool_5a_3x3", "max", 3, 2, "VALID"),
    )


def _aux(
    conv1_in: int, conv2_name: str, logits_name: str, logits_kind: str
) -> dict[str, LayerSpec]:
    """The AuxLogits head's arrays: conv 1x1 -> BN, conv 5x5 -> BN, classifier."""
    layers = {
        "AuxLogits/Conv2d_1b_1x1/Conv2D": conv_spec(128, conv1_in, 1, 1, bias=False),
        "AuxLogits/Conv2d_1b_1x1/BatchNorm/FusedBatchNorm": bn_spec(128),
        f"AuxLogits/{conv2_name}/Conv2D": conv_spec(768, 128, 5, 5, bias=False),
        f"AuxLogits/{conv2_name}/BatchNorm/FusedBatchNorm": bn_spec(768),
    }
    if logits_kind == "conv":
        layers[f"AuxLogits/{logits_name}/Conv2D"] = conv_spec(NUM_CLASSES, 768, 1, 1, bias=True)
    else:
        layers[f"AuxLogits/{logits_name}/MatMul"] = dense_spec(NUM_CLASSES, 768)
    return layers


INCEPTION_V3 = InceptionSpec(
    name="inception_v3",
    features=(
        *_stem_v3(),
        _v3_mixed_5("Mixed_5b", 32, ("Conv2d_0a_1x1", "Conv2d_0b_5x5")),
        _v3_mixed_5("Mixed_5c", 64, ("Conv2d_0b_1x1", "Conv_1_0c_5x5")),
        _v3_mixed_5("Mixed_5d", 64, ("Conv2d_0a_1x1", "Conv2d_0b_5x5")),
        Block(
            "Mixed_6a",
            "Mixed_6a",
            (
                (Conv("Conv2d_1a_1x1", 384, 3, 2, "VALID"),),
                (
                    Conv("Conv2d_0a_1x1", 64, 1),
                    Conv("Conv2d_0b_3x3", 96, 3),
                    Conv("Conv2d_1a_1x1", 96, 3, 2, "VALID"),
                ),
                _max_reduce(),
            ),
        ),
        _v3_mixed_6("Mixed_6b", 128),
        _v3_mixed_6("Mixed_6c", 160),
        _v3_mixed_6("Mixed_6d", 160),
        _v3_mixed_6("Mixed_6e", 192),
        Block(
            "Mixed_7a",
            "Mixed_7a",
            (
                (Conv("Conv2d_0a_1x1", 192, 1), Conv("Conv2d_1a_3x3", 320, 3, 2, "VALID")),
                (
                    Conv("Conv2d_0a_1x1", 192, 1),
                    Conv("Conv2d_0b_1x7", 192, (1, 7)),
                    Conv("Conv2d_0c_7x1", 192, (7, 1)),
                    Conv("Conv2d_1a_3x3", 192, 3, 2, "VALID"),
                ),
                _max_reduce(),
            ),
        ),
        _v3_mixed_7("Mixed_7b", "Conv2d_0b_3x1"),
        _v3_mixed_7("Mixed_7c", "Conv2d_0c_3x1"),
    ),
    head="conv",
    aux_layers=_aux(768, "Conv2d_2a_5x5", "Conv2d_2b_1x1", "conv"),
)


def _v4_a(name: str) -> Block:
    return Block(
        name,
        name,
        (
            (Conv("Conv2d_0a_1x1", 96, 1),),
            (Conv("Conv2d_0a_1x1", 64, 1), Conv("Conv2d_0b_3x3", 96, 3)),
            (
                Conv("Conv2d_0a_1x1", 64, 1),
                Conv("Conv2d_0b_3x3", 96, 3),
                Conv("Conv2d_0c_3x3", 96, 3),
            ),
            _avg_proj(96),
        ),
    )


def _v4_b(name: str) -> Block:
    return Block(
        name,
        name,
        (
            (Conv("Conv2d_0a_1x1", 384, 1),),
            (
                Conv("Conv2d_0a_1x1", 192, 1),
                Conv("Conv2d_0b_1x7", 224, (1, 7)),
                Conv("Conv2d_0c_7x1", 256, (7, 1)),
            ),
            (
                Conv("Conv2d_0a_1x1", 192, 1),
                Conv("Conv2d_0b_7x1", 192, (7, 1)),
                Conv("Conv2d_0c_1x7", 224, (1, 7)),
                Conv("Conv2d_0d_7x1", 224, (7, 1)),
                Conv("Conv2d_0e_1x7", 256, (1, 7)),
            ),
            _avg_proj(128),
        ),
    )


def _v4_c(name: str) -> Block:
    return Block(
        name,
        name,
        (
            (Conv("Conv2d_0a_1x1", 256, 1),),
            (
                Conv("Conv2d_0a_1x1", 384, 1),
                Split((Conv("Conv2d_0b_1x3", 256, (1, 3)), Conv("Conv2d_0c_3x1", 256, (3, 1)))),
            ),
            (
                Conv("Conv2d_0a_1x1", 384, 1),
                Conv("Conv2d_0b_3x1", 448, (3, 1)),
                Conv("Conv2d_0c_1x3", 512, (1, 3)),
                Split((Conv("Conv2d_0d_1x3", 256, (1, 3)), Conv("Conv2d_0e_3x1", 256, (3, 1)))),
            ),
            _avg_proj(256),
        ),
    )


INCEPTION_V4 = InceptionSpec(
    name="inception_v4",
    features=(
        Conv("Conv2d_1a_3x3", 32, 3, 2, "VALID"),
        Conv("Conv2d_2a_3x3", 32, 3, 1, "VALID"),
        Conv("Conv2d_2b_3x3", 64, 3),
        Block(
            "Mixed_3a",
            "Mixed_3a",
            (
                (Pool("MaxPool_0a_3x3", "max", 3, 2, "VALID"),),
                (Conv("Conv2d_0a_3x3", 96, 3, 2, "VALID"),),
            ),
        ),
        Block(
            "Mixed_4a",
            "Mixed_4a",
            (
                (Conv("Conv2d_0a_1x1", 64, 1), Conv("Conv2d_1a_3x3", 96, 3, 1, "VALID")),
                (
                    Conv("Conv2d_0a_1x1", 64, 1),
                    Conv("Conv2d_0b_1x7", 64, (1, 7)),
                    Conv("Conv2d_0c_7x1", 64, (7, 1)),
                    Conv("Conv2d_1a_3x3", 96, 3, 1, "VALID"),
                ),
            ),
        ),
        Block(
            "Mixed_5a",
            "Mixed_5a",
            (
                (Conv("Conv2d_1a_3x3", 192, 3, 2, "VALID"),),
                _max_reduce(),
            ),
        ),
        *(_v4_a(f"Mixed_5{c}") for c in "bcde"),
        Block(
            "Mixed_6a",
            "Mixed_6a",
            (
                (Conv("Conv2d_1a_3x3", 384, 3, 2, "VALID"),),
                (
                    Conv("Conv2d_0a_1x1", 192, 1),
                    Conv("Conv2d_0b_3x3", 224, 3),
                    Conv("Conv2d_1a_3x3", 256, 3, 2, "VALID"),
                ),
                _max_reduce(),
            ),
        ),
        *(_v4_b(f"Mixed_6{c}") for c in "bcdefgh"),
        Block(
            "Mixed_7a",
            "Mixed_7a",
            (
                (Conv("Conv2d_0a_1x1", 192, 1), Conv("Conv2d_1a_3x3", 192, 3, 2, "VALID")),
                (
                    Conv("Conv2d_0a_1x1", 256, 1),
                    Conv("Conv2d_0b_1x7", 256, (1, 7)),
                    Conv("Conv2d_0c_7x1", 320, (7, 1)),
                    Conv("Conv2d_1a_3x3", 320, 3, 2, "VALID"),
                ),
                _max_reduce(),
            ),
        ),
        *(_v4_c(f"Mixed_7{c}") for c in "bcd"),
    ),
    head="dense",
    aux_layers=_aux(1024, "Conv2d_2a", "Aux_logits", "dense"),
)


def _block35(i: int) -> Block:
    return Block(
        f"block35_{i}",
        f"Repeat/block35_{i}",
        (
            (Conv("Conv2d_1x1", 32, 1),),
            (Conv("Conv2d_0a_1x1", 32, 1), Conv("Conv2d_0b_3x3", 32, 3)),
            (
                Conv("Conv2d_0a_1x1", 32, 1),
                Conv("Conv2d_0b_3x3", 48, 3),
                Conv("Conv2d_0c_3x3", 64, 3),
            ),
        ),
        scale=0.17,
    )


def _block17(i: int) -> Block:
    return Block(
        f"block17_{i}",
        f"Repeat_1/block17_{i}",
        (
            (Conv("Conv2d_1x1", 192, 1),),
            (
                Conv("Conv2d_0a_1x1", 128, 1),
                Conv("Conv2d_0b_1x7", 160, (1, 7)),
                Conv("Conv2d_0c_7x1", 192, (7, 1)),
            ),
        ),
        scale=0.10,
    )


def _block8(name: str, scope: str, scale: float, activate: bool) -> Block:
    return Block(
        name,
        scope,
        (
            (Conv("Conv2d_1x1", 192, 1),),
            (
                Conv("Conv2d_0a_1x1", 192, 1),
                Conv("Conv2d_0b_1x3", 224, (1, 3)),
                Conv("Conv2d_0c_3x1", 256, (3, 1)),
            ),
        ),
        scale=scale,
        activate=activate,
    )


INCEPTION_RESNET_V2 = InceptionSpec(
    name="inception_resnet_v2",
    features=(
        *_stem_v3(),
        Block(
            "Mixed_5b",
            "Mixed_5b",
            (
                (Conv("Conv2d_1x1", 96, 1),),
                (Conv("Conv2d_0a_1x1", 48, 1), Conv("Conv2d_0b_5x5", 64, 5)),
                (
                    Conv("Conv2d_0a_1x1", 64, 1),
                    Conv("Conv2d_0b_3x3", 96, 3),
                    Conv("Conv2d_0c_3x3", 96, 3),
                ),
                _avg_proj(64),
            ),
        ),
        *(_block35(i) for i in range(1, 11)),
        Block(
            "Mixed_6a",
            "Mixed_6a",
            (
                (Conv("Conv2d_1a_3x3", 384, 3, 2, "VALID"),),
                (
                    Conv("Conv2d_0a_1x1", 256, 1),
                    Conv("Conv2d_0b_3x3", 256, 3),
                    Conv("Conv2d_1a_3x3", 384, 3, 2, "VALID"),
                ),
                _max_reduce(),
            ),
        ),
        *(_block17(i) for i in range(1, 21)),
        Block(
            "Mixed_7a",
            "Mixed_7a",
            (
                (Conv("Conv2d_0a_1x1", 256, 1), Conv("Conv2d_1a_3x3", 384, 3, 2, "VALID")),
                (Conv("Conv2d_0a_1x1", 256, 1), Conv("Conv2d_1a_3x3", 288, 3, 2, "VALID")),
                (
                    Conv("Conv2d_0a_1x1", 256, 1),
                    Conv("Conv2d_0b_3x3", 288, 3),
                    Conv("Conv2d_1a_3x3", 320, 3, 2, "VALID"),
                ),
                _max_reduce(),
            ),
        ),
        *(_block8(f"block8_{i}", f"Repeat_2/block8_{i}", 0.20, True) for i in range(1, 10)),
        # TF-slim's last block8 is outside the Repeat scope, unscaled and without ReLU.
        _block8("Block8", "Block8", 1.0, False),
        Conv("Conv2d_7b_1x1", 1536, 1),
    ),
    head="dense",
    aux_layers=_aux(1088, "Conv2d_2a_5x5", "Logits", "dense"),
)

INCEPTION_SPECS = {s.name: s for s in (INCEPTION_V3, INCEPTION_V4, INCEPTION_RESNET_V2)}


# ---------------------------------------------------------------------------------------------
# The module.


def _build_ops(ops: tuple[Op, ...], in_ch: int, scope: str) -> tuple[nn.Sequential, int]:
    """An nn.Sequential running `ops` in order, and its output width."""
    mods: list[nn.Module] = []
    ch = in_ch
    for op in ops:
        if isinstance(op, Conv):
            mods.append(
                ConvBNReLU(
                    ch,
                    op.out,
                    op.kernel,
                    op.stride,
                    op.padding,
                    f"{scope}/{op.name}",
                    INCEPTION_BN_EPS,
                )
            )
            ch = op.out
        elif isinstance(op, Pool):
            mods.append(make_pool(op.kind, op.kernel, op.stride, op.padding))
        else:
            convs = [
                ConvBNReLU(
                    ch, c.out, c.kernel, c.stride, c.padding, f"{scope}/{c.name}", INCEPTION_BN_EPS
                )
                for c in op.convs
            ]
            mods.append(Fork(convs))
            ch = sum(c.out for c in op.convs)
    return nn.Sequential(*mods), ch


class InceptionNet(nn.Module):
    """A TF-slim Inception network for 299x299 RGB input in [-1, 1]; returns (B, 1001) logits.

    `prefix` is the file's top TF scope (e.g. 'InceptionV3', 'Ens3AdvInceptionV3'): the body
    lives under '<prefix>/<prefix>/', the classifier under '<prefix>/Logits/'.
    """

    label_offset = 1  # logit 0 is TF-slim's background class
    num_classes = NUM_CLASSES

    def __init__(self, spec: InceptionSpec, prefix: str) -> None:
        super().__init__()
        self.spec_name = spec.name
        self.prefix = prefix
        body = f"{prefix}/{prefix}"
        features: dict[str, nn.Module] = {}
        ch = 3
        for item in spec.features:
            if isinstance(item, Conv):
                features[item.name] = ConvBNReLU(
                    ch,
                    item.out,
                    item.kernel,
                    item.stride,
                    item.padding,
                    f"{body}/{item.name}",
                    INCEPTION_BN_EPS,
                )
                ch = item.out
            elif isinstance(item, Pool):
                features[item.name] = make_pool(item.kind, item.kernel, item.stride, item.padding)
            else:
                branches, widths = [], []
                for i, ops in enumerate(item.branches):
                    seq, w = _build_ops(ops, ch, f"{body}/{item.scope}/Branch_{i}")
                    branches.append(seq)
                    widths.append(w)
                if item.scale is None:
                    features[item.name] = Mixed(branches)
                    ch = sum(widths)
                else:
                    up = tag(
                        nn.Conv2d(sum(widths), ch, 1, bias=True),
                        f"{body}/{item.scope}/Conv2d_1x1/Conv2D",
                    )
                    features[item.name] = ResidualMixed(branches, up, item.scale, item.activate)
        self.features = nn.ModuleDict(features)
        self.num_features = ch
        if spec.head == "conv":
            self.logits: nn.Module = tag(
                nn.Conv2d(ch, NUM_CLASSES, 1, bias=True), f"{prefix}/Logits/Conv2d_1c_1x1/Conv2D"
            )
        else:
            self.logits = tag(nn.Linear(ch, NUM_CLASSES), f"{prefix}/Logits/Logits/MatMul")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.features.values():
            x = m(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TF-slim averages the whole final map (8x8 at 299 input); dropout is off at inference.
        x = self.forward_features(x).mean((2, 3), keepdim=True)
        if isinstance(self.logits, nn.Linear):
            return self.logits(x.flatten(1))
        return self.logits(x).flatten(1)


class InceptionV3(InceptionNet):
    """Inception-v3 (TF-slim), also the adversarially trained and ensemble-adversarial ones."""

    def __init__(self, prefix: str = "InceptionV3") -> None:
        super().__init__(INCEPTION_V3, prefix)


class InceptionV4(InceptionNet):
    """Inception-v4 (TF-slim)."""

    def __init__(self, prefix: str = "InceptionV4") -> None:
        super().__init__(INCEPTION_V4, prefix)


class InceptionResNetV2(InceptionNet):
    """Inception-ResNet-v2 (TF-slim), also the ensemble-adversarially trained one."""

    def __init__(self, prefix: str = "InceptionResnetV2") -> None:
        super().__init__(INCEPTION_RESNET_V2, prefix)
