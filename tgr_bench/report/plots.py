"""Ablation plots: success rate against a swept value (k), and the component ablation."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from tgr_bench.atomic import atomic_write  # noqa: E402
from tgr_bench.report.tables import group_title  # noqa: E402


def group_averages(cells: pd.DataFrame, metric: str = "asr") -> pd.DataFrame:
    """Mean black-box success rate per (source, params, settings, group): runs that differ in
    anything are never averaged together."""
    ok = cells[(cells.status == "ok") & ~cells.white_box]
    keys = ["source", "params", "settings", "group"]
    return ok.groupby(keys, sort=False)[metric].mean().reset_index()


def apart(avg: pd.DataFrame, shown: str) -> pd.Series:
    """What tells rows apart besides the dimension `shown` (a parameter): `` when nothing
    does, else ` [k=2 seed=1]`, per source."""
    suffix = pd.Series("", index=avg.index, dtype=object)
    for _, part in avg.groupby("source", sort=False):
        params = part.params.map(lambda p: {k: v for k, v in json.loads(p).items() if k != shown})
        both = [{**p, **json.loads(s)} for p, s in zip(params, part.settings, strict=True)]
        keys = sorted({k for d in both for k in d})
        varying = [k for k in keys if len({json.dumps(d.get(k)) for d in both}) > 1]
        for idx, d in zip(part.index, both, strict=True):
            if varying:
                suffix[idx] = " [" + " ".join(f"{k}={d.get(k)}" for k in varying) + "]"
    return suffix


def _save(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150, bbox_inches="tight")
        atomic_write(out / f"{name}.{ext}", buf.getvalue())
        paths.append(out / f"{name}.{ext}")
    plt.close(fig)
    return paths


def recorded_default(cells: pd.DataFrame, param: str) -> object:
    """The attack's default value of `param`, as the runs recorded it (None when they disagree
    or do not record it)."""
    values = {json.dumps(json.loads(d).get(param)) for d in cells.defaults.dropna()}
    return json.loads(values.pop()) if len(values) == 1 else None


def plot_sweep(cells: pd.DataFrame, param: str, out: Path, metric: str = "asr") -> list[Path]:
    default = recorded_default(cells[cells.params.map(lambda p: param in json.loads(p))], param)
    avg = group_averages(cells, metric)
    avg["value"] = avg.params.map(lambda p: json.loads(p).get(param))
    avg = avg[avg.value.notna()]  # runs without this parameter (e.g. the MI baseline)
    avg["apart"] = apart(avg, param)
    sources = list(dict.fromkeys(avg.source))
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4), squeeze=False)
    for ax, source in zip(axes[0], sources, strict=True):
        part = avg[avg.source == source].sort_values("value")
        for (group, other), line in part.groupby(["group", "apart"], sort=False):
            label = f"avg {group_title(group)}{other}"
            ax.plot(line.value, line[metric], marker="o", label=label)
        if default is not None:
            ax.axvline(default, color="grey", linestyle="--", label=f"default {param}={default}")
        if part.value.min() > 0 and part.value.max() / max(part.value.min(), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(part.value.unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(0, 102)
        ax.set(title=f"source {source}", xlabel=param, ylabel=f"{metric} (%) on black-box targets")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out, f"sweep_{param}")


def plot_components(cells: pd.DataFrame, out: Path, metric: str = "asr") -> list[Path]:
    avg = group_averages(cells, metric)
    avg["components"] = avg.params.map(lambda p: json.loads(p).get("components", "-"))
    avg["components"] += apart(avg, "components")  # other differences: bars of their own
    sources = list(dict.fromkeys(avg.source))
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4), squeeze=False)
    for ax, source in zip(axes[0], sources, strict=True):
        table = avg[avg.source == source].pivot_table(
            index="components", columns="group", values=metric, sort=False
        )
        order = sorted(table.index, key=lambda c: (c.split(" ")[0].count("+"), c))
        table = table.loc[order]
        width = 0.8 / max(1, len(table.columns))
        for i, group in enumerate(table.columns):
            xs = [j + i * width for j in range(len(table))]
            bars = ax.bar(xs, table[group], width, label=f"avg {group_title(group)}")
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + width * (len(table.columns) - 1) / 2 for j in range(len(table))])
        ax.set_xticklabels(table.index, rotation=20)
        ymax = table.max().max()
        ax.set_ylim(0, 105 if math.isnan(ymax) else min(105, ymax * 1.15 + 1))
        ax.set(
            title=f"TGR components, source {source} (paper: attn+qkv+mlp)",
            ylabel=f"{metric} (%) on black-box targets",
        )
        ax.legend()
    return _save(fig, out, "components")
