"""A run's own result files: results.csv (long format), results.md, predictions.csv, and the
table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from tgr_bench.atomic import atomic_write
from tgr_bench.metrics import DESCRIPTION, RATES
from tgr_bench.record import (
    PREDICTIONS_CSV,
    RESULT_COLUMNS,
    RESULTS_CSV,
    RESULTS_MD,
    TEXT_COLUMNS,
)
from tgr_bench.report.writers import print_table, to_markdown

# Columns of a target evaluated through a defense (`T+<defense>`), after RESULT_COLUMNS; empty
# on the undefended rows. Abstentions (smoothing) count as not correct and as fooled.
DEFENSE_COLUMNS = [
    "defense", "defense_params", "n_abstained", "n_clean_abstained",
    "abstain_rate", "clean_abstain_rate",
]  # fmt: skip
DEFENSE_NOTE = (
    "A target T+<defense> is T evaluated through that defense (clean_acc and asr both through "
    "it); an abstention of smoothing counts as a wrong answer: not clean-correct, and fooled."
)


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    defended = any(r.get("defense") for r in rows)
    return pd.DataFrame(rows, columns=RESULT_COLUMNS + (DEFENSE_COLUMNS if defended else []))


def _rate(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.1f}"


def text_frame(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Rates with one decimal ('-' when undefined), the white-box flag spelled out."""
    out = df[columns].copy().astype(object)
    for c in columns:
        if c in RATES or c in ("abstain_rate", "clean_abstain_rate"):
            out[c] = df[c].map(_rate)
        elif c == "white_box":
            out[c] = df[c].map(lambda w: "white-box" if w else "")
    return out


def keep_other_weights(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Rows of an earlier evaluation in this run directory that the new one does not replace:
    those of a target evaluated on other weights (another sha256). Evaluating the same images on
    other weights for a key adds rows; it never overwrites the earlier ones."""
    if old.empty or "target_sha256" not in old:
        return old.iloc[0:0]
    replaced = set(zip(new.run_id, new.target, new.target_sha256.fillna(""), strict=True))
    key = zip(old.run_id, old.target, old.target_sha256.fillna(""), strict=True)
    keep = [k not in replaced for k in key]
    if "status" in old:  # a cell that had no weights is superseded, not kept beside
        keep = [k and s == "ok" for k, s in zip(keep, old.status, strict=True)]
    return old[keep]


def write_run_results(df: pd.DataFrame, predictions: pd.DataFrame, out_dir: Path) -> None:
    if (out_dir / RESULTS_CSV).is_file():
        old = pd.read_csv(out_dir / RESULTS_CSV, dtype=TEXT_COLUMNS)
        df = pd.concat([keep_other_weights(old, df), df])
    if (out_dir / PREDICTIONS_CSV).is_file():
        old = pd.read_csv(out_dir / PREDICTIONS_CSV, dtype=TEXT_COLUMNS)
        predictions = pd.concat([keep_other_weights(old, predictions), predictions])
    atomic_write(out_dir / RESULTS_CSV, df.to_csv(index=False, float_format="%.4f").encode())
    note = f"{DESCRIPTION} The white-box row (source = target) is not a transfer result."
    shown = [c for c in RESULT_COLUMNS if c not in ("run_id", "target_sha256")]
    if "defense" in df and df["defense"].notna().any():
        note += f" {DEFENSE_NOTE}"
        shown += ["defense_params", "abstain_rate", "clean_abstain_rate"]
    note += "\n\n"
    atomic_write(out_dir / RESULTS_MD, (note + to_markdown(text_frame(df, shown))).encode())
    atomic_write(out_dir / PREDICTIONS_CSV, predictions.to_csv(index=False).encode())


def print_run_results(df: pd.DataFrame, title: str, console: Console | None = None) -> None:
    shown = df.assign(
        target=[
            f"{t} (white-box)" if w else t for t, w in zip(df.target, df.white_box, strict=True)
        ]
    )
    rates = [r for r in RATES if r != "tsr" or df.tsr.notna().any()]  # tsr: targeted runs only
    if "n_abstained" in df and (df.n_abstained.fillna(0) > 0).any():
        rates.append("abstain_rate")  # smoothing abstained on some image
    print_table(text_frame(shown, ["target", "n", *rates]), title, console)
