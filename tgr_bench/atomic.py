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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise UserError(f"Cannot write {path}: {e.strerror or e}. {_fix(e)}.") from e
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def _fix(e: OSError) -> str:
    return {
        errno.ENOSPC: "Free disk space and re-run the same command (it resumes)",
        errno.EDQUOT: "Free some of your disk quota and re-run the same command",
        errno.EACCES: "Make the folder writable, or choose another (hydra.run.dir=, --out)",
        errno.EPERM: "Make the folder writable, or choose another (hydra.run.dir=, --out)",
        errno.EROFS: "The file system is read-only: choose another folder (hydra.run.dir=, --out)",
        errno.ENOTDIR: "A part of the path is a file: choose a folder",
    }.get(e.errno or 0, "Check the folder, or choose another (hydra.run.dir=, --out)")


def writable_folder(path: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written: the nearest
    existing part of `path` must be a folder that accepts new files (`what` names the setting)."""
    path = path.expanduser()
    for p in (path, *path.parents):
        if not p.exists():
            continue
        if not p.is_dir():
            raise UserError(f"{what}={path}: {p} is a file; choose a folder.")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UserError(
                f"{what}={path}: {p} is not writable (permission denied or a read-only mount); "
                f"make it writable, or choose another folder."
            )
        return
