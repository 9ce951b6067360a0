"""metrics.jsonl: one JSON row per logged step, evaluation and generation evaluation, in step order.

A row goes to the trackers (`tracking.log`), to the run's list of rows (what a checkpoint saves) and, on the
main process, to the end of metrics.jsonl at once, so that a killed run keeps every row logged so far.
`rewrite` writes the whole file atomically: at the start (a resumed run drops the rows after its checkpoint)
and at the end.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from adgen.io import atomic_write_jsonl
from adgen.train import tracking

if TYPE_CHECKING:
    from adgen.train.state import RunContext

METRICS_FILE = "metrics.jsonl"


def append_row(run: RunContext, rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    tracking.log(run.accelerator, run.cfg, row)
    rows.append(row)
    if run.main:
        with open(run.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def rewrite(run: RunContext, rows: list[dict[str, Any]]) -> None:
    """The whole file from `rows` (main process only)."""
    if run.main:
        atomic_write_jsonl(run.out / METRICS_FILE, rows)
