"""The run config's defense keys: `defenses` (the names to evaluate every target under) and
`defense.<name>.<setting>` (each defense's settings, defaults from its class: the paper's values).

    tgr-bench experiment=smoke defenses=[jpeg,bit_depth] defense.jpeg.quality=50

Each named defense adds, for every target T, a target `T+<name>` to results.csv and
predictions.csv. The defaults live once, in the defense classes; the config shows them under
`defense.<name>` (so Hydra refuses a misspelt setting) and `load_defense` checks every value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from tgr_bench.errors import UserError

# Settings that are objects, not config values: a guide network, a built purifier.
NOT_CONFIG = ("guide", "purifier")


def defense_defaults() -> dict[str, dict[str, Any]]:
    """Every defense's settings with their defaults, as the run config shows them."""
    from tgr_bench.defenses import DEFENSES

    out: dict[str, dict[str, Any]] = {}
    for name, cls in DEFENSES.items():
        out[name] = {
            f.name: f.default
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.name not in NOT_CONFIG and f.default is not dataclasses.MISSING
        }
    return out


def parse_names(name: str, value: Any) -> list[str]:
    """`defenses`: a list of defense names, each at most once."""
    from tgr_bench.defenses import DEFENSES

    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise UserError(f"{name}={value!r}: need a list of defenses, e.g. {name}=[jpeg,bit_depth].")
    names = [str(v) for v in value]
    for v in names:
        if v not in DEFENSES:
            raise UserError(f"{name}: unknown defense {v!r}; available: {', '.join(DEFENSES)}.")
    if len(set(names)) != len(names):
        raise UserError(f"{name}={names} names a defense twice.")
    return names


def parse_settings(name: str, value: Any) -> dict[str, dict[str, Any]]:
    """`defense`: a mapping of defense name to its settings (missing ones keep the default)."""
    from tgr_bench.defenses import DEFENSES

    if not isinstance(value, Mapping):
        raise UserError(
            f"{name}={value!r}: set one setting at a time, e.g. {name}.jpeg.quality=50."
        )
    out = defense_defaults()
    for defense, settings in value.items():
        if defense not in DEFENSES:
            raise UserError(f"{name}.{defense}: unknown defense; available: {', '.join(DEFENSES)}.")
        if not isinstance(settings, Mapping):
            raise UserError(f"{name}.{defense}={settings!r}: it is a group of settings.")
        out[defense] = {**out[defense], **settings}
    return out


def load_defenses(names: Sequence[str], settings: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    """The defenses `names`, each built with its settings from the config (every value checked
    by the defense itself; NRP reads its weight file here)."""
    from tgr_bench.defenses import load_defense

    return [load_defense(n, **dict(settings.get(n, {}))) for n in names]


def unused_defense_settings(
    names: Sequence[str], settings: Mapping[str, Mapping[str, Any]]
) -> None:
    """A setting of a defense that `defenses` does not name would silently not apply."""
    defaults = defense_defaults()
    for defense, values in settings.items():
        if defense in names:
            continue
        for key, value in values.items():
            if value != defaults[defense].get(key):
                raise UserError(
                    f"defense.{defense}.{key}={value} has no effect: {defense} is not in "
                    f"defenses={list(names)}. Add it (defenses=[...,{defense}]), or leave "
                    f"defense.{defense}.{key} at its default ({defaults[defense].get(key)})."
                )
