"""Finished (and failed) run directories to one long table of cells, shards merged.

A run directory is any folder with Hydra's `.hydra/config.yaml`. Its cells come from
`results.csv` when `run.json` says the run completed; otherwise every cell of that run is
`failed`. Shards of one run (same config but `data.shard`) are merged by adding their counts,
which gives exactly the numbers of the unsharded run; a missing or failed shard makes the merged
cells `incomplete`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from tgr_bench.attacks import build_attack
from tgr_bench.errors import UserError

COUNTS = ["n", "n_fooled", "n_clean_correct", "n_fooled_on_correct"]
GROUPS = ("vits", "cnns", "defended")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    complete: bool
    results: pd.DataFrame | None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return "external" if self.config.get("adv_dir") else self.config["source"]["key"]

    @property
    def attack(self) -> str:
        if self.config.get("adv_dir"):
            return "external"
        a = self.config["attack"]
        return f"{a['name']}_patchout" if (a.get("patchout") or {}).get("enabled") else a["name"]


def find_runs(paths: list[str | Path]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist: pass run directories or multirun directories.")
        if (p / ".hydra" / "config.yaml").is_file():
            found.append(p)
        else:
            found += sorted(c.parent.parent for c in p.rglob(".hydra/config.yaml"))
    if not found:
        raise UserError(f"No tgr-bench run directories (with .hydra/config.yaml) under {paths}.")
    return sorted(set(found))


def load_run(path: Path) -> Run:
    config = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=False)
    record_path, results_path = path / "run.json", path / "results.csv"
    complete = False
    if record_path.is_file() and results_path.is_file():
        try:
            complete = json.loads(record_path.read_text()).get("status") == "complete"
        except ValueError:
            complete = False
    results = pd.read_csv(results_path) if complete else None
    run = Run(path, config, complete, results)
    if not config.get("adv_dir"):
        try:
            run.params = build_attack(config["attack"]).params()
        except UserError:
            run.params = {}
    return run


@cache
def target_groups() -> dict[str, str]:
    """Target key -> `vits` / `cnns` / `defended`, read from the shipped targets configs."""
    from hydra import compose, initialize_config_module

    groups = {}
    with initialize_config_module("tgr_bench.conf", version_base="1.3"):
        for group in GROUPS:
            for key in compose("config", overrides=[f"targets={group}"]).targets:
                groups[key] = group
    return groups


def _unsharded(config: dict[str, Any]) -> str:
    data = {k: v for k, v in (config.get("data") or {}).items() if k != "shard"}
    keep = {k: config.get(k) for k in ("source", "attack", "seed", "adv_dir")}
    return json.dumps({**keep, "data": data}, sort_keys=True, default=str)


def cells(runs: list[Run]) -> pd.DataFrame:
    """One row per (source, attack, params, target): counts, metrics, status, run dirs."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_unsharded(run.config), []).append(run)
    rows = []
    for members in groups.values():
        first = members[0]
        num_shards = int((first.config.get("data") or {}).get("num_shards", 1))
        shards = {int((r.config.get("data") or {}).get("shard", 0)) for r in members}
        dirs = ";".join(str(r.path) for r in members)
        base = {
            "source": first.source,
            "attack": first.attack,
            "params": json.dumps(first.params, sort_keys=True),
            "run_dirs": dirs,
        }
        ok = [r for r in members if r.complete]
        if len(ok) < len(members) or shards != set(range(num_shards)):
            status = "failed" if len(ok) < len(members) else "incomplete"
            targets = sorted(
                {t for r in ok for t in r.results.target} | set(first.config.get("targets") or {})
            )
            rows += [{**base, "target": t, "status": status} for t in targets or ["-"]]
            continue
        merged = pd.concat([r.results for r in ok])
        # An evaluation of existing folders (adv_dir) holds one set of rows per folder, each
        # with the source and attack it recorded; a crafting run's rows are all its own.
        external = bool(first.config.get("adv_dir"))
        keys = ["source", "attack", "params", "target"] if external else ["target"]
        for key, part in merged.groupby(keys, sort=False):
            status = "ok" if (part.status == "ok").all() else str(part.status.iloc[0])
            counts = {c: int(part[c].fillna(0).sum()) for c in COUNTS}
            row = {**base, "status": status, **counts, **_metrics(counts)}
            if external:
                source, attack, params, target = key
                row.update(source=source, attack=attack, params=json.dumps({"set": params}))
            else:
                target = key[0] if isinstance(key, tuple) else key
            rows.append({**row, "target": target})
    frame = pd.DataFrame(rows)
    frame["white_box"] = frame.target == frame.source
    frame["group"] = frame.target.map(lambda t: target_groups().get(t, "other"))
    return frame


def _metrics(c: dict[str, int]) -> dict[str, float]:
    def pct(a: int, b: int) -> float:
        return 100.0 * a / b if b else math.nan

    return {
        "asr": pct(c["n_fooled"], c["n"]),
        "clean_acc": pct(c["n_clean_correct"], c["n"]),
        "asr_on_correct": pct(c["n_fooled_on_correct"], c["n_clean_correct"]),
    }


def collect(paths: list[str | Path]) -> pd.DataFrame:
    return cells([load_run(p) for p in find_runs(paths)])
