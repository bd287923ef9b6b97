"""Per-architecture facts for attacks that edit the source's backward pass, as data.

For every supported family, two tables of sites:
- `tgr`: which blocks have attention, and in each block which tensor of which module a TGR
  component (`attn`, `qkv`, `mlp`) regularizes, where that tensor sits relative to the module
  (its output, its input, or the input of the softmax whose output the module receives), and how
  positions and channels are laid out in it (the rule). docs/tgr.md sections 3 and 4 give
  every row. PNA uses the `attn` rows (every attention map, both CaiT class blocks).
- `branches`: the output of every residual branch (attention after proj, MLP; a ResNet unit's
  last BN), where SGM scales the gradient.
A new family (Swin, EVA, BEiT) is one more `Family` entry, not edits across hook code.
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
BRANCH = "branch"  # any layout: the whole gradient of a residual branch output


@dataclass(frozen=True)
class Site:
    component: str  # attn | qkv | mlp | branch
    path: str  # module path inside a block; "se|bn3": the first that exists and is not None
    where: str  # OUTPUT | INPUT | SOFTMAX_INPUT
    rule: str  # ROWCOL | TOKENS | SPATIAL | HEADS_PER_KEY | KEYS
    # With a single position (CaiT class-attention MLP, one token) the official rule zeroes the
    # whole branch for any k; everywhere else k beyond the positions is an input error.
    clamp_k: bool = False
    optional: bool = False  # blocks without this module are skipped (Visformer stage1 attention)


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
    tgr: tuple[BlockGroup, ...] = ()
    branches: tuple[BlockGroup, ...] = ()


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

# SGM: attention output after proj and MLP output of every block; skip connections untouched.
TRANSFORMER_BRANCHES = (
    Site("attn", "attn", OUTPUT, BRANCH, optional=True),
    Site("mlp", "mlp", OUTPUT, BRANCH),
)
# A ResNet unit's branch ends at its last BN (or its SE gate, when it has one).
RESNET_BRANCH = (Site("branch", "se|bn3|bn2", OUTPUT, BRANCH),)

FAMILIES: tuple[Family, ...] = (
    Family(
        "vit",
        ("VisionTransformer",),
        tgr=(BlockGroup("blocks", VIT_SITES),),
        branches=(BlockGroup("blocks", TRANSFORMER_BRANCHES),),
    ),
    Family(
        "pit",
        ("PoolingVisionTransformer",),
        tgr=(BlockGroup("transformers.*.blocks", VIT_SITES),),
        branches=(BlockGroup("transformers.*.blocks", TRANSFORMER_BRANCHES),),
    ),
    Family(
        "cait",
        ("Cait",),
        tgr=(
            BlockGroup("blocks", CAIT_SITES),
            BlockGroup("blocks_token_only", CAIT_CLASS_OFFICIAL, ("official",), indices=(1,)),
            BlockGroup("blocks_token_only", CAIT_CLASS_CLEAN, ("clean",)),
        ),
        branches=(
            BlockGroup("blocks", TRANSFORMER_BRANCHES),
            BlockGroup("blocks_token_only", TRANSFORMER_BRANCHES),
        ),
    ),
    Family(
        "visformer",
        ("Visformer",),
        tgr=(
            BlockGroup("stage2", VISFORMER_SITES, needs="attn"),
            BlockGroup("stage3", VISFORMER_SITES, needs="attn"),
        ),
        branches=tuple(BlockGroup(f"stage{i}", TRANSFORMER_BRANCHES) for i in (1, 2, 3)),
    ),
    Family(
        "resnet",
        ("ResNet",),
        branches=tuple(BlockGroup(f"layer{i}", RESNET_BRANCH) for i in (1, 2, 3, 4)),
    ),
)
COMPONENTS = ("attn", "qkv", "mlp")
VARIANTS = ("official", "clean")


def family_of(net: nn.Module, table: str = "tgr", attack: str = "TGR") -> Family:
    """The family of `net` that has sites in `table` ("tgr" or "branches")."""
    names = {cls.__name__ for cls in type(net).__mro__}
    usable = [f for f in FAMILIES if getattr(f, table)]
    for family in usable:
        if names & set(family.classes):
            return family
    supported = ", ".join(f"{f.name} ({'/'.join(f.classes)})" for f in usable)
    raise UserError(
        f"{attack} does not support the source architecture {type(net).__name__}: supported "
        f"families are {supported}. Choose a source of those families or add a Family entry in "
        f"tgr_bench/attacks/architectures.py."
    )


def _resolve(block: nn.Module, path: str) -> nn.Module | None:
    for alternative in path.split("|"):
        module: nn.Module | None = block
        for part in alternative.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None:
            return module
    return None


def _containers(root: nn.Module, path: str, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(concrete path, module) for a path whose parts may be '*' (every child)."""
    head, _, rest = path.partition(".")
    every = head == "*"
    children = list(root.named_children()) if every else [(head, getattr(root, head, None))]
    for name, child in children:
        if child is None:
            continue
        here = f"{prefix}{name}"
        if rest:
            yield from _containers(child, rest, here + ".")
        else:
            yield here, child


@dataclass(frozen=True)
class BoundSite:
    site: Site
    module: nn.Module
    name: str  # e.g. blocks.3.attn.qkv, for messages


def bind_sites(
    net: nn.Module, family: Family, variant: str = "official", table: str = "tgr"
) -> list[BoundSite]:
    """Every (site, module) of `family` in `net` for `variant`; missing modules are errors."""
    bound = []
    for group in getattr(family, table):
        if variant not in group.variants:
            continue
        for where, container in _containers(net, group.path):
            for i, block in enumerate(container.children()):
                if group.indices is not None and i not in group.indices:
                    continue
                if group.needs and getattr(block, group.needs, None) is None:
                    continue
                for site in group.sites:
                    module = _resolve(block, site.path)
                    if module is None and site.optional:
                        continue
                    if module is None:
                        raise UserError(
                            f"{type(net).__name__} block {where}.{i} has no {site.path}: "
                            f"this timm version's {family.name} layout differs from "
                            f"tgr_bench/attacks/architectures.py."
                        )
                    name = f"{where}.{i}.{site.path}"
                    bound.append(BoundSite(site, module, name))
    return bound
