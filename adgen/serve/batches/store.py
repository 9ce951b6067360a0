"""Batches on disk: the OpenAI Batch object and each finished row, so a killed server loses nothing.

    STATE_DIR/batches/batch_<hex>/batch.json   the Batch object (written atomically at every change of status)
    STATE_DIR/batches/batch_<hex>/rows.jsonl   one line per finished row, appended and fsynced as it finishes

A row line is what the output or error file will hold for it (OpenAI's shape):
    {"id": "batch_req_…", "custom_id": …, "response": {"status_code", "request_id", "body"}, "error": null}
or, for a line that is not a request at all, "response": null and "error": {"code", "message", "line"}.
After a kill the partial last line is cut (adgen.generation.resumable) and the rows it lacks run again, so the
output holds every custom_id exactly once.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any, Iterator

from adgen.generation.resumable import JsonlAppender, cut_partial_line
from adgen.io import atomic_write_json
from adgen.serve.security import ApiError

# Statuses in OpenAI's Batch object; a batch in one of ACTIVE is resumed when the server starts.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "cancelled", "expired")
COMPLETION_WINDOWS = ("24h",)


def new_batch(input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": f"batch_{secrets.token_hex(12)}", "object": "batch", "endpoint": endpoint, "errors": None,
        "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
        "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None, "failed_at": None,
        "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
    }


class BatchStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "batches"
        self.root.mkdir(parents=True, exist_ok=True)
        self._status = {b["id"]: b["status"] for b in self.list()}  # for /metrics without reading every file

    def save(self, batch: dict[str, Any]) -> None:
        atomic_write_json(self._dir(batch["id"]) / "batch.json", batch)
        self._status[batch["id"]] = batch["status"]

    def count(self, status: str) -> int:
        return sum(1 for s in self._status.values() if s == status)

    def set_status(self, batch: dict[str, Any], status: str) -> dict[str, Any]:
        """Move a batch to `status`, stamping OpenAI's `<status>_at` time, and save it."""
        batch["status"] = status
        stamp = {"in_progress": "in_progress_at", "finalizing": "finalizing_at", "completed": "completed_at",
                 "failed": "failed_at", "cancelling": "cancelling_at", "cancelled": "cancelled_at",
                 "expired": "expired_at"}.get(status)
        if stamp:
            batch[stamp] = int(time.time())
        self.save(batch)
        return batch

    def get(self, batch_id: str) -> dict[str, Any]:
        path = self._dir(batch_id) / "batch.json"
        if not path.is_file():
            raise ApiError(404, f"no batch with id '{batch_id}'", param="batch_id", code="batch_not_found")
        return json.loads(path.read_text(encoding="utf-8"))

    def list(self) -> list[dict[str, Any]]:
        """Every batch, newest first."""
        batches = [json.loads(p.read_text(encoding="utf-8")) for p in self.root.glob("batch_*/batch.json")]
        return sorted(batches, key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def rows(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """The finished rows (a partial last line left by a kill is cut off first)."""
        path = self._dir(batch_id) / "rows.jsonl"
        if not path.exists():
            return
        cut_partial_line(path)
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def appender(self, batch_id: str) -> JsonlAppender:
        return JsonlAppender(self._dir(batch_id) / "rows.jsonl")

    def _dir(self, batch_id: str) -> Path:
        if not batch_id.startswith("batch_") or not batch_id[6:].isalnum():
            raise ApiError(404, f"no batch with id '{batch_id}'", param="batch_id", code="batch_not_found")
        return self.root / batch_id


def parse_input_line(raw: bytes, number: int, endpoint: str) -> tuple[str | None, dict | None, dict | None]:
    """(custom_id, body, error) of one line of a batch input file; error is OpenAI's {code, message, line}."""
    def bad(code: str, message: str, custom_id=None):
        return custom_id, None, {"code": code, "message": message, "line": number}

    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return bad("invalid_json_line", f"line {number} is not a JSON object ({e}); each line is one request")
    if not isinstance(obj, dict):
        return bad("invalid_json_line", f"line {number} is not a JSON object; each line is one request")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("missing_custom_id", f"line {number} has no custom_id (a non-empty string naming the request)")
    if obj.get("method", "POST") != "POST":
        return bad("invalid_method", f"line {number}: method must be POST", custom_id)
    if obj.get("url") != endpoint:
        return bad("mismatched_endpoint", f"line {number}: url {obj.get('url')!r} is not this batch's endpoint "
                                          f"{endpoint!r}", custom_id)
    if not isinstance(obj.get("body"), dict):
        return bad("invalid_body", f"line {number}: body must be a JSON object (the request)", custom_id)
    return custom_id, obj["body"], None


def error_row(custom_id: str | None, error: dict) -> dict[str, Any]:
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id, "response": None, "error": error}


def response_row(custom_id: str, status: int, body: dict) -> dict[str, Any]:
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": secrets.token_hex(12), "body": body}, "error": None}


def is_success(row: dict[str, Any]) -> bool:
    return row.get("response") is not None and row["response"]["status_code"] == 200
