"""Runs that survive: an exclusive lock on the run directory, a manifest of finished images, and
the check that a finished run needs no work.

The manifest is an append-only JSON-lines file: a header naming what the images were crafted
from (the run's identity plus the hashes of the source weights and of the clean data), then one
line per saved PNG with its sha256, appended only after the PNG was atomically renamed into
place. A re-run skips exactly the images whose line is there and whose file still has that hash;
a line cut short by a kill is ignored, so the worst case is one batch crafted twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tgr_bench.atomic import atomic_write
from tgr_bench.errors import UserError
from tgr_bench.hashing import digest
from tgr_bench.record import IMAGES_DIR, LOCK, MANIFEST, RunRecord


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Refuse a second run writing into the same directory; released even on SIGKILL."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UserError(
                f"Another tgr-bench run (pid {holder}) is writing to {out_dir}. Wait for it to "
                f"finish, or give this run its own directory with hydra.run.dir=..."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def verified(done: dict[str, str], images_dir: Path, stems: list[str]) -> set[str]:
    """Stems listed in `done` (stem -> sha256) whose PNG still has that hash."""
    ok = set()
    for stem in stems:
        digest = done.get(stem)
        path = images_dir / f"{stem}.png"
        if digest and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            ok.add(stem)
    return ok


class Manifest:
    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path = path
        self.identity = identity
        self.digest = digest(identity)
        self.done: dict[str, str] = {}
        self._has_header = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill: that image is crafted again
        if not entries:  # created, then the header write failed (disk full) or was killed
            return
        header = entries[0] if "identity" in entries[0] else None
        if header is None:
            raise UserError(f"{self.path} is not a tgr-bench manifest; move it or the directory.")
        if header["digest"] != self.digest:
            changed = sorted(
                k
                for k in set(header["identity"]) | set(self.identity)
                if json.dumps(header["identity"].get(k), sort_keys=True, default=str)
                != json.dumps(self.identity.get(k), sort_keys=True, default=str)
            )
            raise UserError(
                f"{self.path.parent} holds images crafted with another configuration (differs "
                f"in: {', '.join(changed)}). Resume only with the same settings, or choose "
                f"another directory with hydra.run.dir=..."
            )
        self.done = {e["stem"]: e["sha256"] for e in entries[1:] if "stem" in e and "sha256" in e}
        self._has_header = True

    def verified(self, images_dir: Path, stems: list[str]) -> set[str]:
        """Stems whose PNG is listed and still has the listed hash."""
        return verified(self.done, images_dir, stems)

    @staticmethod
    def entries(path: Path) -> dict[str, str]:
        """stem -> sha256 of a manifest, without checking what it was crafted from."""
        done = {}
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if "stem" in e and "sha256" in e:
                done[e["stem"]] = e["sha256"]
        return done

    def _append(self, *records: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a line cut short is ignored on resume: that image is redone
            raise UserError(
                f"Cannot write {self.path}: {e}. Free disk space and re-run the same command: "
                f"it resumes where it stopped."
            ) from e

    def start(self) -> None:
        """Ready the file for appends: a header if it has none (replacing what a failed first
        write left), and no partial last line, which the next record would otherwise join and
        be lost with."""
        if not self._has_header:
            header = {"identity": self.identity, "digest": self.digest}
            header = json.dumps(header, sort_keys=True, default=str)
            atomic_write(self.path, (header + "\n").encode())
            self._has_header = True
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    def add(self, stem: str, png: bytes) -> None:
        self.add_many([(stem, hashlib.sha256(png).hexdigest())])

    def add_many(self, saved: list[tuple[str, str]]) -> None:
        """Record PNGs already in place, by (stem, sha256 of the file's bytes), with one write
        and one flush to the disk."""
        lines = []
        for stem, sha in saved:
            lines.append({"stem": stem, "sha256": sha})
            self.done[stem] = sha
        self._append(*lines)


def finished(out_dir: Path, config: dict[str, Any], stems: list[str]) -> RunRecord | None:
    """The record of a complete run with exactly this config whose images (if it crafted any)
    are all still there and verified: re-running it is a no-op."""
    try:
        record = RunRecord.load(out_dir)
    except UserError:
        return None
    if record is None or not record.complete or record.config != config:
        return None
    if record.attack is not None:
        done = Manifest.entries(out_dir / MANIFEST)
        if len(verified(done, out_dir / IMAGES_DIR, stems)) != len(stems):
            return None
    return record
