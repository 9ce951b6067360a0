"""Resumable JSON-lines output, shared by `adgen generate --input` (bulk.py) and `adgen eval` (its partial
file): record keys, durable appends, cutting the partial line a kill leaves, and the progress bar.

Each record is one `write` + flush + fsync, so a kill leaves at most one partial last line; on the next
start it is cut off (the file is truncated to its last complete line) and that record is made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from adgen.errors import AdgenError

log = logging.getLogger(__name__)


def record_key(line: int, content: str) -> str:
    """Identity of an input record for resuming: its line number and a hash of its content."""
    return f"{int(line)}:{hashlib.sha1(content.encode('utf-8')).hexdigest()[:16]}"


@dataclass
class OutputState:
    done: set[str] = field(default_factory=set)
    records: int = 0  # complete records found
    truncated_bytes: int = 0  # bytes of a partial last line that were cut off


def scan_output(path: str | Path, *, repair: bool = True) -> OutputState:
    """Keys of the records already in `path`; cut a partial trailing line (a kill mid-write).

    A complete line that is not a JSON record with `line` and `content` is an error: that file was
    not written by us (or was edited), and appending to it would mix two things.
    """
    path = Path(path)
    state = OutputState()
    if not path.exists():
        return state
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    state.truncated_bytes = len(data) - end
    if repair:
        cut_partial_line(path, data)
    for lineno, raw in enumerate(data[:end].split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            key = record_key(obj["line"], obj["content"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise AdgenError(
                f"{path}:{lineno}: the existing output file has a line that is not an adgen generate record; "
                "give another --output, or pass --overwrite to start it afresh"
            ) from None
        state.done.add(key)
        state.records += 1
    return state


def cut_partial_line(path: str | Path, data: bytes | None = None) -> int:
    """Truncate `path` to its last complete line (what a kill mid-write leaves); the bytes cut off."""
    path = Path(path)
    if data is None:
        data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    if end < len(data):
        log.warning("%s: cutting a partial last line (%d bytes) left by an interrupted run", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - end


class JsonlAppender(AbstractContextManager):
    """Append JSON lines durably: each record is one write, then flush + fsync (`with` closes the file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")

    def write(self, obj: dict) -> None:
        self._f.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, initial: int, enabled: bool, *, desc: str):
    """A tqdm bar over records (None when progress is off)."""
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, unit="rec", desc=desc, dynamic_ncols=True)
