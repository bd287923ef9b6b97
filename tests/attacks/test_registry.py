"""The attack registry: parameters of every attack are checked when it is built."""

from __future__ import annotations

import pytest

from tgr_bench.attacks import build_attack
from tgr_bench.errors import UserError


@pytest.mark.parametrize(
    "params,match",
    [
        ({"name": "vmi", "n_samples": 0}, "n_samples"),
        ({"name": "vmi", "beta": -1}, "beta"),
        ({"name": "sgm", "gamma": 2}, "gamma"),
        ({"name": "sgm", "gamma": "x"}, "attack.gamma='x' is not a number"),
        ({"name": "pna", "gamma": 0.5}, "there is no key attack.gamma"),
    ],
)
def test_bad_baseline_parameters(params, match):
    with pytest.raises(UserError, match=match):
        build_attack(params, "vit")
