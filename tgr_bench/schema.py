"""Config groups declared once, and every check of a user's value derived from the declaration.

A group (a model entry, the data selection, the runtime settings, an attack, each modifier) is
a frozen dataclass: each field is one key, its annotation the type, its default the key's one
default, and `key(...)` adds what a type cannot say (a range, options, pixel levels, help).
`parse(cls, raw, where)` turns the composed config's mapping into an instance, or raises one
UserError line that names the key and the fix: unknown keys with the closest names and the
group's keys, values that are not numbers, ranges, options with did-you-mean, a scalar given
for a group. A group adds its cross-key rules in `check(where)`, called after its keys pass.
The Hydra configs are made from the same classes (config.py), so a default exists once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any, TypeVar

from omegaconf import OmegaConf

from tgr_bench.errors import UserError

T = TypeVar("T")
AUTO = "auto"


class Levels(float):
    """An annotation: a budget in 0-255 pixel levels (eps, alpha)."""


def key(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    options: Sequence[str] | None = None,
    auto: bool = False,
    identity: bool = True,
    parse: Callable[[str, Any], Any] | None = None,
    needs: str | None = None,
) -> Any:
    """A declared key. `low`/`high` bound numbers (closed unless `*_open`), `options` the allowed
    texts, `auto` also admits the text "auto" (resolved later), `identity=False` marks a key
    that changes no image and no table (device, batch sizes), `parse` a key-specific reader,
    `needs` the sibling flag without which the key has no effect (in a group with an `enabled`
    flag, every other key needs it)."""
    meta = {
        "help": help,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "options": tuple(options) if options else None,
        "auto": auto,
        "identity": identity,
        "parse": parse,
        "needs": needs,
    }
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def plain(value: Any) -> Any:
    """A config node (or a mapping or list holding some) as plain Python values,
    interpolations resolved."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# ---- messages ----------------------------------------------------------------------------------
def closest(word: str, options: Sequence[str], prefix: str = "") -> str:
    """'Did you mean x or y? ' for the options close to `word`, else ''."""
    near = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
    return f"Did you mean {' or '.join(prefix + n for n in near)}? " if near else ""


def unknown_key(name: str, known: Sequence[str], hint: str = "") -> str:
    """The one line for a key a group does not have."""
    parent, _, leaf = name.rpartition(".")
    where = f"{parent}." if parent else ""
    near = closest(leaf, known, where) or hint
    return f"there is no key {name}. {near}The keys of {parent or 'the config'} are: " + (
        ", ".join(known) + "."
    )


def _interval(meta: Mapping[str, Any]) -> str:
    low, high = meta["low"], meta["high"]
    if high is None:
        return f"{'>' if meta['low_open'] else '>='} {low:g}"
    if low is None:
        return f"{'<' if meta['high_open'] else '<='} {high:g}"
    left = "(" if meta["low_open"] else "["
    right = ")" if meta["high_open"] else "]"
    return f"in {left}{low:g}, {high:g}{right}"


# ---- values ------------------------------------------------------------------------------------
def number(name: str, value: Any) -> float:
    """`value` as a float, or a one-line error naming the setting (never a traceback)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{name}={value!r} is not a number.")
    return float(value)


def whole(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as a whole number >= minimum, or a one-line error naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name}={value!r}: need a whole number >= {minimum}.")
    return value


def flag(name: str, value: Any) -> bool:
    """`value` as a bool: a string such as "no" must never switch anything on."""
    if not isinstance(value, bool):
        raise UserError(f"{name}={value!r}: use true or false.")
    return value


def levels(name: str, value: Any) -> float:
    """A budget in 0-255 pixel levels. Values below 1 are refused: they are almost always the
    [0,1] convention of other attack libraries (eps 16/255 = 0.0627), which here would attack
    with a fraction of one level and report a white-box success of zero."""
    v = number(name, value)
    if 0 < v < 1:
        meant = v * 255
        meant = round(meant) if abs(meant - round(meant)) < 0.05 else round(meant, 1)
        raise UserError(
            f"{name}={v} is below one pixel level: tgr-bench takes budgets in 0-255 pixel levels, "
            f"not in [0,1]. You probably meant {name}={meant:g}."
        )
    if not 0 < v <= 255:
        raise UserError(f"{name}={v:g} is outside (0, 255]: it is in 0-255 pixel levels.")
    return v


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        near = closest(value, options) if isinstance(value, str) else ""
        raise UserError(f"{name}={value!r}: choose one of {list(options)}. {near}".rstrip())
    return value


def _integer(name: str, value: Any, meta: Mapping[str, Any]) -> int:
    low, high = meta["low"], meta["high"]
    ok = not isinstance(value, bool) and isinstance(value, int)
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return value
    if high is not None:
        shown = "2^63-1" if high == 2**63 - 1 else f"{high:g}"
        raise UserError(f"{name}={value!r}: need a whole number in {low:g}..{shown}.")
    other = " or auto" if meta["auto"] else " or null" if meta.get("nullable") else ""
    least = low if low is not None else 0
    raise UserError(f"{name}={value!r}: need a whole number >= {least:g}{other}.")


def _real(name: str, value: Any, meta: Mapping[str, Any]) -> float:
    v = number(name, value)
    low, high = meta["low"], meta["high"]
    bad = (
        math.isnan(v)
        or (low is not None and (v < low or (meta["low_open"] and v == low)))
        or (high is not None and (v > high or (meta["high_open"] and v == high)))
    )
    if bad:
        help_ = f": {meta['help']}" if meta["help"] else ""
        raise UserError(
            f"{name}={value!r} is outside the allowed range ({_interval(meta)}){help_}."
        )
    return v


def _text(name: str, value: Any, meta: Mapping[str, Any]) -> str:
    if meta["options"]:
        return choice(name, value, meta["options"])
    if isinstance(value, bool | Mapping | list | tuple) or value is None:
        raise UserError(f"{name}={value!r}: need a text value (quote it if it has spaces).")
    return str(value)


def _sequence(name: str, value: Any, item: Any) -> tuple:
    if not isinstance(value, list | tuple):
        raise UserError(f"{name}={value!r}: need a list, e.g. {name}=[0.5,0.5,0.5].")
    meta = _meta({})
    return tuple(_value(item, meta, v, f"{name}[{i}]") for i, v in enumerate(value))


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise UserError(
            f"{name}={value!r}: need a mapping of keys to values, e.g. {name}={{a: 1}}."
        )
    return dict(value)


def _group(name: str, value: Any, cls: type) -> Any:
    if not isinstance(value, Mapping):
        keys = [f.name for f in dataclasses.fields(cls)]
        raise UserError(
            f"{name}={value!r}: {name} is a group of keys ({', '.join(keys)}), not one value; "
            f"set its keys, e.g. {name}.{keys[0]}=..."
        )
    return parse(cls, value, name)


def _meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    base = {"help": "", "low": None, "high": None, "low_open": False, "high_open": False,
            "options": None, "auto": False, "identity": True, "parse": None,
            "needs": None}  # fmt: skip
    return {**base, **meta}


def _value(tp: Any, meta: Mapping[str, Any], value: Any, name: str) -> Any:
    """`value` checked against the declared type `tp` of key `name`."""
    if meta["parse"] is not None:
        return meta["parse"](name, value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        meta = {**meta, "nullable": True}
    if meta["auto"] and value == AUTO:
        return AUTO
    if tp is Levels:
        return levels(name, value)
    if dataclasses.is_dataclass(tp):
        return _group(name, value, tp)
    if tp is bool:
        return flag(name, value)
    if tp is int:
        return _integer(name, value, meta)
    if tp is float:
        return _real(name, value, meta)
    if tp is str:
        return _text(name, value, meta)
    if origin is tuple:
        return _sequence(name, value, args[0])
    if origin is dict or tp is dict:
        return _mapping(name, value)
    raise TypeError(f"no check for the declared type {tp!r} of {name}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def keys_of(cls: type) -> list[str]:
    """The declared keys of a group, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def parse(cls: type[T], raw: Mapping[str, Any] | None, where: str) -> T:
    """An instance of the group `cls` from a config mapping (keys it lacks keep their
    default), every key checked; `where` is the group's name in messages (`attack`, `data`,
    `targets.vit_base`)."""
    raw = dict(plain(raw) or {})
    known = keys_of(cls)
    prefix = f"{where}." if where else ""  # "" for the root keys (seed=, device=)
    for name in raw:
        if name not in known:
            raise UserError(unknown_key(prefix + name, known))
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            meta = _meta(f.metadata)
            values[f.name] = _value(hints[f.name], meta, raw[f.name], prefix + f.name)
    group = cls(**values)
    _refuse_unused(group, prefix)
    check = getattr(group, "check", None)
    if check is not None:
        check(where)
    return group


def _needs(f: dataclasses.Field, names: Sequence[str]) -> str | None:
    needs = _meta(f.metadata)["needs"]
    if needs is None and "enabled" in names and f.name != "enabled":
        return "enabled"
    return needs


def _refuse_unused(group: Any, prefix: str) -> None:
    """A key set away from its default while the flag it needs is off would silently not apply:
    refused, naming the flag."""
    fields = dataclasses.fields(group)
    names = [f.name for f in fields]
    default = type(group)()
    for f in fields:
        flag = _needs(f, names)
        value = getattr(group, f.name)
        if flag is None or getattr(group, flag) or value == getattr(default, f.name):
            continue
        off, on = (
            ("=false", "=true")
            if isinstance(getattr(group, flag), bool)
            else (
                " is unset",
                "=...",
            )
        )
        raise UserError(
            f"{prefix}{f.name}={_shown(value)} has no effect while {prefix}{flag}{off}: set "
            f"{prefix}{flag}{on} to use it, or leave {prefix}{f.name} at its default "
            f"({_shown(getattr(default, f.name))})."
        )


def _shown(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return str(dataclasses.asdict(value))
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def defaults(cls: type) -> dict[str, Any]:
    """The group's keys with their defaults, nested groups as mappings: what config.py stores
    for Hydra and what `tgr-bench-list` shows."""
    return dataclasses.asdict(cls())


def runtime_keys(cls: type) -> tuple[str, ...]:
    """Keys declared with identity=False: they change no image and no table."""
    return tuple(f.name for f in dataclasses.fields(cls) if not _meta(f.metadata)["identity"])


def help_of(cls: type) -> dict[str, str]:
    """Each key's help text (nested groups as `group.key`)."""
    out: dict[str, str] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        text = _meta(f.metadata)["help"]
        if text:
            out[f.name] = text
        if dataclasses.is_dataclass(hints[f.name]):
            out |= {f"{f.name}.{k}": v for k, v in help_of(hints[f.name]).items()}
    return out
