"""SGM, Skip Gradient Method (Wu et al., ICLR 2020), for ViTs and ResNets.

The gradient of every residual branch output is scaled by gamma; skip connections are untouched.
ViT-family sources: the attention output after proj and the MLP output of every block (ports
differ: one scales only the MLP branch, one uses 0.4; tgr-bench scales both, gamma 0.5; see
docs/baselines.md section 4). ResNet sources: the output of each residual unit's last BN (or SE
gate) for timm ResNet, of its last conv for the pre-activation ResNet-v2s (timm and TF-slim),
i.e. the whole branch once, where the original code scaled the gradient at every ReLU of the
branch. The sites are the `branches` table of architectures.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tgr_bench.attacks.architectures import BoundSite, Family, bind_sites
from tgr_bench.attacks.base import MISettings
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.schema import key


@dataclass(frozen=True)
class SGMSettings(MISettings):
    """attack=sgm: every residual branch's gradient scaled by gamma."""

    name: str = key("sgm")
    gamma: float = key(
        0.5, low=0, high=1, help="ports differ (MLP branch only; 0.4): this scales both by 0.5"
    )


class SGM(GradientHookAttack):
    name = "sgm"
    table = "branches"
    reference = (
        "SGM: Wu et al., Skip Connections Matter: On the Transferability of Adversarial "
        "Examples Generated with ResNets, ICLR 2020"
    )

    Settings = SGMSettings

    def __init__(self, settings: SGMSettings | None = None, family: Family | None = None) -> None:
        super().__init__(settings, family)
        self.gamma = float(self.settings.gamma)  # type: ignore[attr-defined]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "gamma": self.gamma}

    def sites(self, net: nn.Module, family: Family) -> list[BoundSite]:
        return bind_sites(net, family, table="branches")

    def edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        return g * self.gamma
