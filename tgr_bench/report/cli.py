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

import pandas as pd
from rich.console import Console

from tgr_bench.atomic import atomic_write
from tgr_bench.errors import UserError
from tgr_bench.report.cells import collect
from tgr_bench.report.plots import plot_components, plot_sweep
from tgr_bench.report.tables import paper_table, targeted_metric, write_tables
from tgr_bench.report.writers import print_table, to_markdown


def bench_markdown(files: list[Path]) -> str:
    """One line per scripts/bench.py result: crafting images/s per attack, tgr/mi, evaluation."""
    rows = []
    for f in files:
        b = json.loads(f.read_text())
        craft = ", ".join(f"{a} {v['images_per_s']:.2f}" for a, v in b["crafting"].items())
        ev = ", ".join(f"{t} {v['images_per_s']:.1f}" for t, v in b.get("evaluation", {}).items())
        rows.append(
            {
                "device": b["device"],
                "source": b["source"],
                "batch": b["batch_size"],
                "precision": b["precision"],
                "crafting images/s": craft,
                "tgr/mi": f"{b['tgr_over_mi']:.3f}" if "tgr_over_mi" in b else "-",
                "evaluation images/s": ev or "-",
            }
        )
    return to_markdown(pd.DataFrame(rows))


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
    p.add_argument(
        "--metric",
        default="asr",
        choices=["asr", "asr_on_correct", "clean_acc", "tsr"],
        help="asr (default; targeted runs: tsr, the targeted success rate)",
    )
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
        cells = collect(args.paths, note=lambda line: console.print(line, highlight=False))
        if args.groups:
            keep = set(args.groups.split(",")) | {"other"}
            cells = cells[cells.group.isin(keep) | (cells.target == "-")]
        metric, title = targeted_metric(cells, args.metric)
        table = paper_table(cells, metric)
    except UserError as e:
        print(f"tgr-bench-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print_table(table.drop(columns=["run_dirs"]), f"{title}, * = white-box", console)
    if args.out:
        write_tables(cells, table, args.out, args.name, title)
        written = [args.out / f"{args.name}.{e}" for e in ("md", "tex", "csv")]
        if args.sweep:
            written += plot_sweep(cells, args.sweep, args.out, metric)
        if args.components:
            written += plot_components(cells, args.out, metric)
        console.print("wrote " + ", ".join(str(w) for w in written))


if __name__ == "__main__":
    main()
