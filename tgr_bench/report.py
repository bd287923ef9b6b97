"""Per-run result files (results.csv in long format, results.md) and the terminal table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from tgr_bench.atomic import atomic_write

COLUMNS = [
    "source",
    "attack",
    "params",
    "target",
    "target_model",
    "white_box",
    "n",
    "asr",
    "clean_acc",
    "asr_on_correct",
    "n_fooled",
    "n_clean_correct",
    "n_fooled_on_correct",
    "status",
]


def format_params(params: dict[str, Any]) -> str:
    """A stable, readable key for an attack's hyper-parameters: `alpha=1.6 decay=1.0 ...`."""
    return " ".join(
        f"{k}={json.dumps(v) if isinstance(v, list | dict) else v}"
        for k, v in sorted(params.items())
    )


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, sep]
    for row in df.itertuples(index=False):
        cells = []
        for col, value in zip(COLUMNS, row, strict=True):
            if col in ("asr", "clean_acc", "asr_on_correct"):
                cells.append("-" if pd.isna(value) else f"{value:.1f}")
            elif col == "white_box":
                cells.append("white-box" if value else "")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(df: pd.DataFrame, out_dir: Path) -> None:
    atomic_write(out_dir / "results.csv", df.to_csv(index=False, float_format="%.4f").encode())
    note = (
        "Attack success rate (asr) = % of all images the target misclassifies (clean mistakes "
        "count, as in the paper); asr_on_correct = % over the images the target got right when "
        "clean. The white-box row (source = target) is not a transfer result.\n\n"
    )
    atomic_write(out_dir / "results.md", (note + to_markdown(df)).encode())


def print_table(df: pd.DataFrame, title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for col in ("target", "n", "asr", "clean_acc", "asr_on_correct"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for row in df.itertuples(index=False):
        name = f"{row.target} (white-box)" if row.white_box else row.target
        fmt = [
            ("-" if pd.isna(v) else f"{v:.1f}")
            for v in (row.asr, row.clean_acc, row.asr_on_correct)
        ]
        table.add_row(name, str(row.n), *fmt)
    (console or Console()).print(table)
