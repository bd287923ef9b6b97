"""Run directories to loaded run records (and their results when complete)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tgr_bench.errors import UserError
from tgr_bench.metrics import COUNTS
from tgr_bench.record import IMAGES_DIR, RESULTS_CSV, RUN_JSON, TEXT_COLUMNS, RunRecord


@dataclass
class LoadedRun:
    path: Path
    record: RunRecord
    results: pd.DataFrame | None  # complete runs only


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Every directory under `paths` that a tgr-bench command ran in: it holds a run record or
    at least Hydra's record of the command."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist: pass run directories or multirun directories.")
        if (p / RUN_JSON).is_file() or (p / ".hydra" / "config.yaml").is_file():
            found.add(p)
            continue
        found |= {r.parent for r in p.rglob(RUN_JSON)}
        found |= {c.parent.parent for c in p.rglob(".hydra/config.yaml")}
    if not found:
        raise UserError(f"No tgr-bench run directories under {[str(p) for p in paths]}.")
    return sorted(found)


def load_runs(paths: list[str | Path], note: Callable[[str], None]) -> list[LoadedRun]:
    """Loaded runs; a directory whose command failed before its settings were valid (no run
    record) is skipped with one line through `note`."""
    runs = []
    for path in find_run_dirs(paths):
        record = RunRecord.load(path)
        if record is None:
            log = path / "cli.log"
            where = f"; its log: {log}" if log.is_file() else ""
            note(
                f"skipped {path}: no run record (the command failed before its settings were "
                f"valid){where}"
            )
            continue
        results = read_results(path, record) if record.complete else None
        runs.append(LoadedRun(path, record, results))
    if not runs:
        raise UserError(f"No run records (run.json) under {[str(p) for p in paths]}.")
    return runs


def read_results(path: Path, record: RunRecord) -> pd.DataFrame:
    """results.csv of a complete run, with a row for every (adversarial set, target) its record
    lists: a file cut short or edited is an error naming it, never a table with cells missing."""
    csv = path / RESULTS_CSV
    redo = "Re-run the command that made it (it evaluates again), or leave the directory out."
    try:
        results = pd.read_csv(csv, dtype=TEXT_COLUMNS)
    except FileNotFoundError:
        if not record.target_keys:  # crafted with targets=none: re-running evaluates nothing
            raise UserError(
                f"{path} is a craft-only run (targets=none): images, no results. Evaluate them "
                f"with `tgr-bench adv_dir={path / IMAGES_DIR} targets=<group> <its data "
                f"settings>` and report that run, or leave the directory out."
            ) from None
        raise UserError(f"{path} records a complete run but has no {RESULTS_CSV}. {redo}") from None
    except (ValueError, UnicodeDecodeError) as e:  # pandas' empty and parser errors included
        raise UserError(f"{csv} cannot be read ({e}). {redo}") from e
    # What the cells are built from; columns added later (n_target_hit) may be absent.
    needed = ["run_id", "target", "status", *(c for c in COUNTS if c != "n_target_hit")]
    missing = [c for c in needed if c not in results.columns]
    if missing:
        raise UserError(f"{csv} lacks the columns {missing}. {redo}")
    expected = {(s.run_id, t) for s in record.sets for t in record.target_keys}
    lost = expected - set(zip(results.run_id.astype(str), results.target, strict=True))
    if lost:
        targets = sorted({t for _, t in lost})
        raise UserError(
            f"{csv} has no rows for targets {targets} that its run.json lists (a file cut short "
            f"or edited?). {redo}"
        )
    return results
