"""Per-architecture facts for gradient-regularizing attacks, as data.

For every supported family: which blocks have attention, and in each block which tensor of which
module a component (`attn`, `qkv`, `mlp`) regularizes, where that tensor sits relative to the
module (its output, its input, or the input of the softmax whose output the module receives),
and how positions and channels are laid out in it (the rule). tgr.md sections 3 and 4 are the
source of every row. A new family (Swin, EVA, BEiT) is one more `Family` entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from tgr_bench.errors import UserError

# Where the regularized tensor Z is, relative to the module at `Site.path`.
OUTPUT = "output"  # Z = module(x)
INPUT = "input"  # Z = the module's input (gradient edited only on the path into this module)
SOFTMAX_INPUT = "softmax_input"  # the module receives softmax(Z); Z = pre-softmax scores

# How the gradient G of Z is laid out, and over which positions extremes are taken.
ROWCOL = "rowcol"  # (B, heads, N, N): per head, k max/min entries; zero their rows and columns
TOKENS = "tokens"  # (B, N, C): per channel, k max/min tokens; zero those elements
SPATIAL = "spatial"  # (B, C, H, W): per channel, k max/min positions (h, w); zero those elements
HEADS_PER_KEY = "heads_per_key"  # (B, heads, 1, N): per key n, k max/min heads (CaiT official)
KEYS = "keys"  # (B, heads, 1, N): per head, k max/min keys; zero those entries (CaiT clean)


@dataclass(frozen=True)
class Site:
    component: str  # attn | qkv | mlp
    path: str  # module path inside a block
    where: str  # OUTPUT | INPUT | SOFTMAX_INPUT
    rule: str  # ROWCOL | TOKENS | SPATIAL | HEADS_PER_KEY | KEYS
    # With a single position (CaiT class-attention MLP, one token) the official rule zeroes the
    # whole branch for any k; everywhere else k beyond the positions is an input error.
    clamp_k: bool = False


@dataclass(frozen=True)
class BlockGroup:
    path: str  # container of blocks; '*' matches every child ("transformers.*.blocks")
    sites: tuple[Site, ...]
    variants: tuple[str, ...] = ("official", "clean")
    indices: tuple[int, ...] | None = None  # only these block indices (None: all)
    needs: str | None = None  # skip blocks where this attribute is None (Visformer w/o attention)


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]  # timm model class names (subclasses match too)
    groups: tuple[BlockGroup, ...]


VIT_SITES = (
    Site("attn", "attn.attn_drop", SOFTMAX_INPUT, ROWCOL),
    Site("qkv", "attn.qkv", OUTPUT, TOKENS),
    Site("mlp", "mlp", OUTPUT, TOKENS),
)
# Talking-heads attention: the map that multiplies v, after softmax and after proj_w.
CAIT_SITES = (
    Site("attn", "attn.attn_drop", OUTPUT, ROWCOL),
    Site("qkv", "attn.qkv", OUTPUT, TOKENS),
    Site("mlp", "mlp", OUTPUT, TOKENS),
)
# The released code: only blocks_token_only[1]; extremes over heads per key; q untouched (its
# hook edited only the bias gradient); k and v like qkv; the one-token MLP branch zeroed.
CAIT_CLASS_OFFICIAL = (
    Site("attn", "attn.attn_drop", SOFTMAX_INPUT, HEADS_PER_KEY),
    Site("qkv", "attn.k", OUTPUT, TOKENS),
    Site("qkv", "attn.v", OUTPUT, TOKENS),
    Site("mlp", "mlp", OUTPUT, TOKENS, clamp_k=True),
)
CAIT_CLASS_CLEAN = (
    Site("attn", "attn.attn_drop", SOFTMAX_INPUT, KEYS),
    Site("qkv", "attn.k", OUTPUT, TOKENS),
    Site("qkv", "attn.v", OUTPUT, TOKENS),
)
# Bias-free 1x1 convs: the legacy hook edited their *input* gradient.
VISFORMER_SITES = (
    Site("attn", "attn.attn_drop", SOFTMAX_INPUT, ROWCOL),
    Site("qkv", "attn.qkv", INPUT, SPATIAL),
    Site("mlp", "mlp.conv3", INPUT, SPATIAL),
)

FAMILIES: tuple[Family, ...] = (
    Family("vit", ("VisionTransformer",), (BlockGroup("blocks", VIT_SITES),)),
    Family("pit", ("PoolingVisionTransformer",), (BlockGroup("transformers.*.blocks", VIT_SITES),)),
    Family(
        "cait",
        ("Cait",),
        (
            BlockGroup("blocks", CAIT_SITES),
            BlockGroup("blocks_token_only", CAIT_CLASS_OFFICIAL, ("official",), indices=(1,)),
            BlockGroup("blocks_token_only", CAIT_CLASS_CLEAN, ("clean",)),
        ),
    ),
    Family(
        "visformer",
        ("Visformer",),
        (
            BlockGroup("stage2", VISFORMER_SITES, needs="attn"),
            BlockGroup("stage3", VISFORMER_SITES, needs="attn"),
        ),
    ),
)
COMPONENTS = ("attn", "qkv", "mlp")
VARIANTS = ("official", "clean")


def family_of(net: nn.Module) -> Family:
    names = {cls.__name__ for cls in type(net).__mro__}
    for family in FAMILIES:
        if names & set(family.classes):
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.classes)})" for f in FAMILIES)
    raise UserError(
        f"TGR does not support the source architecture {type(net).__name__}: supported families "
        f"are {supported}. Use one of the ViT sources (vit_base, deit_b, pit_b, cait_s24, "
        f"visformer_s) or add a Family entry in tgr_bench/architectures.py."
    )


def _containers(root: nn.Module, path: str) -> Iterator[nn.Module]:
    head, _, rest = path.partition(".")
    children = list(root.children()) if head == "*" else [getattr(root, head, None)]
    for child in children:
        if child is None:
            continue
        if rest:
            yield from _containers(child, rest)
        else:
            yield child


@dataclass(frozen=True)
class BoundSite:
    site: Site
    module: nn.Module
    name: str  # e.g. blocks.3.attn.qkv, for messages


def bind_sites(net: nn.Module, family: Family, variant: str) -> list[BoundSite]:
    """Every (site, module) of `family` in `net` for `variant`; missing modules are errors."""
    bound = []
    for group in family.groups:
        if variant not in group.variants:
            continue
        for container in _containers(net, group.path):
            for i, block in enumerate(container.children()):
                if group.indices is not None and i not in group.indices:
                    continue
                if group.needs and getattr(block, group.needs, None) is None:
                    continue
                for site in group.sites:
                    module = block
                    for part in site.path.split("."):
                        module = getattr(module, part, None)
                        if module is None:
                            raise UserError(
                                f"{type(net).__name__} block {group.path}[{i}] has no "
                                f"{site.path}: this timm version's {family.name} layout differs "
                                f"from tgr_bench/architectures.py."
                            )
                    bound.append(BoundSite(site, module, f"{group.path}.{i}.{site.path}"))
    return bound
