"""One record's problem, shared by the JSON reader (records.py) and the table readers (sources.py).

Readers yield a `BadRecord` in place of a row they cannot use (a JSON line that does not parse, a CSV row
with too many fields); `records._collect` then raises it as a `DataError` naming `<path>:<line>`, or, with
`--on-error skip`, collects it as a `RecordError`. Its own module so that both readers import it and
neither imports the other back.
"""

from __future__ import annotations


class BadRecord(Exception):
    """One record's problem: a short kind, the reason, and how to fix it."""

    def __init__(self, kind: str, reason: str, fix: str = "") -> None:
        super().__init__(reason)
        self.kind, self.reason, self.fix = kind, reason, fix
