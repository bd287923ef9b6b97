"""Attack registry: `attack.name` in the config picks a class from ATTACKS; `create` builds one.

An attack is built once, with its validated settings and the source's family (from the model
name, before any network exists): what resolves per family (TGR's `auto`) is settled then, and
a family the attack has no sites for is refused, naming the supported ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tgr_bench.attacks.architectures import Family, family_named
from tgr_bench.attacks.att import ATT
from tgr_bench.attacks.base import MIFGSM, MISettings
from tgr_bench.attacks.fpr import FPR
from tgr_bench.attacks.gns import GNS
from tgr_bench.attacks.hooks import GradientHookAttack
from tgr_bench.attacks.ll2s import LL2S
from tgr_bench.attacks.pna import PNA
from tgr_bench.attacks.sgm import SGM
from tgr_bench.attacks.tgr import TGR
from tgr_bench.attacks.vdc import VDC
from tgr_bench.attacks.vmi import VMI
from tgr_bench.errors import UserError
from tgr_bench.schema import closest, parse

ATTACKS: dict[str, type[MIFGSM]] = {
    cls.name: cls for cls in (MIFGSM, VMI, SGM, PNA, TGR, GNS, VDC, FPR, LL2S, ATT)
}


def _family(cls: type[MIFGSM], family: Family | str | None, source: str | None) -> Family | None:
    """The family object an attack class is built with; hook attacks refuse a family they have
    no sites for (or none), naming the source."""
    name = family.name if isinstance(family, Family) else family
    if issubclass(cls, GradientHookAttack):
        return family_named(name, cls.table, cls.name.upper(), cls.needs, source)
    return None if name is None else family_named(name, attack=cls.name.upper(), source=source)


def create(
    name: str,
    family: Family | str | None = None,
    *,
    where: str = "attack",
    source: str | None = None,
    arch: str | None = None,
    **keys: Any,
) -> MIFGSM:
    """The attack `name` (`mi`, `tgr`, ...) with `keys` (the config's keys, e.g. k=2,
    di={"enabled": True}) checked as on the command line, for a source of `family`
    (architectures.source_family of its model name; a Family or its name). `where` names the
    settings in messages, `source` the source model, `arch` its timm model name (what resolves
    per architecture within a family, such as TGR's DeiT rule, then enters the identity)."""
    if name not in ATTACKS:
        raise UserError(
            f"Unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}. "
            f"{closest(str(name), list(ATTACKS))}".rstrip()
        )
    cls = ATTACKS[name]
    found = _family(cls, family, source)
    attack = cls(parse(cls.Settings, {**keys, "name": name}, where), found)
    attack.source_arch = arch
    return attack


def build_attack(
    config: Mapping[str, Any],
    family: Family | str | None = None,
    source: str | None = None,
    where: str = "attack",
    arch: str | None = None,
) -> MIFGSM:
    """The attack of an `attack` config group (a mapping with its `name`)."""
    keys = dict(config)
    name = str(keys.pop("name", "mi"))
    return create(name, family, where=where, source=source, arch=arch, **keys)


__all__ = [
    "ATT",
    "ATTACKS",
    "FPR",
    "GNS",
    "LL2S",
    "MIFGSM",
    "PNA",
    "SGM",
    "TGR",
    "VDC",
    "VMI",
    "MISettings",
    "build_attack",
    "create",
]
