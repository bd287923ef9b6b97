"""The rule itself: every key a user sets is used as given or refused with one line.

For every declared key of every attack and data group, a valid value other than its default is
set (with the flag it needs switched on, so that the key can act): the resolved run must then
either refuse it (UserError) or have another identity than the same run without it. The
identity is built from the attack's resolved `params()` and the data's normalized selection,
never from the raw config, so a key that no code reads leaves it unchanged and fails here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections.abc import Iterator
from typing import Any

import pytest

from tgr_bench.attacks import ATTACKS
from tgr_bench.config import choices, compose
from tgr_bench.errors import UserError
from tgr_bench.plan import resolve
from tgr_bench.schema import _meta, plain

# Keys whose values are parsed from text or lists: a valid value other than the default.
SPECIAL = {"components": ["attn"], "name": None}
# Sources tried in order: the first one an attack accepts is its test source.
SOURCES = ("test_pit", "test_vit", "test_resnet")


def _leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, (*prefix, f.name))
        else:
            yield (*prefix, f.name), f


def _other(f: dataclasses.Field, default: Any, tp: Any) -> Any:
    """A valid value of the key other than its default (None: none to try)."""
    if f.name in SPECIAL:
        return SPECIAL[f.name]
    meta = _meta(f.metadata)
    if default == "auto":  # resolved per family: an explicit value inside the range
        low, high = meta["low"] or 0, meta["high"]
        return (low + high) / 2 if high is not None else low + 1

    if meta["options"]:
        return next(o for o in meta["options"] if o != default)
    if isinstance(default, bool):
        return not default
    low, high = meta["low"], meta["high"]
    if isinstance(default, int) or tp in (int, int | None):
        value = (default or 1) + 1
        return value if high is None or value <= high else (low if low != default else None)
    if isinstance(default, float) or default is None:
        base = 2.0 if default is None else float(default)
        value = base * 0.5 if base else 0.5
        if low is not None and value <= low:
            value = (base + (high if high is not None else base + 1)) / 2
        return value if value != default else None
    return None


def _flags(path: tuple[str, ...], cls: type) -> dict[tuple[str, ...], Any]:
    """The flags that `path` needs (an `enabled` sibling, a declared `needs`), switched on."""
    group, on = cls, {}
    for depth, name in enumerate(path):
        names = [f.name for f in dataclasses.fields(group)]
        field = next(f for f in dataclasses.fields(group) if f.name == name)
        need = _meta(field.metadata)["needs"] or ("enabled" if "enabled" in names else None)
        if need and need != name:
            on[(*path[:depth], need)] = True
        tp = typing.get_type_hints(group)[name]
        group = tp if dataclasses.is_dataclass(tp) else group
    return on


def _set(config: dict, path: tuple[str, ...], value: Any) -> None:
    node = config
    for name in path[:-1]:
        node = node[name]
    node[path[-1]] = value


def _identity(config: dict) -> str:
    return resolve(config, keep=False).identity.digest()


@functools.cache
def _composed(*overrides: str) -> dict:
    return plain(compose(["experiment=smoke", *overrides]))


def _cases() -> Iterator[Any]:
    for preset in choices("attack"):
        base = _composed(f"attack={preset}")
        cls = ATTACKS[base["attack"]["name"]].Settings
        for path, _ in _leaves(cls):
            if path[-1] == "name":
                continue
            yield pytest.param(preset, path, id=f"{preset}-{'.'.join(path)}")


@functools.cache
def _source_of(preset: str) -> str:
    for source in SOURCES:
        try:
            _identity(copy.deepcopy(_composed(f"attack={preset}", f"source={source}")))
        except UserError:
            continue
        return source
    raise AssertionError(f"attack={preset} runs on none of {SOURCES}")


@pytest.mark.parametrize("preset,path", list(_cases()))
def test_every_attack_key_is_used_or_refused(preset: str, path: tuple[str, ...]):
    config = copy.deepcopy(_composed(f"attack={preset}", f"source={_source_of(preset)}"))
    cls = ATTACKS[config["attack"]["name"]].Settings
    field = dict(_leaves(cls))[path]
    if not _meta(field.metadata)["identity"]:
        pytest.skip("declared identity=False: changes no image (its own tests show it)")
    tp = typing.get_type_hints(cls) if len(path) == 1 else {}
    default = config["attack"]
    for name in path:
        default = default[name]
    value = _other(field, default, tp.get(path[-1]))
    if value is None:
        pytest.skip(f"no other valid value to try for {'.'.join(path)}")
    on = copy.deepcopy(config)
    for flag, v in _flags(path, cls).items():
        _set(on["attack"], flag, v)
    try:
        before = _identity(on)
    except UserError:  # the flag alone is refused on this source (e.g. needs another family)
        pytest.skip(f"{'.'.join(path)}: its flag does not apply to {config['source']['key']}")
    # An explicit value for an `auto` key may be the one `auto` resolves to: try the next too.
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    values = [value, value + 1] if default == "auto" and numeric else [value]
    for v in values:
        changed = copy.deepcopy(on)
        _set(changed["attack"], path, v)
        try:
            after = _identity(changed)
        except UserError as e:
            assert "\n" not in str(e)  # refused, in one line
            return
        if after != before:
            return
    raise AssertionError(f"attack.{'.'.join(path)}={values} changed nothing the run computes")


@pytest.mark.parametrize("kind", ["folder", "synthetic", "smoke"])
def test_every_data_key_is_used_or_refused(kind: str, tmp_path):
    from tgr_bench.data import DATA_KINDS

    config = copy.deepcopy(_composed(f"data={kind}"))
    if kind == "folder":
        config["data"]["root"] = str(tmp_path)
    cls = DATA_KINDS[config["data"].get("kind", kind)]
    before = _identity(config)
    tried = 0
    for path, f in _leaves(cls):
        if path[-1] in ("kind", "root") or not _meta(f.metadata)["identity"]:
            continue
        value = _other(f, config["data"][path[-1]], None)
        if value is None:
            continue
        changed = copy.deepcopy(config)
        changed["data"][path[-1]] = value
        tried += 1
        try:
            after = _identity(changed)
        except UserError:
            continue
        assert after != before, f"data.{path[-1]}={value} changed nothing the run computes"
    assert tried >= 3
