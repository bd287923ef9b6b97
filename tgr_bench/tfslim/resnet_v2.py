"""ResNet-v2-50/101/152 as in TF-slim (`resnet_v2.py`): pre-activation bottleneck units.

TF-slim puts each block's stride in its LAST unit (blocks 1-3 stride 2, block 4 stride 1), with
an identity shortcut subsampled by a 1x1 max pool of stride 2; timm's `resnetv2_*` strides in
the first unit instead, so the two do not share weights or feature-map positions.

Module tree (what forward hooks see)::

    net.conv1        nn.Conv2d 7x7 stride 2, padding 3, with bias (no BN: pre-activation)
    net.pool1        TFSamePad(-inf: 0 top/left, 1 bottom/right at 150x150) + MaxPool2d 3x3/2
    net.blocks       nn.ModuleList of 4 stages (TF block1..block4), each an nn.ModuleList of
                     BottleneckV2 units (TF unit_1..unit_n), in forward order
    net.postnorm     nn.BatchNorm2d; ReLU and the global average follow
    net.logits       nn.Conv2d 1x1 with bias -> flattened to (B, 1001)

BottleneckV2 unit attributes, in the order forward runs them::

    preact           nn.BatchNorm2d on the unit input (ReLU follows, functional)
    shortcut         nn.Conv2d 1x1 with bias on the pre-activation (first unit of a block,
                     where the width changes), or on the unit INPUT: nn.MaxPool2d(1, 2)
                     (strided unit) or nn.Identity
    conv1            nn.Conv2d 1x1, called directly on the pre-activation output
    bn1              nn.BatchNorm2d (ReLU follows)
    conv2            nn.Conv2d 3x3, stride 1 or 2, padding 1 (= TF-slim's conv2d_same)
    bn2              nn.BatchNorm2d (ReLU follows)
    conv3            nn.Conv2d 1x1 with bias: its output is the residual branch, added to the
                     shortcut with nothing in between
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench.tfslim.layers import RESNET_BN_EPS, TFSamePad, tag

NUM_CLASSES = 1001
# Units per block for each depth (TF-slim's resnet_v2_50/101/152).
RESNET_V2_UNITS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
BOTTLENECK_WIDTHS = (64, 128, 256, 512)  # output width of each unit is 4x
BLOCK_STRIDES = (2, 2, 2, 1)  # applied by the last unit of each block


def _bn(ch: int, name: str) -> nn.BatchNorm2d:
    return tag(nn.BatchNorm2d(ch, eps=RESNET_BN_EPS), name)


class BottleneckV2(nn.Module):
    """One TF-slim `bottleneck_v2` unit; see the module docstring for the attribute order."""

    def __init__(self, in_ch: int, width: int, stride: int, scope: str) -> None:
        super().__init__()
        out_ch = 4 * width
        self.stride = stride
        self.preact = _bn(in_ch, f"{scope}/preact/FusedBatchNorm")
        # TF-slim projects only when the width changes; otherwise the input itself (not the
        # pre-activation) is the shortcut, subsampled when the unit strides.
        self.projection = in_ch != out_ch
        if self.projection:
            self.shortcut: nn.Module = tag(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=True), f"{scope}/shortcut/Conv2D"
            )
        elif stride > 1:
            self.shortcut = nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = tag(nn.Conv2d(in_ch, width, 1, bias=False), f"{scope}/conv1/Conv2D")
        self.bn1 = _bn(width, f"{scope}/conv1/BatchNorm/FusedBatchNorm")
        # conv2d_same pads (k-1)//2 = 1 on every side before a VALID conv, for any stride:
        # exactly Conv2d(padding=1).
        self.conv2 = tag(nn.Conv2d(width, width, 3, stride, 1, bias=False), f"{scope}/conv2/Conv2D")
        self.bn2 = _bn(width, f"{scope}/conv2/BatchNorm/FusedBatchNorm")
        self.conv3 = tag(nn.Conv2d(width, out_ch, 1, bias=True), f"{scope}/conv3/Conv2D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.preact(x))
        shortcut = self.shortcut(pre if self.projection else x)
        r = F.relu(self.bn1(self.conv1(pre)))
        r = F.relu(self.bn2(self.conv2(r)))
        return shortcut + self.conv3(r)


class ResNetV2(nn.Module):
    """TF-slim ResNet-v2 for 299x299 RGB input in [-1, 1]; returns (B, 1001) logits.

    `units` is the number of units per block (see RESNET_V2_UNITS); `prefix` is the file's
    top TF scope, e.g. 'resnet_v2_101'.
    """

    label_offset = 1  # logit 0 is TF-slim's background class
    num_classes = NUM_CLASSES

    def __init__(
        self, units: tuple[int, ...] = RESNET_V2_UNITS[101], prefix: str = "resnet_v2_101"
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.units = tuple(units)
        self.conv1 = tag(nn.Conv2d(3, 64, 7, 2, 3, bias=True), f"{prefix}/conv1/Conv2D")
        # TF 'SAME' max pool: at 150x150 this pads 0 before and 1 after, with -inf.
        self.pool1 = nn.Sequential(TFSamePad(3, 2, value=float("-inf")), nn.MaxPool2d(3, 2))
        stages: list[nn.ModuleList] = []
        ch = 64
        for b, (n, width, stride) in enumerate(
            zip(units, BOTTLENECK_WIDTHS, BLOCK_STRIDES, strict=True), start=1
        ):
            stage = []
            for u in range(1, n + 1):
                scope = f"{prefix}/block{b}/unit_{u}/bottleneck_v2"
                stage.append(BottleneckV2(ch, width, stride if u == n else 1, scope))
                ch = 4 * width
            stages.append(nn.ModuleList(stage))
        self.blocks = nn.ModuleList(stages)
        self.num_features = ch
        self.postnorm = _bn(ch, f"{prefix}/postnorm/FusedBatchNorm")
        self.logits = tag(nn.Conv2d(ch, NUM_CLASSES, 1, bias=True), f"{prefix}/logits/Conv2D")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        for stage in self.blocks:
            for unit in stage:
                x = unit(x)
        return F.relu(self.postnorm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean((2, 3), keepdim=True)
        return self.logits(x).flatten(1)
