"""`adgen demo` (not implemented yet)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="(not implemented yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    from adgen.errors import AdgenError

    raise AdgenError("adgen demo is not implemented yet")
