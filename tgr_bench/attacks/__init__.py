"""Attack registry: `attack.name` in the config picks a class from ATTACKS."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from tgr_bench.attacks.base import Attack
from tgr_bench.attacks.pna import PNA
from tgr_bench.attacks.sgm import SGM
from tgr_bench.attacks.tgr import TGR
from tgr_bench.attacks.vmi import VMI
from tgr_bench.errors import UserError

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (Attack, VMI, SGM, PNA, TGR)}


def build_attack(cfg: Any) -> Attack:
    params = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    name = params.get("name")
    if name not in ATTACKS:
        raise UserError(f"Unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}.")
    return ATTACKS[name].from_cfg(params)


__all__ = ["ATTACKS", "PNA", "SGM", "TGR", "VMI", "Attack", "build_attack"]
