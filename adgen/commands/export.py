"""`adgen export` (not implemented yet)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="(not implemented yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    from adgen.errors import AdgenError

    raise AdgenError("adgen export is not implemented yet")
