"""Atomic file writes: a file either has its complete new content or does not exist."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from tgr_bench.errors import UserError


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write via a temporary file and a rename. `durable` also flushes the data to the disk
    before the rename (records and results); files whose hash is checked on every resume may
    skip it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        fix = {
            errno.ENOSPC: "Free disk space and re-run the same command (it resumes)",
            errno.EDQUOT: "Free some of your disk quota and re-run the same command",
            errno.EACCES: "Make the folder writable or choose another with hydra.run.dir=",
            errno.EROFS: "The file system is read-only: choose another folder with hydra.run.dir=",
        }.get(e.errno, "Check the folder, or choose another with hydra.run.dir=")
        raise UserError(f"Cannot write {path}: {e}. {fix}.") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
