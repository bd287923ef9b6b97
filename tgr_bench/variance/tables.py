"""Per-image values -> the long table (variance.csv), the paper-style tables (variance.md/.tex,
rows: attacks, columns: block depths and their mean) and the plot against depth (variance.png).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from tgr_bench.atomic import atomic_write  # noqa: E402
from tgr_bench.report.writers import to_csv, to_latex, to_markdown  # noqa: E402

STATISTICS = ("scale_free_var", "raw_var", "input_cos")
BLOCK_STATISTICS = STATISTICS[:2]
INPUT_BLOCK = -1  # the block index of input_cos: the image, before the first block
COLUMNS = ["attack", "block", "block_name", "statistic", "mean", "ci95", "n"]
TITLES = {
    "scale_free_var": "Scale-free variance of the gradient at each block's output",
    "raw_var": "Raw variance of the gradient at each block's output",
    "input_cos": "Cosine similarity of successive input gradients",
}
FILES = ("variance.csv", "variance.md", "variance.tex", "variance.png")


def mean_ci(values: torch.Tensor) -> tuple[float, float, int]:
    """Mean over images (the last dim), the half-width 1.96 sd / sqrt(n) of its 95% interval
    (sd with ddof 1; n = 1 gives 0: no spread to estimate) and n."""
    v = values.double()
    n = v.shape[-1]
    sd = v.std(correction=1).item() if n > 1 else 0.0
    return v.mean().item(), 1.96 * sd / math.sqrt(n), n


def long_frame(
    per_image: Mapping[str, Mapping[str, torch.Tensor | None]], block_names: Sequence[str]
) -> pd.DataFrame:
    """variance.csv: one row per (attack, block, statistic). `per_image[attack][statistic]` is
    (blocks, images) for the block statistics, (images,) or None for input_cos."""
    rows = []
    for attack, values in per_image.items():
        for statistic in BLOCK_STATISTICS:
            for b, name in enumerate(block_names):
                rows.append((attack, b, name, statistic, *mean_ci(values[statistic][b])))
        cos = values.get("input_cos")
        if cos is not None:
            rows.append((attack, INPUT_BLOCK, "input", "input_cos", *mean_ci(cos)))
    return pd.DataFrame(rows, columns=COLUMNS)


def _fmt(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.4g}"


def wide(frame: pd.DataFrame, statistic: str) -> pd.DataFrame:
    """Rows: attacks (in run order); columns: the blocks (0 = first) and `mean`, the mean over
    blocks (every block has the same images, so it is also the mean of the per-image
    averages over blocks)."""
    part = frame[frame.statistic == statistic]
    table = part.pivot(index="attack", columns="block", values="mean")
    table = table.loc[list(dict.fromkeys(part.attack))]
    table["mean"] = table.mean(axis=1)
    out = table.map(_fmt).reset_index()
    out.columns = ["attack", *(str(c) for c in table.columns)]
    return out


def cosine_table(frame: pd.DataFrame) -> pd.DataFrame:
    part = frame[frame.statistic == "input_cos"]
    return pd.DataFrame(
        {
            "attack": part.attack,
            "input_cos": part["mean"].map(_fmt),
            "ci95": part.ci95.map(_fmt),
            "n": part.n,
        }
    )


def markdown(frame: pd.DataFrame, title: str) -> str:
    n = int(frame.n.max()) if len(frame) else 0
    parts = [f"# {title}\n", f"Means over {n} images; blocks numbered from 0 (the first).\n"]
    for statistic in BLOCK_STATISTICS:
        parts += [f"## {TITLES[statistic]}\n", to_markdown(wide(frame, statistic))]
    if (frame.statistic == "input_cos").any():
        parts += [f"## {TITLES['input_cos']}\n", to_markdown(cosine_table(frame))]
    return "\n".join(parts)


def latex(frame: pd.DataFrame) -> str:
    parts = []
    for statistic in BLOCK_STATISTICS:
        parts += [
            f"% {TITLES[statistic]} (columns: block; mean over blocks)",
            to_latex(wide(frame, statistic)),
        ]
    if (frame.statistic == "input_cos").any():
        parts += [f"% {TITLES['input_cos']}", to_latex(cosine_table(frame))]
    return "\n".join(parts)


def plot(frame: pd.DataFrame, title: str) -> bytes:
    """Scale-free variance against depth, one line per attack, with its 95% band."""
    part = frame[frame.statistic == "scale_free_var"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for attack, line in part.groupby("attack", sort=False):
        line = line.sort_values("block")
        ax.plot(line.block, line["mean"], marker="o", markersize=3, label=attack)
        ax.fill_between(
            line.block, line["mean"] - line.ci95, line["mean"] + line.ci95, alpha=0.2, lw=0
        )
    low, high = part["mean"].min(), part["mean"].max()
    if len(part) and low > 0 and high / low >= 20:
        ax.set_yscale("log")
    ax.set_xlabel("block (0 = first)")
    ax.set_ylabel("scale-free gradient variance")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_all(frame: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """variance.csv, .md, .tex and .png in `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "variance.csv": to_csv(frame),
        "variance.md": markdown(frame, title).encode(),
        "variance.tex": latex(frame).encode(),
        "variance.png": plot(frame, title),
    }
    for name, data in contents.items():
        atomic_write(out_dir / name, data)
    return [out_dir / name for name in contents]
