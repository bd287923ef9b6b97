"""Per-architecture facts for attacks that edit the source's backward pass, as data.

For every supported family, two tables of sites:
- `tgr`: which blocks have attention, and in each block which tensor of which module a TGR
  component (`attn`, `qkv`, `mlp`) regularizes, where that tensor sits relative to the module
  (its output, its input, or the input of the softmax whose output the module receives), and how
  positions and channels are laid out in it (the rule). docs/tgr.md sections 3 and 4 give
  every row. PNA uses the `attn` rows (every attention map, both CaiT class blocks). Residual
  CNNs have one component, `conv`: the input of each unit's first branch conv, spatial
  positions as tokens (the paper's CNN adaptation).
- `branches`: the output of every residual branch (attention after proj, MLP; a ResNet unit's
  last BN or conv), where SGM scales the gradient; on residual CNNs not in the first unit of a
  stage, as the original SGM code.
Each family also says which timm modules and TF-slim architectures build it, so that a run can
know its source's family from the model name alone, before any network exists (`source_family`),
and what `attack.variant=auto` means on it.
A new family (Swin, EVA, BEiT) is one more `Family` entry, not edits across hook code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import timm.models
from torch import nn

from tgr_bench.errors import UserError
from tgr_bench.tfslim.registry import FILES as TFSLIM_FILES

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
SCALE = "scale"  # any layout: gamma * G, nothing zeroed (the released CNN code, attack.zero=false)

# TGR components: the transformer ones (docs/tgr.md section 3) and the residual CNNs' one.
COMPONENTS = ("attn", "qkv", "mlp", "conv")


@dataclass(frozen=True)
class Site:
    component: str  # attn | qkv | mlp | conv (TGR); attn | mlp | branch (SGM)
    path: str  # module path inside a block; "se|bn3": the first that exists and is not None
    where: str  # OUTPUT | INPUT | SOFTMAX_INPUT
    rule: str  # ROWCOL | TOKENS | SPATIAL | HEADS_PER_KEY | KEYS | SCALE | BRANCH
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
    skip: tuple[int, ...] = ()  # block indices left out (SGM: each residual stage's first unit)
    needs: str | None = None  # skip blocks where this attribute is None (Visformer w/o attention)


@dataclass(frozen=True)
class Family:
    name: str
    # Model class names (subclasses match too); "module.Class" where a short name is ambiguous
    # (timm's and TF-slim's ResNetV2 share theirs).
    classes: tuple[str, ...]
    tgr: tuple[BlockGroup, ...] = ()
    branches: tuple[BlockGroup, ...] = ()
    # timm modules every registered model of which is of this family, and TF-slim architectures
    # (tgr_bench.tfslim.registry): how `source_family` knows the family from a model name.
    timm_modules: tuple[str, ...] = ()
    tfslim: tuple[str, ...] = ()
    # What attack.variant=auto means here. Transformers: `official`, the released code that made
    # the paper's tables (only CaiT has variant-dependent rows). CNNs: `clean`, since the
    # released CNN code (scale only, from a model-name mismatch) is not the paper's method.
    auto_variant: str = "official"
    # timm modules of this family on whose models TGR's `official` variant only scales (rule
    # SCALE at every site): the released code hooks DeiT like ViT, but its zeroing branches name
    # only ViT, PiT, CaiT and Visformer (jpzhang1810/TGR methods.py, lines 110, 177, 201, 224).
    scale_only_official: tuple[str, ...] = ()
    label: str = ""  # how messages show the family's classes; default: the class names

    @property
    def tgr_components(self) -> tuple[str, ...]:
        """The TGR components this family has, in COMPONENTS order."""
        found = {s.component for g in self.tgr for s in g.sites}
        return tuple(c for c in COMPONENTS if c in found)

    def shown(self) -> str:
        return f"{self.name} ({self.label or '/'.join(self.classes)})"


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
# A ResNet unit's branch ends at its last BN (or its SE gate, when it has one). The original SGM
# code leaves out the first unit of every stage (csdongxian/skip-connections-matter utils_sgm.py
# line 28: no hook on a `0.relu`), the unit whose shortcut is a projection: `skip=(0,)`.
RESNET_BRANCH = (Site("branch", "se|bn3|bn2", OUTPUT, BRANCH),)
# Pre-activation units end at their last conv (timm PreActBottleneck conv3, PreActBasic conv2;
# TF-slim BottleneckV2 conv3), added to the shortcut with nothing in between. timm's
# non-pre-activation resnetv2 Bottleneck has norm3 after conv3: the branch is one chain there,
# and the gradient is linear in what arrives, so scaling at conv3 is the same edit.
PREACT_BRANCH = (Site("branch", "conv3|conv2", OUTPUT, BRANCH),)

# TGR on residual CNNs (the paper's CNN adaptation): the gradient arriving at the input of each
# unit's first branch conv (the unit input for timm ResNet; the pre-activation BN+ReLU output for
# ResNet-v2), a (B,C,H,W) map with the H*W positions as tokens. INPUT edits only the copy that
# flows into conv1, so the shortcut, which reads the same tensor, keeps its gradient.
# `clean`: the regularizer R of docs/tgr.md section 2. `official`: the released code, which
# hooked conv1 of every TF-slim ResNet-v2 unit but, through a model-name mismatch in its
# dispatch, only scaled the gradient there (gamma 0.25) and zeroed nothing.
CONV_CLEAN = (Site("conv", "conv1", INPUT, SPATIAL),)
CONV_OFFICIAL = (Site("conv", "conv1", INPUT, SCALE),)


def _conv_groups(*paths: str) -> tuple[BlockGroup, ...]:
    return tuple(
        BlockGroup(path, sites, (variant,))
        for path in paths
        for variant, sites in (("official", CONV_OFFICIAL), ("clean", CONV_CLEAN))
    )


RESNET_LAYERS = tuple(f"layer{i}" for i in (1, 2, 3, 4))

FAMILIES: tuple[Family, ...] = (
    Family(
        "vit",
        ("VisionTransformer",),
        tgr=(BlockGroup("blocks", VIT_SITES),),
        branches=(BlockGroup("blocks", TRANSFORMER_BRANCHES),),
        # DeiT (distilled or not) and the hybrid ViTs are VisionTransformer subclasses.
        timm_modules=("vision_transformer", "deit", "vision_transformer_hybrid"),
        scale_only_official=("deit",),
    ),
    Family(
        "pit",
        ("PoolingVisionTransformer",),
        tgr=(BlockGroup("transformers.*.blocks", VIT_SITES),),
        branches=(BlockGroup("transformers.*.blocks", TRANSFORMER_BRANCHES),),
        timm_modules=("pit",),
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
        timm_modules=("cait",),
    ),
    Family(
        "visformer",
        ("Visformer",),
        tgr=(
            BlockGroup("stage2", VISFORMER_SITES, needs="attn"),
            BlockGroup("stage3", VISFORMER_SITES, needs="attn"),
        ),
        branches=tuple(BlockGroup(f"stage{i}", TRANSFORMER_BRANCHES) for i in (1, 2, 3)),
        timm_modules=("visformer",),
    ),
    Family(
        "resnet",
        ("timm.models.resnet.ResNet",),
        tgr=_conv_groups(*RESNET_LAYERS),
        branches=tuple(BlockGroup(path, RESNET_BRANCH, skip=(0,)) for path in RESNET_LAYERS),
        timm_modules=("resnet",),
        auto_variant="clean",
        label="timm ResNet: resnet*, resnext*, seresnet*, test_resnet",
    ),
    Family(
        "resnetv2",
        ("timm.models.resnetv2.ResNetV2",),
        tgr=_conv_groups("stages.*.blocks"),
        branches=(BlockGroup("stages.*.blocks", PREACT_BRANCH, skip=(0,)),),
        timm_modules=("resnetv2",),
        auto_variant="clean",
        label="timm ResNetV2: resnetv2_*",
    ),
    Family(
        "tf_resnet_v2",
        ("tgr_bench.tfslim.resnet_v2.ResNetV2",),
        tgr=_conv_groups("blocks.*"),
        branches=(BlockGroup("blocks.*", PREACT_BRANCH, skip=(0,)),),
        tfslim=("resnet_v2_50", "resnet_v2_101", "resnet_v2_152"),
        auto_variant="clean",
        label="TF-slim ResNetV2: res_v2_50/101/152",
    ),
)
VARIANTS = ("official", "clean")


def _class_names(cls: type) -> set[str]:
    return {n for c in cls.__mro__ for n in (c.__name__, f"{c.__module__}.{c.__qualname__}")}


def _usable(table: str, needs: str | None) -> list[Family]:
    """Families with sites in `table` (and, with `needs`, that TGR component among them)."""
    return [
        f for f in FAMILIES if getattr(f, table) and (needs is None or needs in f.tgr_components)
    ]


def _refusal(attack: str, what: str, usable: list[Family]) -> UserError:
    supported = ", ".join(f.shown() for f in usable)
    return UserError(
        f"{attack} does not support the {what}: supported "
        f"families are {supported}. Choose a source of those families or add a Family entry in "
        f"tgr_bench/attacks/architectures.py."
    )


def family_of(
    net: nn.Module, table: str = "tgr", attack: str = "TGR", needs: str | None = None
) -> Family:
    """The family of `net` that has sites in `table` ("tgr" or "branches"), and, with `needs`,
    that TGR component (PNA needs `attn`); a UserError listing the supported ones otherwise."""
    names = _class_names(type(net))
    usable = _usable(table, needs)
    for family in usable:
        if names & set(family.classes):
            return family
    raise _refusal(attack, f"source architecture {type(net).__name__}", usable)


def family_named(
    name: str | None,
    table: str = "tgr",
    attack: str = "TGR",
    needs: str | None = None,
    source: str | None = None,
) -> Family:
    """The family called `name` (as `source_family` returns it) if it has sites in `table` (and
    the component `needs`); a UserError naming `source` and listing the supported ones
    otherwise. `name=None`: a source of no family."""
    usable = _usable(table, needs)
    for family in usable:
        if family.name == name:
            return family
    if source:
        what = f"source {source}" + (f" (family {name})" if name else "")
    else:
        what = f"family {name}" if name else "source (no family covers its model)"
    raise _refusal(attack, what, usable)


def source_family(model: str) -> str | None:
    """The family name of a source model, from its name alone: no network is built.

    `model` is a timm model name, with or without its weight tag
    (`vit_base_patch16_224.augreg_in21k_ft_in1k`, `resnet50.a1_in1k`, `test_resnet.r160_in1k`,
    `resnetv2_50x1_bit.goog_in21k`), or a TF-slim key of tgr_bench.tfslim.registry.FILES
    (`res_v2_101`). None: no family covers it (Inception, ConvNeXt, LeViT, unknown names), which
    the gradient-editing attacks refuse. timm names map through the module that registers the
    architecture (timm.models.get_arch_name, then is_model_in_modules), so new models of a
    supported module need no change here. Attacks are built with it (attacks.create), and
    entering their `source_context` checks that the built network is of that family.
    """
    if model in TFSLIM_FILES:
        architecture = TFSLIM_FILES[model].architecture
        return next((f.name for f in FAMILIES if architecture in f.tfslim), None)
    arch = timm.models.get_arch_name(model)
    renamed = timm.models.get_deprecated_models().get(arch)
    if renamed:  # a deprecated name maps to a current one, possibly of another module
        arch = timm.models.get_arch_name(renamed)
    for family in FAMILIES:
        if family.timm_modules and timm.models.is_model_in_modules(arch, family.timm_modules):
            return family.name
    return None


def scales_only(net: nn.Module, family: Family, variant: str) -> bool:
    """Whether TGR's `variant` only scales on `net` (DeiT under `official`): known from the timm
    architecture the network was created as, or, without one, from the module of its class."""
    if variant != "official" or not family.scale_only_official:
        return False
    arch = (getattr(net, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        return scales_only_arch(arch, family, variant)
    return type(net).__module__.rpartition(".")[2] in family.scale_only_official


def scales_only_arch(model: str, family: Family, variant: str) -> bool:
    """The same from a timm model name (tag allowed), before any network exists: the run's
    identity records it."""
    if variant != "official" or not family.scale_only_official:
        return False
    arch = timm.models.split_model_name_tag(model)[0]
    return bool(timm.models.is_model_in_modules(arch, family.scale_only_official))


def _resolve(block: nn.Module, path: str) -> tuple[str, nn.Module | None]:
    """(the alternative of `path` that exists, its module); (path, None) when none does."""
    for alternative in path.split("|"):
        module: nn.Module | None = block
        for part in alternative.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None:
            return alternative, module
    return path, None


def containers(
    root: nn.Module, path: str, prefix: str = "", strict: bool = False
) -> Iterator[tuple[str, nn.Module]]:
    """(concrete path, module) for a path whose parts may be '*' (every child). A part that is
    missing is skipped, or, `strict`, an error saying the layout differs from the table."""
    head, _, rest = path.partition(".")
    if head == "*":
        children = list(root.named_children())
    else:
        child = getattr(root, head, None)
        if strict and not isinstance(child, nn.Module):
            raise UserError(
                f"{type(root).__name__} has no module {prefix}{head}: this timm version's layout "
                f"differs from the block table of tgr_bench/variance/blocks.py."
            )
        children = [(head, child)]
    for name, child in children:
        if child is None:
            continue
        here = f"{prefix}{name}"
        if rest:
            yield from containers(child, rest, here + ".", strict)
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
        for where, container in containers(net, group.path):
            for i, block in enumerate(container.children()):
                if (group.indices is not None and i not in group.indices) or i in group.skip:
                    continue
                if group.needs and getattr(block, group.needs, None) is None:
                    continue
                for site in group.sites:
                    found, module = _resolve(block, site.path)
                    if module is None and site.optional:
                        continue
                    if module is None:
                        raise UserError(
                            f"{type(net).__name__} block {where}.{i} has no {site.path}: "
                            f"this timm version's {family.name} layout differs from "
                            f"tgr_bench/attacks/architectures.py."
                        )
                    name = f"{where}.{i}.{found}"
                    bound.append(BoundSite(site, module, name))
    return bound
