"""SGM, Skip Gradient Method (Wu et al., ICLR 2020), for ViTs and ResNets.

The gradient of every residual branch output is scaled by gamma; skip connections are untouched.
ViT-family sources: the attention output after proj and the MLP output of every block (ports
differ: one scales only the MLP branch, one uses 0.4; tgr-bench scales both, gamma 0.5; see
docs/baselines.md section 4). ResNet sources: the output of each residual unit's last BN (or SE
gate) for timm ResNet, of its last conv for the pre-activation ResNet-v2s (timm and TF-slim),
i.e. the whole branch once, where the original code scaled the gradient at every ReLU of the
branch; as the original code, not in the first unit of each stage, and gamma 0.2 (the paper's
ResNet setting, TransferAttack's default). The sites are the `branches` table of
architectures.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tgr_bench.attacks.architectures import BoundSite, Family, bind_sites
from tgr_bench.attacks.base import MISettings
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.errors import UserError
from tgr_bench.schema import AUTO, key

# gamma under `auto`, per family. Residual CNNs: 0.2, the paper's ResNet value (Wu et al.,
# section 4; TransferAttack model_related/sgm.py, `gamma=0.2`). Transformers: 0.5, tgr-bench's
# ViT adaptation (docs/baselines.md section 4.3).
GAMMA_CNN = 0.2
GAMMA_TRANSFORMER = 0.5
CNN_FAMILIES = ("resnet", "resnetv2", "tf_resnet_v2")


def auto_gamma(family: Family) -> float:
    """What `attack.gamma=auto` means on a source of `family`."""
    return GAMMA_CNN if family.name in CNN_FAMILIES else GAMMA_TRANSFORMER


@dataclass(frozen=True)
class SGMSettings(MISettings):
    """attack=sgm: every residual branch's gradient scaled by gamma."""

    name: str = key("sgm")
    gamma: float = key(
        AUTO,
        low=0,
        high=1,
        auto=True,
        help="auto: 0.2 on residual CNNs (the paper's ResNet value), 0.5 on ViTs (ports differ: "
        "MLP branch only; 0.4)",
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
        gamma = self.settings.gamma  # type: ignore[attr-defined]
        self.gamma = auto_gamma(self.family) if gamma == AUTO else float(gamma)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "gamma": self.gamma}

    def sites(self, net: nn.Module, family: Family) -> list[BoundSite]:
        bound = bind_sites(net, family, table="branches")
        if not bound:  # nothing would be edited: the run would be plain MI-FGSM under SGM's name
            raise UserError(
                f"SGM has no residual unit to scale on this {family.name} source: each of its "
                f"stages has a single unit, and SGM leaves the first unit of every stage unscaled "
                f"(the original code). Use a source with two or more units in a stage."
            )
        return bound

    def edit(self, bound: BoundSite, g: torch.Tensor) -> torch.Tensor:
        return g * self.gamma
