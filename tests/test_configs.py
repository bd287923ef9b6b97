"""Every option of every config group composes, and what it composes to is valid: attacks
build, model entries name real timm architectures and tags, targets resolve, data validates."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from tgr_bench.attacks import build_attack
from tgr_bench.catalogue import CONFIG_MODULE, choices, model_keys, model_spec
from tgr_bench.data import DataSpec
from tgr_bench.models import check_model_name
from tgr_bench.plan import identity_of, target_specs

GROUPS = ("attack", "source", "targets", "data", "experiment")


def compose_with(*overrides: str):
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    if cfg.data.kind == "folder":
        cfg.data.root = "/d"  # required by the folder layout; never read here
    return cfg


def test_the_groups_are_the_documented_ones():
    assert set(choices("attack")) >= {"mi", "vmi", "sgm", "pna", "tgr", "pna_patchout"}
    assert set(choices("targets")) == {"vits", "cnns", "defended", "paper", "smoke", "none"}
    assert set(choices("data")) == {"folder", "synthetic"}
    assert "schema" not in model_keys() and "vit_base" in model_keys()


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in choices(g)], ids=lambda v: str(v)
)
def test_every_option_composes_to_a_valid_run(group: str, option: str):
    cfg = compose_with(f"{group}={option}")
    attack = build_attack(cfg.attack, model_spec(cfg.source.key).arch, cfg.source.key)
    smoke = (group, option) == ("experiment", "smoke")
    assert attack.params()["eps"] == (1.0 if smoke else 16.0)  # the smoke run: 1 level
    check_model_name(model_spec(cfg.source.key))
    for spec in target_specs(cfg):
        check_model_name(spec)
        assert spec == model_spec(spec.key)  # a target entry is its catalogue entry
    DataSpec.from_cfg(cfg.data)
    assert len(identity_of(cfg).run_id) == 12


@pytest.mark.parametrize("key", model_keys())
def test_catalogue_entries_state_only_what_differs(key: str):
    """Each file is the schema plus its own lines: a handful, not a copy of every default."""
    from importlib.resources import files

    text = files(CONFIG_MODULE).joinpath("source", f"{key}.yaml").read_text()
    body = [ln for ln in text.splitlines() if ln and not ln.startswith(("#", " ", "defaults"))]
    spec = model_spec(key)
    named = f"model: {spec.model}" if spec.model else f"tfslim: {spec.tfslim}"
    assert body[:2] == [f"key: {key}", named]
    assert len(body) <= 7


def test_paper_targets_are_every_group():
    cfg = compose_with("targets=paper")
    keys = [s.key for s in target_specs(cfg)]
    assert len(keys) == len(set(keys)) == 15
