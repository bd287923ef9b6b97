"""tgr-bench: transfer attacks on vision transformers (TGR and its baselines) under one protocol."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tgr-bench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
