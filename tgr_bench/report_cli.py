"""`tgr-bench-report`: aggregate finished runs into the paper's table (and ablation plots).

Usage:
    tgr-bench-report multirun/table1 --out results/table1
    tgr-bench-report multirun/paper --groups cnns,defended --out results/table2
    tgr-bench-report multirun/ablation_k --sweep k --out results/ablation_k
    tgr-bench-report multirun/ablation_components --components --out results/ablation_components
    tgr-bench-report --bench bench_cpu.json bench_h100.json --out results/speed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tgr_bench.aggregate import collect
from tgr_bench.atomic import atomic_write
from tgr_bench.attacks import TGR
from tgr_bench.errors import UserError
from tgr_bench.plots import plot_components, plot_sweep
from tgr_bench.tables import paper_table, write_tables


def bench_markdown(files: list[Path]) -> str:
    """One line per scripts/bench.py result: crafting images/s per attack, tgr/mi, evaluation."""
    lines = [
        "| device | source | batch | precision | crafting images/s | tgr/mi | evaluation "
        "images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in files:
        b = json.loads(f.read_text())
        craft = ", ".join(f"{a} {v['images_per_s']:.2f}" for a, v in b["crafting"].items())
        ev = ", ".join(f"{t} {v['images_per_s']:.1f}" for t, v in b.get("evaluation", {}).items())
        ratio = f"{b['tgr_over_mi']:.3f}" if "tgr_over_mi" in b else "-"
        lines.append(
            f"| {b['device']} | {b['source']} | {b['batch_size']} | {b['precision']} | "
            f"{craft} | {ratio} | {ev or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="tgr-bench-report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="*", help="run directories or multirun directories")
    p.add_argument("--bench", nargs="+", type=Path, help="scripts/bench.py JSON files to tabulate")
    p.add_argument("--out", type=Path, help="write <name>.md/.tex/.csv (and plots) here")
    p.add_argument("--name", default="table", help="file name stem (default: table)")
    p.add_argument("--metric", default="asr", choices=["asr", "asr_on_correct", "clean_acc"])
    p.add_argument("--groups", help="only these target groups, e.g. vits or cnns,defended")
    p.add_argument("--sweep", metavar="PARAM", help="also plot the success rate against PARAM")
    p.add_argument("--components", action="store_true", help="also plot the component ablation")
    args = p.parse_args(argv)
    console = Console()
    if args.bench:
        text = bench_markdown(args.bench)
        console.print(text)
        if args.out:
            atomic_write(args.out / "bench.md", text.encode())
        if not args.paths:
            return
    if not args.paths:
        p.error("give run directories, or --bench files")
    try:
        cells = collect(args.paths)
        if args.groups:
            keep = set(args.groups.split(",")) | {"other"}
            cells = cells[cells.group.isin(keep) | (cells.target == "-")]
        table = paper_table(cells, args.metric)
    except UserError as e:
        print(f"tgr-bench-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    shown = Table(title=f"{args.metric} (%), * = white-box")
    cols = [c for c in table.columns if c != "run_dirs"]
    for c in cols:
        shown.add_column(c, justify="left" if c in ("source", "attack") else "right")
    for values in table[cols].astype(str).values.tolist():
        shown.add_row(*values)
    console.print(shown)
    if args.out:
        write_tables(cells, table, args.out, args.name)
        written = [args.out / f"{args.name}.{e}" for e in ("md", "tex", "csv")]
        if args.sweep:
            default = getattr(TGR(), args.sweep, None)
            written += plot_sweep(cells, args.sweep, args.out, default, args.metric)
        if args.components:
            written += plot_components(cells, args.out, args.metric)
        console.print("wrote " + ", ".join(str(w) for w in written))


if __name__ == "__main__":
    main()
