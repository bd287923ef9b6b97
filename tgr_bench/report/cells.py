"""Loaded runs to one long table of cells: one row per (identity without shard, target).

A cell is one identity (record.py): shards of one identity are merged by adding their counts,
which gives exactly the numbers of the unsharded run; a missing or failed shard makes the cell
`incomplete` / `failed`. Runs that differ in anything (data, precision, seed, weights) are
different cells, labelled by what differs (tables.py). The same images reported twice (a copied
run directory, or a run together with an evaluation of its own folder) are refused, naming both
directories: one must never silently replace the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from tgr_bench.errors import UserError
from tgr_bench.metrics import COUNTS, RATES, rates
from tgr_bench.record import DEFENDED, AdvSetInfo, Identity
from tgr_bench.report.runs import LoadedRun, load_runs

TARGET_GROUPS = ("vits", "cnns", "defended")  # the targets= options the tables group by
TARGET_WEIGHTS = ("target_sha256", "target_weights")  # which weight file a target's cell used


@cache
def target_groups() -> dict[str, str]:
    """Target key -> `vits` / `cnns` / `defended`, read from the shipped targets configs."""
    from tgr_bench.config import compose

    return {key: g for g in TARGET_GROUPS for key in compose([f"targets={g}"]).targets}


def settings(identity: Identity | None, info: AdvSetInfo) -> dict[str, Any]:
    """Everything but the attack's parameters that tells two cells of one attack apart, flat,
    for row labels: `data.limit`, `precision`, `seed`, `source.checkpoint`, ..."""
    if identity is None:
        return {"adv_dir": info.folder}
    flat: dict[str, Any] = {"precision": identity.precision, "seed": identity.seed}
    flat |= {f"data.{k}": v for k, v in identity.data.items()}
    flat |= {f"source.{k}": v for k, v in (identity.source or {}).items() if k != "key"}
    return flat


def _units(run: LoadedRun) -> list[dict[str, Any]]:
    """One entry per (set, target) of a run; placeholders for a run that did not complete."""
    rec = run.record
    base_of = {}
    for info in rec.sets:
        ident = info.identity
        base_of[info.run_id] = {
            "source": info.source,
            "attack": info.attack,
            "params": json.dumps(info.params, sort_keys=True, default=str),
            "settings": json.dumps(settings(ident, info), sort_keys=True, default=str),
            "defaults": json.dumps(info.defaults, sort_keys=True, default=str),
            "cell": ident.cell() if ident else info.run_id,
            "shard": ident.shard if ident else None,
            "run_dir": str(run.path),
            # Admix: shards merge only if they mixed in the same pool of clean images.
            "pool": rec.data.pool_sha256 if rec.data and ident == rec.identity else None,
        }
    if not rec.complete:
        status = "failed" if rec.status == "failed" else "incomplete"
        return [
            {**base, "target": t, "status": status}
            for base in base_of.values()
            for t in rec.target_keys or ["-"]
        ]
    if run.results is None:
        return []
    units = []
    for row in run.results.to_dict("records"):
        base = base_of.get(str(row["run_id"]))
        if base is None:
            raise UserError(
                f"{run.path}: results.csv names run_id {row['run_id']!r}, which its run.json "
                f"does not record. Re-run the command that made this directory."
            )
        units.append(
            {
                **base,
                "target": row["target"],
                **{k: row[k] if pd.notna(row[k]) else None for k in TARGET_WEIGHTS},
                "status": row["status"],
                **{c: _count(row, c) for c in COUNTS},
            }
        )
    return units


def _count(row: dict[str, Any], column: str) -> int | None:
    """A count of results.csv; None where a set has none (n_target_hit of untargeted runs)."""
    value = row.get(column)
    if value is None or pd.isna(value):
        return None if column == "n_target_hit" else 0
    return int(value)


def _sum(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def _merge(members: list[dict[str, Any]], note: Callable[[str], None]) -> dict[str, Any]:
    """One cell from the units of one (cell, target): shards added, collisions refused."""
    pools = {u["pool"]: u["run_dir"] for u in members if u.get("pool")}
    if len(pools) > 1:
        a, b = list(pools.values())[:2]
        raise UserError(
            f"The shards of {members[0]['source']} / {members[0]['attack']} in {a} and {b} mixed "
            f"in different pools of clean images (attack.admix draws partners from the whole "
            f"data set, and it changed between them), so they are not parts of one run. Re-run "
            f"the older shards on the current data."
        )
    by_shard: dict[Any, dict[str, Any]] = {}
    for u in members:
        key = tuple(u["shard"]) if u["shard"] else None
        other = by_shard.get(key)
        if other is None:
            by_shard[key] = u
            continue
        done = [m for m in (other, u) if m["status"] not in ("failed", "incomplete")]
        if len(done) == 2:
            what = f"shard {key[0]} of {key[1]}" if key else "the same adversarial images"
            raise UserError(
                f"Two run directories hold results for {what} ({u['source']} / {u['attack']}) "
                f"on target {u['target']}: {other['run_dir']} and {u['run_dir']}. The report "
                f"never lets one replace the other: pass only one of them (a copied run "
                f"directory, or a run together with an evaluation of its own images folder)."
            )
        keep = done[0] if done else other
        dropped = u if keep is other else other
        note(
            f"note: {dropped['run_dir']} ({dropped['status']}) is superseded by "
            f"{keep['run_dir']} for {u['source']} / {u['attack']} on {u['target']}"
        )
        by_shard[key] = keep
    first = members[0]
    num_shards = first["shard"][1] if first["shard"] else 1
    present = {k[0] if k else 0 for k in by_shard}
    units = list(by_shard.values())
    statuses = {u["status"] for u in units}
    cell = {k: first[k] for k in ("source", "attack", "params", "settings", "defaults", "cell")}
    cell["target"] = first["target"]
    cell["run_dirs"] = ";".join(sorted({u["run_dir"] for u in units}))
    shas = {u.get("target_sha256") for u in units if u.get("target_sha256")}
    cell["target_sha256"] = ";".join(sorted(shas)) if shas else None
    kinds = {u.get("target_weights") for u in units if u.get("target_weights")}
    cell["target_weights"] = ";".join(sorted(kinds)) if kinds else None
    if statuses & {"failed", "incomplete"} or present != set(range(num_shards)):
        cell["status"] = "failed" if "failed" in statuses else "incomplete"
        return cell
    if statuses != {"ok"}:
        cell["status"] = sorted(statuses - {"ok"})[0]  # e.g. missing checkpoint
        return cell
    total = {c: _sum([u[c] for u in units]) for c in COUNTS}
    return {**cell, "status": "ok", **total, **rates(total)}


def _by_weights(members: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The units of one (cell, target), split by the target's weight file: results on other
    weights are other cells. A run that did not finish (no weights known) joins each part."""
    shas = sorted({u["target_sha256"] for u in members if u.get("target_sha256")})
    if len(shas) < 2:
        return [members]
    unknown = [u for u in members if not u.get("target_sha256")]
    return [[u for u in members if u.get("target_sha256") == s] + unknown for s in shas]


def _columns(frame: pd.DataFrame) -> pd.Series:
    """The table column of each cell: the target key, or `key [kind sha]` when the cells of one
    key come from more than one weight file (a column never mixes two files unannounced)."""
    column = frame.target.astype(object).copy()
    for target, part in frame.groupby("target", sort=False):
        files = {s for s in part.target_sha256.dropna() if s}
        if len(files) < 2:
            continue
        for idx in part.index:
            sha = frame.at[idx, "target_sha256"]
            if isinstance(sha, str) and sha:
                kind = frame.at[idx, "target_weights"] or "weights"
                column[idx] = f"{target} [{kind} {sha[:8]}]"
    return column


def cells(runs: list[LoadedRun], note: Callable[[str], None] = print) -> pd.DataFrame:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        for u in _units(run):
            groups.setdefault((u["cell"], u["target"]), []).append(u)
    merged = [_merge(part, note) for members in groups.values() for part in _by_weights(members)]
    frame = pd.DataFrame(merged)
    for c in (*COUNTS, *RATES, "target_sha256", "target_weights"):
        if c not in frame:
            frame[c] = None if c.startswith("target_") else float("nan")
    # `T+d` is target T under defense d: white-box when T is the source; its heading is the
    # defense's, so each defense gets an average of its own.
    base = frame.target.map(lambda t: str(t).split(DEFENDED)[0])
    frame["white_box"] = base == frame.source
    frame["base_group"] = base.map(lambda t: target_groups().get(t, "other"))
    defended = frame.target.map(lambda t: DEFENDED in str(t))
    frame["group"] = frame.base_group.where(
        ~defended, frame.target.map(lambda t: DEFENDED + str(t).split(DEFENDED, 1)[-1])
    )
    frame["column"] = _columns(frame)
    return frame


def collect(paths: list[str | Path], note: Callable[[str], None] = print) -> pd.DataFrame:
    return cells(load_runs(paths, note), note)
