"""PNA, Pay No Attention (Wei et al., AAAI 2022): the forward pass is unchanged and no gradient
flows through any attention map (every block with attention, both CaiT class blocks; for CaiT's
talking heads, the map that multiplies v)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tgr_bench.attacks.architectures import BoundSite, Family, bind_sites
from tgr_bench.attacks.base import MISettings
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.schema import key


@dataclass(frozen=True)
class PNASettings(MISettings):
    """attack=pna: no gradient through the attention maps."""

    name: str = key("pna")


class PNA(GradientHookAttack):
    name = "pna"
    Settings = PNASettings
    needs = "attn"  # families with attention maps: CNN families have TGR sites but no maps
    reference = (
        "PNA: Wei et al., Towards Transferable Adversarial Attacks on Vision Transformers, "
        "AAAI 2022"
    )

    def sites(self, net: nn.Module, family: Family) -> list[BoundSite]:
        # The clean variant's rows cover every attention map, class-attention blocks included.
        return [b for b in bind_sites(net, family, "clean") if b.site.component == "attn"]

    def edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(g)
