"""Attack registry: `attack.name` in the config picks a class from ATTACKS."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from tgr_bench.attacks.architectures import source_family
from tgr_bench.attacks.base import Attack
from tgr_bench.attacks.pna import PNA
from tgr_bench.attacks.sgm import SGM
from tgr_bench.attacks.tgr import TGR
from tgr_bench.attacks.vmi import VMI
from tgr_bench.errors import UserError

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (Attack, VMI, SGM, PNA, TGR)}


def build_attack(
    cfg: Any, source_model: str | None = None, source_key: str | None = None
) -> Attack:
    """The attack of an `attack` config. With the source's model name (a timm name or a
    TF-slim key), it is bound to the source's family, so that `params()` holds the values that
    settings such as TGR's `auto` resolve to (they are part of the run identity)."""
    params = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    name = params.get("name")
    if name not in ATTACKS:
        raise UserError(f"Unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}.")
    attack = ATTACKS[name].from_cfg(params)
    if source_model is not None:
        attack.bind_family(source_family(source_model), source_key or source_model)
    return attack


__all__ = ["ATTACKS", "PNA", "SGM", "TGR", "VMI", "Attack", "build_attack"]
