"""`adgen data inspect|convert|preview`: check an AdGen file, convert it for other tools, and show
exactly what the model will be trained on. The logic lives in `adgen.data`."""

from __future__ import annotations

import argparse
import json
import sys

from adgen.data.chat import resolve_system_prompt
from adgen.data.convert import FORMATS, write_converted
from adgen.data.records import parse_columns, read_records  # stdlib-only modules: cheap at start-up

READ_HELP = "read options (any AdGen file)"


def add_read_arguments(p: argparse.ArgumentParser) -> None:
    """The options every command that reads an AdGen file shares (reuse them in train/eval/generate)."""
    g = p.add_argument_group(READ_HELP)
    g.add_argument("--encoding", default=None, help="file encoding (default: detect UTF-8, UTF-8 with BOM, GBK)")
    g.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default="fail",
        help="on a bad record: stop with its line number (fail, default) or leave it out and report (skip)",
    )
    g.add_argument(
        "--columns",
        default=None,
        metavar="MAP",
        help="the file's field names, e.g. content=instruction,summary=output (or the preset 'alpaca')",
    )


def read_options(args: argparse.Namespace) -> dict:
    """`read_records` keyword arguments from the options of `add_read_arguments`."""
    columns = parse_columns(args.columns) if args.columns else None
    return {"encoding": args.encoding, "on_error": args.on_error, "columns": columns}


def read_data(path: str, args: argparse.Namespace, **kw):
    """read_records with the CLI's options; the skip summary goes to stderr."""
    data = read_records(path, **read_options(args), **kw)
    if data.skipped:
        print(data.skip_summary(), file=sys.stderr)
    return data


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="inspect, convert or preview an AdGen data file")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: _usage(p))

    ins = sub.add_parser("inspect", help="records, encoding, duplicates, placeholders, attributes, lengths")
    ins.add_argument("path", metavar="PATH")
    ins.add_argument("--model", default=None, help="also count lengths in this model's tokens (hub id, local dir, built-in)")
    ins.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_read_arguments(ins)
    ins.set_defaults(func=run_inspect)

    conv = sub.add_parser("convert", help="write the records as alpaca / sharegpt / messages / adgen JSON lines")
    conv.add_argument("path", metavar="PATH")
    conv.add_argument("--to", required=True, choices=FORMATS)
    conv.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (UTF-8 JSON lines)")
    conv.add_argument("--system-prompt", default=None, help="add this system prompt to every record")
    add_read_arguments(conv)
    conv.set_defaults(func=run_convert)

    pre = sub.add_parser("preview", help="show the exact training text and token ids/labels of a few records")
    pre.add_argument("path", metavar="PATH")
    pre.add_argument("--model", required=True, help="the model whose tokenizer and chat template to use")
    pre.add_argument("-n", type=int, default=3, help="how many records (default 3)")
    pre.add_argument("--json", action="store_true", help="print one JSON object per record, one per line")
    pre.add_argument("--system-prompt", default="default", help="system prompt: 'default' (adgen's), '' for none, or your text")
    pre.add_argument("--loss-on", choices=["response", "all"], default="response", help="which tokens carry loss")
    pre.add_argument("--max-length", type=int, default=1024, help="truncate examples to this many tokens")
    add_read_arguments(pre)
    pre.set_defaults(func=run_preview)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def run_inspect(args: argparse.Namespace) -> int:
    from adgen.data.inspect import format_inspect_text, inspect_data

    data = read_data(args.path, args)
    tokenizer = None
    if args.model:
        from adgen.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    report = inspect_data(data, tokenizer, model=args.model)
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else format_inspect_text(report))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    data = read_data(args.path, args)
    n = write_converted(data.records, args.output, args.to, args.system_prompt)
    print(f"wrote {n} records to {args.output} ({args.to}, UTF-8 JSON lines)")
    return 0


def run_preview(args: argparse.Namespace) -> int:
    from adgen.data.preview import format_preview_text, preview_records  # loads a tokenizer: transformers

    system = {"system_prompt": resolve_system_prompt(args.system_prompt)}
    rows = preview_records(
        args.path,
        args.model,
        n=args.n,
        loss_on=args.loss_on,
        max_length=args.max_length,
        **system,
        **read_options(args),
    )
    if args.json:
        # JSON lines: one object per record, so `| head -n 1 | jq` works on big files.
        print("\n".join(json.dumps(row, ensure_ascii=False) for row in rows))
    else:
        print(format_preview_text(rows))
    return 0
