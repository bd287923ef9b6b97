"""The Hydra side of the declared config groups: the configs shipped in the package
(`pkg://tgr_bench.conf`), the declarations stored for them, composing, and each group's options.

Every group's keys and defaults are declared once, as dataclasses (schema.py). They are stored
in Hydra's ConfigStore under `schema/...`, and the yaml files of `conf/` build on them
(`defaults: [/schema/attack/tgr@_here_]`) with only what their choice changes, so a default
never lives in a yaml file and in the code at the same time. Call `register()` (idempotent)
before Hydra composes; every entry point does, through this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib.resources import files

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from tgr_bench.schema import defaults, runtime_keys

CONFIG_MODULE = "tgr_bench.conf"
# The groups a user picks options of, on the command line (`attack=tgr`). `schema` is internal.
GROUPS = ("attack", "source", "targets", "data", "experiment")


@cache
def register() -> None:
    """Store every declared group in Hydra's ConfigStore (once per process)."""
    from tgr_bench.attacks import ATTACKS
    from tgr_bench.data import DATA_KINDS
    from tgr_bench.defenses.settings import defense_defaults
    from tgr_bench.models import ModelSpec
    from tgr_bench.settings import RunSettings
    from tgr_bench.variance.settings import VarianceSettings

    store = ConfigStore.instance()
    store.store(group="schema", name="model", node=defaults(ModelSpec))
    for name, cls in (("run", RunSettings), ("variance", VarianceSettings)):
        store.store(group="schema", name=name, node={**defaults(cls), "hydra": _hydra_job(cls)})
    for kind, cls in DATA_KINDS.items():
        store.store(group="schema/data", name=kind, node=defaults(cls))
    for name, attack in ATTACKS.items():
        store.store(group="schema/attack", name=name, node=defaults(attack.Settings))
    for name, settings in defense_defaults().items():
        store.store(group="schema/defense", name=name, node=settings)


def _hydra_job(cls: type) -> dict:
    """Hydra's job settings derived from the root keys: keys that change no image stay out of
    a sweep job's folder name."""
    exclude = [*runtime_keys(cls), "hydra.run.dir", "hydra.sweep.dir"]
    return {"job": {"config": {"override_dirname": {"exclude_keys": exclude}}}}


def compose(overrides: Sequence[str] = (), name: str = "config") -> DictConfig:
    """The packaged config `name` with `overrides`, as Hydra composes it for a run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose alongside it
        return hydra_compose(name, overrides=list(overrides))
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


def choices(group: str) -> list[str]:
    """The options of a config group, e.g. choices("attack") -> ["mi", "pna", ...]."""
    folder = files(CONFIG_MODULE).joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
