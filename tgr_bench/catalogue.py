"""The packaged configs as data: the options of each config group, and the model catalogue
(`conf/source/<key>.yaml`) as ModelSpecs. Scripts and the Python API read the configs shipped
inside the package (`pkg://tgr_bench.conf`), never a repository path."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from hydra import compose, initialize_config_module

from tgr_bench.errors import UserError
from tgr_bench.models import ModelSpec

CONFIG_MODULE = "tgr_bench.conf"


def choices(group: str) -> list[str]:
    """The options of a config group, e.g. choices("attack") -> ["mi", "pna", ...]."""
    folder = files(CONFIG_MODULE).joinpath(group)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


@cache
def model_keys() -> list[str]:
    return choices("source")


@cache  # the packaged configs do not change while the process runs
def model_spec(key: str) -> ModelSpec:
    """The catalogue entry `key`, with the schema's defaults filled in."""
    if key not in model_keys():
        raise UserError(f"Unknown model key {key!r}; the catalogue has: {', '.join(model_keys())}.")
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return ModelSpec.from_cfg(compose("config", overrides=[f"source={key}"]).source)
