"""The `adgen` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in `adgen/commands/<name>.py` with `register(subparsers)`; those modules
import heavy libraries (torch, transformers) only inside their run functions, so `adgen --help`
and `adgen data inspect` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from adgen import __version__
from adgen.errors import AdgenError

COMMAND_MODULES = ["data", "train", "plan", "pairs", "recipes", "export", "eval", "score", "compare", "generate", "serve", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adgen",
        description="Fine-tune chat LLMs to write Chinese ad copy from product attributes (AdGen).",
    )
    parser.add_argument("--version", action="version", version=f"adgen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"adgen.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except AdgenError as e:
        if args.verbose:
            raise
        print(f"adgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adgen: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
