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
from pathlib import Path

import pandas as pd
from rich.console import Console

from tgr_bench.atomic import atomic_write, writable_folder
from tgr_bench.entry import main_of
from tgr_bench.errors import UserError
from tgr_bench.report.cells import collect
from tgr_bench.report.plots import plot_components, plot_sweep
from tgr_bench.report.tables import GROUP_TITLES, paper_table, targeted_metric, write_tables
from tgr_bench.report.writers import print_table, to_markdown


def bench_markdown(files: list[Path]) -> str:
    """One line per scripts/bench.py result: crafting images/s per attack, tgr/mi, evaluation."""
    rows = []
    for f in files:
        try:
            b = json.loads(f.read_text())
            if not isinstance(b, dict) or not isinstance(b.get("crafting"), dict):
                raise ValueError("no 'crafting' section")
        except (OSError, ValueError) as e:
            raise UserError(
                f"--bench {f}: not a scripts/bench.py JSON result ({e}). Pass the file that "
                f"`python scripts/bench.py ... --json FILE` wrote."
            ) from None
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
    main_of("tgr-bench-report", lambda: report(args, p))


def report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every input checked before anything is written: no output folder holds half a report."""
    console = Console()
    if args.out is not None:
        writable_folder(args.out, "--out")
    if args.bench:
        text = bench_markdown(args.bench)
        console.print(text)
        if args.out:
            atomic_write(args.out / "bench.md", text.encode())
        if not args.paths:
            return
    if not args.paths:
        parser.error("give run directories, or --bench files")
    cells = collect(args.paths, note=lambda line: console.print(line, highlight=False))
    if args.groups:
        asked = set(args.groups.split(","))
        unknown = sorted(asked - set(GROUP_TITLES))
        if unknown:
            raise UserError(
                f"--groups {args.groups}: no target groups {unknown}; choose among "
                f"{', '.join(g for g in GROUP_TITLES if g != 'other')}."
            )
        kept = cells[cells.base_group.isin(asked) | (cells.target == "-")]
        if kept.target.eq("-").all():
            have = sorted(set(cells.base_group) - {"other"}) or ["none of the paper's groups"]
            raise UserError(
                f"--groups {args.groups}: these runs have no target of that group; their "
                f"targets are in {', '.join(have)}. Choose among those, or leave --groups out."
            )
        cells = kept
    if args.sweep and not cells.params.map(lambda p: args.sweep in json.loads(p)).any():
        raise UserError(
            f"--sweep {args.sweep}: no run in this table has the parameter {args.sweep!r}; the "
            f"runs' parameters are {sorted({k for p in cells.params for k in json.loads(p)})}."
        )
    metric, title = targeted_metric(cells, args.metric)
    table = paper_table(cells, metric)
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
