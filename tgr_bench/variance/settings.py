"""The root keys of `tgr-bench-variance`, declared once (its attacks are `attack_overrides`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tgr_bench.errors import UserError
from tgr_bench.schema import key
from tgr_bench.settings import RuntimeSettings


def _names(name: str, value: Any) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{name}={value!r}: need a list of names, e.g. {name}=[mi,tgr].")
    return tuple(names)


@dataclass(frozen=True)
class VarianceSettings(RuntimeSettings):
    """Root keys of `tgr-bench-variance`."""

    attacks: tuple[str, ...] = key(
        ("mi", "vmi", "tgr"), parse=_names, help="names of attack_overrides, analysed in order"
    )
    time_plain: bool = key(
        True,
        identity=False,
        help="also attack the first batch without recording: the cost of the analysis",
    )
