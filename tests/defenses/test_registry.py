"""load_defense: the registry, the papers' ImageNet defaults, overrides and refusals, and the
contract every input defense keeps (pixels in [0,1] in and out, keys for the randomized ones)."""

from __future__ import annotations

import re

import pytest
import torch

from tgr_bench.defenses import DEFENSES, InputDefense, Smoothing, load_defense
from tgr_bench.errors import UserError

PAPER_DEFAULTS = {
    "jpeg": {"jpeg_quality": 75},
    "bit_depth": {"bit_depth_bits": 5},
    "median": {"median_size": 2},
    "rp": {"rp_min_scale": 1.0, "rp_max_scale": 331 / 299, "rp_fill": 0.5, "rp_mode": "nearest"},
    "pd": {"pd_deflections": 200, "pd_window": 10, "pd_sigma": 0.04, "pd_map": "uniform"},
    "smoothing": {"smoothing_sigma": 0.5, "smoothing_n": 1000, "smoothing_alpha": 0.001},
}


def test_the_registry_holds_every_defense_with_its_papers_imagenet_settings():
    assert {name for name in DEFENSES if name in PAPER_DEFAULTS} == set(PAPER_DEFAULTS)
    for name, params in PAPER_DEFAULTS.items():
        defense = load_defense(name)
        assert defense.name == name and defense.params() == params
        # A citation: the paper's title words, a venue or archive, and a year.
        assert re.search(r"(ICLR|NDSS|CVPR|ICML|arXiv)[: ]\S*\s?(19|20)\d\d", defense.reference)


def test_settings_override_the_defaults():
    assert load_defense("jpeg", quality=30).params() == {"jpeg_quality": 30}
    assert load_defense("median", size=3).params() == {"median_size": 3}
    assert load_defense("pd", deflections=50, window=5).params()["pd_deflections"] == 50


def test_unknown_names_and_settings_are_refused_in_one_line():
    with pytest.raises(UserError, match="Unknown defense 'jpg'; available: bit_depth, jpeg"):
        load_defense("jpg")
    with pytest.raises(
        UserError, match=r"defense\.jpeg has no settings \['qualty'\]; valid: quality"
    ):
        load_defense("jpeg", qualty=50)


INPUT_DEFENSES = sorted(n for n in PAPER_DEFAULTS if n != "smoothing")


@pytest.mark.parametrize("name", INPUT_DEFENSES)
def test_every_input_defense_keeps_the_contract(name):
    defense = load_defense(name)
    assert isinstance(defense, InputDefense)
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0)) / 255
    out = defense(x, keys=[1, 2])
    side = 35 if name == "rp" else 32
    assert out.shape == (2, 3, side, side) and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(defense(x, keys=[1, 2]), out)  # the keys decide everything
    if not defense.randomized:
        assert torch.equal(defense(x), out)
    with pytest.raises(ValueError, match="float RGB images"):
        defense(x[:, :1])


def test_smoothing_is_a_prediction_rule_not_a_transform():
    assert isinstance(load_defense("smoothing"), Smoothing)
    assert not isinstance(load_defense("smoothing"), InputDefense)
