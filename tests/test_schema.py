"""The checks every declared key gets, derived in one place (tgr_bench/schema.py): each is one
line that names the key and the fix, for every group alike."""

from __future__ import annotations

import dataclasses

import pytest

from tgr_bench.attacks import ATTACKS
from tgr_bench.attacks.modifiers import DI
from tgr_bench.data import DATA_KINDS
from tgr_bench.errors import UserError
from tgr_bench.models import ModelSpec
from tgr_bench.schema import Levels, defaults, help_of, key, parse, runtime_keys
from tgr_bench.settings import RunSettings
from tgr_bench.variance.settings import VarianceSettings


@dataclasses.dataclass(frozen=True)
class Inner:
    on: bool = key(False)
    rate: float = key(1.0, low=0, high=2, low_open=True, help="a resize factor")


@dataclasses.dataclass(frozen=True)
class Group:
    eps: Levels = key(16.0)
    steps: int = key(10, low=1)
    batch: int = key(16, low=1, auto=True, identity=False)
    mode: str = key("auto", options=("auto", "random", "labels"))
    note: str | None = key(None)
    inner: Inner = key(Inner)

    def check(self, where: str) -> None:
        if self.mode == "labels" and self.inner.on:
            raise UserError(f"{where}.mode=labels and {where}.inner.on cannot go together.")


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"stesp": 3}, "there is no key g.stesp. Did you mean g.steps or g.eps? The keys of g"),
        ({"eps": "abc"}, "g.eps='abc' is not a number."),
        ({"eps": 0.0627}, "g.eps=0.0627 is below one pixel level"),
        ({"eps": 0.0627}, "You probably meant g.eps=16."),
        ({"eps": 300}, "g.eps=300 is outside (0, 255]"),
        ({"steps": 0}, "g.steps=0: need a whole number >= 1."),
        ({"steps": 2.5}, "g.steps=2.5: need a whole number >= 1."),
        ({"steps": True}, "g.steps=True: need a whole number >= 1."),
        ({"batch": "big"}, "g.batch='big': need a whole number >= 1 or auto."),
        ({"mode": "randmo"}, "g.mode='randmo': choose one of ['auto', 'random', 'labels']. "
                             "Did you mean random?"),  # fmt: skip
        ({"note": [1]}, "g.note=[1]: need a text value"),
        ({"inner": True}, "g.inner=True: g.inner is a group of keys (on, rate), not one value"),
        ({"inner": {"on": "yes"}}, "g.inner.on='yes': use true or false."),
        ({"inner": {"rate": 0}}, "g.inner.rate=0 is outside the allowed range (in (0, 2]): "
                                 "a resize factor."),  # fmt: skip
        ({"inner": {"rte": 1}}, "there is no key g.inner.rte. Did you mean g.inner.rate?"),
        ({"mode": "labels", "inner": {"on": True}}, "cannot go together"),
    ],
)
def test_each_check_is_one_line_naming_the_key(raw, message):
    with pytest.raises(UserError) as e:
        parse(Group, raw, "g")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_values_keep_their_types_and_defaults_fill_the_rest():
    g = parse(Group, {"eps": 8, "batch": "auto", "inner": {"on": True}}, "g")
    assert g == Group(eps=8.0, batch="auto", inner=Inner(on=True))
    assert isinstance(g.eps, float) and isinstance(g.inner.rate, float)
    assert parse(Group, {}, "g") == Group()
    assert runtime_keys(Group) == ("batch",)
    assert help_of(Group)["inner.rate"] == "a resize factor"


DECLARED = [
    *(a.Settings for a in ATTACKS.values()),
    *DATA_KINDS.values(),
    ModelSpec,
    RunSettings,
    VarianceSettings,
    DI,
]


@pytest.mark.parametrize("cls", DECLARED, ids=lambda c: c.__name__)
def test_every_declared_default_passes_its_own_checks(cls):
    """The stored defaults (what Hydra composes) parse back to the declaration's defaults."""
    raw = defaults(cls)
    if cls is ModelSpec:
        raw |= {"key": "k", "model": "vit_base_patch16_224"}
    if raw.get("kind") == "folder":
        raw["root"] = "/data"
    parsed = parse(cls, raw, "x")
    assert defaults(type(parsed)) == defaults(cls) and dataclasses.asdict(parsed) == raw


def test_root_keys_use_their_own_names():
    with pytest.raises(UserError, match=r"^seed='abc': need a whole number in 0..2\^63-1.$"):
        parse(RunSettings, {"seed": "abc"}, "")
    with pytest.raises(UserError, match="^there is no key sed. Did you mean seed?"):
        parse(RunSettings, {"sed": 1}, "")
    with pytest.raises(UserError, match=r"adv_dir=\[\] lists no folder"):
        parse(RunSettings, {"adv_dir": []}, "")
