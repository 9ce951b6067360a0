"""`adgen compare RUN_DIR... -o DIR`: evaluation runs side by side.

    adgen compare runs/eval-zero-shot runs/eval-lora -o runs/compare --names zero-shot,lora

Reads each run's metrics.json (written by `adgen eval`) and writes DIR/comparison.md (metrics as
rows, runs as columns, the best of each row bold, differences from the first run) and
DIR/comparison.png (grouped bars: ROUGE-1/2/L and BLEU-4; coverage, contradiction rate, Chinese
share, repetition, distinct-2, never stopped). The logic lives in adgen.evaluation.compare.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare evaluation runs: a markdown table and a bar chart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by `adgen eval` (or their metrics.json)")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="where to write comparison.md and comparison.png")
    p.add_argument("--names", default=None, metavar="A,B,...", help="names of the runs, comma-separated (default: directory names)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adgen.evaluation.compare import compare_runs

    names = [n.strip() for n in args.names.split(",")] if args.names is not None else None
    result = compare_runs(args.runs, args.output_dir, names=names)
    print_table(result)
    print(f"wrote {result.table_path} and {result.chart_path}", file=sys.stderr)
    return 0


def print_table(result) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from adgen.evaluation.compare import comparison_warnings, row_cells

    runs = result.runs
    table = Table(title=f"adgen compare: {len(runs)} run(s) (best per row bold)", title_justify="left")
    table.add_column("metric")
    for r in runs:
        table.add_column(escape(r.name), justify="right")
    for r in runs[1:]:
        table.add_column(f"{escape(r.name)} - {escape(runs[0].name)}", justify="right")
    for row in result.rows:
        table.add_row(*row_cells(row, "[bold green]{}[/bold green]", {"high": " (+)", "low": " (-)"}))
    console = Console()
    console.print(table)
    console.print("(+) higher is better, (-) lower is better")
    for w in comparison_warnings(runs):
        console.print(f"[yellow]warning:[/yellow] {w}")
