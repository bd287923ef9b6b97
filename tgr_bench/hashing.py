"""The two hashes tgr-bench computes: of a JSON-able value (identities, cache keys, sweep
folders) and of a file's bytes (weights, images)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def digest(content: Any) -> str:
    """sha256 of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
