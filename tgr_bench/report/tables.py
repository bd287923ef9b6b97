"""Cells (cells.py) to the paper's layout: per source, one row per attack, one column per target,
averages over black-box ViTs, CNNs and defended models; written as Markdown, LaTeX and CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from tgr_bench.atomic import atomic_write
from tgr_bench.errors import UserError
from tgr_bench.record import DEFENDED
from tgr_bench.report.cells import TARGET_GROUPS, target_groups
from tgr_bench.report.writers import to_csv, to_latex, to_markdown

GROUP_TITLES = {"vits": "ViTs", "cnns": "CNNs", "defended": "defended", "other": "other"}
# The paper's attacks in its order, then the attacks published after it (backward-pass edits,
# then forward-pass changes).
ATTACK_ORDER = (
    *("mi", "vmi", "sgm", "pna", "tgr", "pna_patchout", "tgr_patchout"),
    *("att", "gns", "vdc", "fpr", "ll2s"),
)


def group_title(group: str) -> str:
    """A target group's heading: `ViTs`, ..., or `+jpeg` for the columns under a defense."""
    return GROUP_TITLES.get(group, group)


def heading_order(groups: list[str]) -> list[str]:
    """The paper's groups, then `other`, then each defense as first seen."""
    plain = [g for g in (*TARGET_GROUPS, "other") if g in groups]
    return plain + [g for g in dict.fromkeys(groups) if g not in plain]


def _value_key(value: object) -> tuple:
    return (0, float(value), "") if isinstance(value, int | float) else (1, 0.0, str(value))


def _attack_rank(label: str) -> tuple[int, int]:
    """(the paper's rank of the attack a label starts with, how many modifiers follow it):
    `tgr_di_ti` sorts after `tgr` and `tgr_di`, before `pna_patchout`."""
    for name in sorted(ATTACK_ORDER, key=len, reverse=True):
        if label == name or label.startswith(name + "_"):
            rest = label[len(name) + 1 :]
            return ATTACK_ORDER.index(name), len(rest.split("_")) if rest else 0
    return len(ATTACK_ORDER), 0


def row_order(cells: pd.DataFrame) -> pd.Series:
    """Sort key: source as first seen, the paper's attack order (each attack followed by its
    runs with modifiers, fewest first), then swept values ascending."""
    sources = {s: i for i, s in enumerate(dict.fromkeys(cells.source))}

    def key(row: pd.Series) -> tuple:
        params = json.loads(row.params)
        return (
            sources[row.source],
            *_attack_rank(row.attack),
            row.attack,
            tuple(_value_key(params[k]) for k in sorted(params)),
        )

    return cells.apply(key, axis=1)


def _varying(values: dict[str, dict]) -> list[str]:
    keys = sorted({k for v in values.values() for k in v})
    return [k for k in keys if len({json.dumps(v.get(k)) for v in values.values()}) > 1]


def row_labels(cells: pd.DataFrame) -> pd.Series:
    """`tgr` alone; `tgr k=2` when runs of one attack on one source differ in a parameter;
    `mi [precision=bf16]` or `mi [data.limit=100]` when they differ in anything else."""
    labels = pd.Series(cells.attack, index=cells.index, dtype=object)
    for _, part in cells.groupby(["source", "attack"], sort=False):
        if part.cell.nunique() < 2:
            continue
        params = {p: json.loads(p) for p in part.params.unique()}
        settings = {s: json.loads(s) for s in part.settings.unique()}
        swept, other = _varying(params), _varying(settings)
        for idx in part.index:
            p, s = params[cells.at[idx, "params"]], settings[cells.at[idx, "settings"]]
            label = " ".join([cells.at[idx, "attack"], *(f"{k}={p.get(k)}" for k in swept)])
            if other:
                label += " [" + " ".join(f"{k}={s.get(k)}" for k in other) + "]"
            labels[idx] = label
    return labels


def target_order(cells: pd.DataFrame) -> list[str]:
    """Table columns: the paper's target order, a key's weight-file variants together."""
    known = {t: i for i, t in enumerate(target_groups())}
    present = dict(zip(cells.column, cells.target, strict=True))
    first = {t: i for i, t in enumerate(dict.fromkeys(cells.target))}  # others: as configured
    headings = heading_order(list(cells.group))
    group_of = dict(zip(cells.column, cells.group, strict=True))

    def key(c: str) -> tuple:
        base = present[c].split(DEFENDED)[0]
        return (headings.index(group_of[c]), known.get(base, len(known)), first[present[c]], c)

    return sorted(present, key=key)


def targeted_metric(cells: pd.DataFrame, metric: str) -> tuple[str, str]:
    """(metric, title) for a table: a table of targeted runs reports the targeted success rate
    (prediction == target label); targeted and untargeted runs never share a table."""
    targeted = cells.params.map(lambda p: bool(json.loads(p).get("targeted")))
    if targeted.any() and not targeted.all():

        def dirs(mask: pd.Series) -> str:
            return ", ".join(sorted({d for ds in cells[mask].run_dirs for d in ds.split(";")}))

        raise UserError(
            f"Targeted and untargeted runs cannot share a table (their success rates mean "
            f"different things). Targeted: {dirs(targeted)}. Untargeted: {dirs(~targeted)}. "
            f"Report them separately."
        )
    if metric == "tsr" and not targeted.all():
        raise UserError(
            "--metric tsr is the targeted success rate, and these runs are untargeted: use asr "
            "(the default), asr_on_correct or clean_acc."
        )
    if targeted.all() and metric == "asr":
        return "tsr", "targeted success rate (%): prediction == target label"
    return metric, f"{metric} (%)"


def paper_table(cells: pd.DataFrame, metric: str = "asr") -> pd.DataFrame:
    """Wide table: text cells, index (source, attack label), target columns, then averages."""
    cells = cells.assign(label=row_labels(cells), order=row_order(cells)).sort_values(
        "order", kind="stable"
    )
    targets = target_order(cells)
    groups = heading_order(list(cells.group))
    rows = []
    for (source, label), part in cells.groupby(["source", "label"], sort=False):
        if part.column.duplicated().any():  # two cells, one label: never show one of them
            dup = part[part.column.duplicated(keep=False)]
            raise UserError(
                f"Runs {'; '.join(sorted(set(dup.run_dirs)))} land in one row ({source} / "
                f"{label}) with nothing in their records telling them apart. Report them "
                f"separately."
            )
        by_target = {r.column: r for r in part.itertuples()}
        row: dict[str, object] = {"source": source, "attack": label}
        group_of = dict(zip(cells.column, cells.group, strict=True))
        # The plain targets and their averages, then each defense's columns and its average.
        for block in _blocks(groups):
            for t in (t for t in targets if group_of[t] in block):
                row[t] = _cell(by_target.get(t), metric)
            for g in block:
                row[f"avg {group_title(g)}"] = _average(part, g, metric)
        row["run_dirs"] = ";".join(sorted(set(";".join(part.run_dirs).split(";"))))
        rows.append(row)
    return pd.DataFrame(rows)


def _blocks(groups: list[str]) -> list[list[str]]:
    plain = [g for g in groups if not g.startswith(DEFENDED)]
    return [plain, *([g] for g in groups if g.startswith(DEFENDED))]


def _average(part: pd.DataFrame, group: str, metric: str) -> str:
    """The mean over the black-box targets of `group` that have a number (`(k/m)` when only
    k of its m targets do)."""
    rows = [r for r in part.itertuples() if r.group == group and not r.white_box]
    values = [
        getattr(r, metric) for r in rows if r.status == "ok" and not math.isnan(getattr(r, metric))
    ]
    text = f"{sum(values) / len(values):.1f}" if values else "-"
    if values and len(values) < len(rows):
        text += f" ({len(values)}/{len(rows)})"  # an average over fewer targets
    return text


def _cell(r: object | None, metric: str) -> str:
    if r is None:
        return "-"
    status = r.status
    if status == "ok":
        value = getattr(r, metric)
        text = "-" if math.isnan(value) else f"{value:.1f}"
        return f"{text}*" if r.white_box else text
    return "n/a" if status == "missing checkpoint" else status


NOTES = (
    "Attack success rate (%) = share of all images the target misclassifies (clean mistakes "
    "count, as in the paper). * white-box (source = target), left out of the averages. "
    "n/a: target weights not provided (checkpoint=). failed / incomplete: a run (or a shard of "
    "it) did not finish; see its run directory. `avg X (k/m)`: average over the k of m "
    "black-box targets of group X that have a number. `T+d`: target T under input defense d "
    "(`avg +d`: its average over the black-box targets)."
)


def markdown(table: pd.DataFrame, title: str = "asr (%)") -> str:
    """The title (what the numbers are), the table, what its marks mean, and the run
    directories of every row."""
    shown = table.drop(columns=["run_dirs"])
    sources = "\n".join(f"- {r.source} / {r.attack}: {r.run_dirs}" for r in table.itertuples())
    return f"**{title}**\n\n{to_markdown(shown)}\n{NOTES}\n\nRun directories:\n{sources}\n"


def write_tables(
    cells: pd.DataFrame,
    table: pd.DataFrame,
    out: Path,
    name: str = "table",
    title: str = "asr (%)",
) -> None:
    atomic_write(out / f"{name}.md", markdown(table, title).encode())
    atomic_write(out / f"{name}.tex", to_latex(table.drop(columns=["run_dirs"])).encode())
    atomic_write(out / f"{name}.csv", to_csv(table))
    atomic_write(out / f"{name}_cells.csv", to_csv(cells))
