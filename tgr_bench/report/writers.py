"""One writer per format for tables of text cells: Markdown, LaTeX, CSV and the terminal."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

LEFT = ("source", "attack", "target")  # text columns; everything else is right-aligned


def _rows(frame: pd.DataFrame) -> list[list[str]]:
    return [["-" if pd.isna(v) else str(v) for v in row] for row in frame.itertuples(index=False)]


def to_markdown(frame: pd.DataFrame) -> str:
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(values) + " |" for values in _rows(frame)]
    return "\n".join(lines) + "\n"


def _tex(text: object) -> str:
    return str(text).replace("_", r"\_").replace("%", r"\%").replace("*", r"$^*$")


def to_latex(frame: pd.DataFrame) -> str:
    """A booktabs tabular; a rule between groups of rows that differ in the first column."""
    cols = list(frame.columns)
    text_cols = sum(1 for c in cols if c in LEFT)
    lines = [
        r"\begin{tabular}{" + "l" * text_cols + "r" * (len(cols) - text_cols) + "}",
        r"\toprule",
        " & ".join(_tex(c) for c in cols) + r" \\",
        r"\midrule",
    ]
    previous = None
    for values in _rows(frame):
        if previous is not None and values[0] != previous:
            lines.append(r"\midrule")
        previous = values[0]
        lines.append(" & ".join(_tex(v) for v in values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def to_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def print_table(frame: pd.DataFrame, title: str, console: Console | None = None) -> None:
    # Text, not markup: a label such as `mi [data.n=32 seed=0]` prints as it is.
    table = Table(title=Text(title))
    for c in frame.columns:
        table.add_column(Text(str(c)), justify="left" if c in LEFT else "right")
    for values in _rows(frame):
        table.add_row(*(Text(v) for v in values))
    (console or Console()).print(table)
