"""Every option of every config group composes, and what it composes to is valid: attacks
build, model entries name real timm architectures and tags, targets resolve, data validates.
The declarations are the configs' only defaults."""

from __future__ import annotations

import importlib.util
import re
from importlib.resources import files

import pytest
from omegaconf import OmegaConf

from tgr_bench.attacks import ATTACKS, build_attack
from tgr_bench.attacks.architectures import source_family
from tgr_bench.catalogue import model_keys, model_spec
from tgr_bench.config import CONFIG_MODULE, GROUPS, choices, compose
from tgr_bench.data import DATA_KINDS, data_spec
from tgr_bench.errors import UserError
from tgr_bench.models import ModelSpec, check_model_name
from tgr_bench.plan import resolve
from tgr_bench.schema import defaults
from tgr_bench.settings import RunSettings


def compose_with(*overrides: str):
    cfg = compose(list(overrides))
    if cfg.data.kind == "folder":
        cfg.data.root = "/d"  # required by the folder layout; never read here
    return cfg


def test_the_groups_are_the_documented_ones():
    assert set(choices("attack")) >= {"mi", "vmi", "sgm", "pna", "tgr", "pna_patchout"}
    assert set(choices("targets")) == {
        *("vits", "cnns", "defended", "paper", "smoke", "none"),
        *("transferattack", "modern", "robustbench"),
    }
    assert set(choices("data")) == {"folder", "synthetic", "smoke"}
    assert "schema" not in model_keys() and "vit_base" in model_keys()


def _options() -> list:
    """Every option of every group; the model catalogue's (many, alike) in the slow tier."""
    return [
        pytest.param(g, o, id=f"{g}-{o}", marks=[pytest.mark.slow] if g == "source" else [])
        for g in GROUPS
        for o in choices(g)
    ]


@pytest.mark.parametrize("group,option", _options())
def test_every_option_composes_to_a_valid_run(group: str, option: str):
    robust = option == "robustbench" or option.startswith("rb_")
    if robust and importlib.util.find_spec("robustbench") is None:
        with pytest.raises(UserError, match=re.escape('pip install "tgr-bench[robust]"')):
            spec = resolve(compose_with(f"{group}={option}"), keep=False)
            for model in (spec.source, *spec.targets):
                check_model_name(model)
        return
    cfg = compose_with(f"{group}={option}")
    source = model_spec(cfg.source.key)
    attack = build_attack(cfg.attack, source_family(source.arch), source.key)
    smoke = (group, option) == ("experiment", "smoke")
    assert attack.params()["eps"] == (1.0 if smoke else 16.0)  # the smoke run: 1 level
    check_model_name(source)
    spec = resolve(cfg, keep=False)
    for target in spec.targets:
        check_model_name(target)
        assert target == model_spec(target.key)  # a target entry is its catalogue entry
    data_spec(cfg.data)
    assert len(spec.identity.run_id) == 12


def test_the_declarations_are_the_only_defaults():
    """Hydra composes each declared group to exactly its declared defaults: the yaml files of
    a base choice add nothing but their usage comment."""
    assert OmegaConf.to_container(compose(["attack=mi"]).attack) == defaults(ATTACKS["mi"].Settings)
    for name, cls in ATTACKS.items():
        if name in choices("attack"):
            node = OmegaConf.to_container(compose([f"attack={name}"]).attack)
            assert node == defaults(cls.Settings), name
    for kind, cls in DATA_KINDS.items():
        assert OmegaConf.to_container(compose([f"data={kind}"]).data) == defaults(cls)
    root = OmegaConf.to_container(compose([]))
    assert {k: root[k] for k in defaults(RunSettings)} == defaults(RunSettings)
    assert OmegaConf.to_container(compose(["source=vit_base"]).source) == {
        **defaults(ModelSpec),
        "key": "vit_base",
        "model": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    }


@pytest.mark.parametrize("key", model_keys())
def test_catalogue_entries_state_only_what_differs(key: str):
    """Each file is the declaration plus its own lines: a handful, not a copy of every
    default; a relative (copy_of) states what differs from the entry it builds on."""
    text = files(CONFIG_MODULE).joinpath("source", f"{key}.yaml").read_text()
    body = [ln for ln in text.splitlines() if ln and not ln.startswith(("#", " ", "defaults"))]
    spec = model_spec(key)
    named = f"model: {spec.model}" if spec.model else f"tfslim: {spec.tfslim}"
    if spec.robustbench:
        named = f"robustbench: {spec.robustbench}"
    if spec.copy_of:
        named = f"copy_of: {spec.copy_of}"
    assert body[:2] == [f"key: {key}", named]
    assert len(body) <= 7


def test_paper_targets_are_every_group():
    spec = resolve(compose_with("targets=paper"), keep=False)
    keys = [s.key for s in spec.targets]
    assert len(keys) == len(set(keys)) == 15
