"""Which modules of a source are its "blocks" for the variance analysis, per family, as data.

A block is a unit of the source's main stream whose output has more than one position (tokens
of a (B,N,C) stream, or H*W positions of a (B,C,H,W) map), in forward order. The table is keyed
by the family names of tgr_bench/attacks/architectures.py, whose `family_of`/`source_family`
tell a source's family; the blocks here are the attacked units there, seen from outside:
CaiT's one-token class-attention blocks have no positions to vary over and are left out, and
Visformer's attention-free stage1 is a block here although TGR has no site in it.
"""

from __future__ import annotations

from torch import nn

from tgr_bench.attacks.architectures import FAMILIES, containers, family_of
from tgr_bench.errors import UserError

# family name -> containers whose children are the blocks; '*' matches every child.
BLOCKS: dict[str, tuple[str, ...]] = {
    "vit": ("blocks",),  # ViT and DeiT
    "pit": ("transformers.*.blocks",),  # the stages' blocks, flattened
    "cait": ("blocks",),  # blocks_token_only (one query token) left out
    "visformer": ("stage1", "stage2", "stage3"),
    "resnet": ("layer1", "layer2", "layer3", "layer4"),  # timm ResNet residual units
    "resnetv2": ("stages.*.blocks",),  # timm ResNetV2 pre-activation units
    "tf_resnet_v2": ("blocks.*",),  # TF-slim ResNet-v2 units
}


def supported() -> str:
    """The families that have a block table, as messages show them."""
    return ", ".join(f.shown() for f in FAMILIES if f.name in BLOCKS)


def refuse(what: str) -> UserError:
    return UserError(
        f"No block table for {what}: supported families are "
        f"{supported()}. Choose a source of those families or add an entry to BLOCKS in "
        f"tgr_bench/variance/blocks.py."
    )


def source_blocks(net: nn.Module, family: str | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every block of `net` (a timm or TF-slim network, or a PixelModel
    around one), in forward order, e.g. ("blocks.3", <Block>). `family` defaults to the
    network's own (architectures.family_of); a family without a table is a UserError."""
    net = getattr(net, "net", net)
    if family is None:
        try:
            family = family_of(net).name
        except UserError:
            raise refuse(f"the source architecture {type(net).__name__}") from None
    if family not in BLOCKS:
        raise refuse(f"the {family} family")
    found = [
        (f"{where}.{i}", block)
        for path in BLOCKS[family]
        for where, container in containers(net, path, strict=True)
        for i, block in enumerate(container.children())
    ]
    if not found:
        raise UserError(f"{type(net).__name__} has no blocks under {list(BLOCKS[family])}.")
    return found
