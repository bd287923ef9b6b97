"""tgr-bench: transfer attacks on vision transformers (TGR and its baselines) under one protocol."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tgr-bench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):  # load_model imports torch and timm: only when asked for
    if name == "load_model":
        from tgr_bench.api import load_model

        return load_model
    if name == "load_defense":  # load_defense(name, **settings): the papers' ImageNet defaults
        from tgr_bench.defenses import load_defense

        return load_defense
    raise AttributeError(f"module 'tgr_bench' has no attribute {name!r}")


__all__ = ["__version__", "load_defense", "load_model"]
