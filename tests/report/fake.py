"""Run directories as tgr-bench leaves them, written with the real record types: the report reads
exactly what a run writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from tgr_bench import metrics
from tgr_bench.record import (
    IMAGES_DIR,
    RESULT_COLUMNS,
    RESULTS_CSV,
    AdvSetInfo,
    DataInfo,
    Identity,
    RunRecord,
    format_params,
)

LOOP = {"eps": 16.0, "steps": 10, "alpha": 1.6, "decay": 1.0}
DEFAULTS = {"mi": LOOP, "pna": LOOP, "tgr": {**LOOP, "k": 1, "components": "attn+qkv+mlp"}}
DATA = {"kind": "folder", "root": "/data/tgr1000", "limit": None}


def identity(
    source: str,
    attack: str,
    params: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> Identity:
    return Identity(
        source={"key": source, "model": f"{source}.tag", "checkpoint": None},
        attack=attack,
        params={**LOOP, **(params or {})},
        data={**DATA, **(data or {})},
        seed=seed,
        precision=precision,
        shard=shard,
    )


def ok(target: str, fooled: int, n: int = 10, correct: int | None = None) -> tuple:
    return (target, n, fooled, n if correct is None else correct, fooled, "ok")


def fake_run(
    root: Path,
    name: str,
    ident: Identity,
    results: list[tuple] | None,
    status: str = "complete",
    targets: list[str] | None = None,
    sha: str = "a" * 64,
    pool: str | None = None,
) -> Path:
    """A crafting run directory; `results` None: the run stopped before writing results."""
    d = root / name
    d.mkdir(parents=True)
    info = AdvSetInfo(
        run_id=ident.run_id,
        folder=str(d / IMAGES_DIR),
        source=ident.source["key"],
        attack=ident.attack,
        params=ident.params,
        identity=ident,
        defaults=DEFAULTS.get(ident.attack, LOOP),
    )
    record = RunRecord(
        identity=ident,
        config={"seed": ident.seed},
        started="2026-01-01T00:00:00+00:00",
        status=status if results is not None else ("failed" if status == "complete" else status),
        data=DataInfo(
            root="/data/tgr1000", layout="json", n_images=10, sha256="0" * 64, pool_sha256=pool
        ),
        attack={"label": ident.attack, "params": ident.params, "defaults": info.defaults},
        target_keys=targets or [r[0] for r in results or []],
        sets=[info],
    )
    record.save(d)
    if results is not None:
        rows = []
        for target, n, fooled, correct, fooled_correct, st in results:
            c = {"n": n, "n_fooled": fooled, "n_clean_correct": correct}
            c["n_fooled_on_correct"] = fooled_correct
            rows.append(
                {
                    "run_id": info.run_id,
                    "source": info.source,
                    "attack": info.attack,
                    "params": format_params(info.params),
                    "target": target,
                    "target_model": f"{target}.tag",
                    "target_weights": "hub",
                    "target_sha256": sha,
                    "white_box": target == info.source,
                    "status": st,
                    **c,
                    **metrics.rates(c),
                }
            )
        pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(d / RESULTS_CSV, index=False)
    return d
