"""The model catalogue (`conf/source/<key>.yaml`) as ModelSpecs. Scripts and the Python API read
the configs shipped inside the package, never a repository path."""

from __future__ import annotations

from functools import cache

from tgr_bench.config import choices, compose
from tgr_bench.errors import UserError
from tgr_bench.models import ModelSpec


@cache
def model_keys() -> list[str]:
    return choices("source")


@cache  # the packaged configs do not change while the process runs
def model_spec(key: str) -> ModelSpec:
    """The catalogue entry `key`, with the declared defaults filled in."""
    if key not in model_keys():
        raise UserError(f"Unknown model key {key!r}; the catalogue has: {', '.join(model_keys())}.")
    return ModelSpec.of(compose([f"source={key}"]).source)
