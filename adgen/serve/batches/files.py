"""Uploaded and produced files of the OpenAI Files API, kept under the server's state directory.

    STATE_DIR/files/file-<hex>.jsonl   the bytes
    STATE_DIR/files/file-<hex>.json    the File object (id, bytes, created_at, filename, purpose)

Both are written atomically (the bytes first, the object last), so a file is listed only once it is whole; a kill
mid-upload leaves nothing listed. Methods raise `ApiError` (a 4xx in OpenAI's shape) for a client's mistake.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adgen.io import atomic_write_bytes, atomic_write_json
from adgen.serve.security import ApiError

# Purposes a client may upload; the server itself writes "batch_output" files (results and errors).
UPLOAD_PURPOSES = ("batch",)


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int = 100 * 1024 * 1024  # OpenAI allows 200 MB per batch input file
    max_lines: int = 50_000  # OpenAI's cap on requests per batch


class FileStore:
    def __init__(self, root: str | Path, limits: FileLimits | None = None) -> None:
        self.root = Path(root) / "files"
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits or FileLimits()

    def create(self, data: bytes, *, filename: str, purpose: str) -> dict[str, Any]:
        """Keep an upload (purpose "batch": JSON lines, checked line by line when a batch is created)."""
        if purpose not in UPLOAD_PURPOSES:
            raise ApiError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}, not {purpose!r}",
                           param="purpose")
        if len(data) > self.limits.max_bytes:
            raise ApiError(413, f"the file is {len(data)} bytes; this server accepts up to {self.limits.max_bytes}",
                           param="file", code="file_too_large")
        lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
        if lines > self.limits.max_lines:
            raise ApiError(400, f"the file has {lines} lines; a batch holds at most {self.limits.max_lines} "
                                "requests: split it into several files", param="file", code="too_many_lines")
        if not data.strip():
            raise ApiError(400, "the file is empty: a batch input file holds one JSON request per line", param="file")
        return self.write(data, filename=filename, purpose=purpose)

    def write(self, data: bytes, *, filename: str, purpose: str, file_id: str | None = None) -> dict[str, Any]:
        """Store bytes as a file (uploads and the server's own output files)."""
        file_id = file_id or f"file-{secrets.token_hex(12)}"
        obj = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        atomic_write_bytes(self._data(file_id), data)
        atomic_write_json(self._meta(file_id), obj)
        return obj

    def get(self, file_id: str) -> dict[str, Any]:
        path = self._meta(file_id)
        if not path.is_file():
            raise ApiError(404, f"no file with id '{file_id}'", param="file_id", code="file_not_found")
        return json.loads(path.read_text(encoding="utf-8"))

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        return self._data(file_id).read_bytes()

    def list(self, *, purpose: str | None = None) -> list[dict[str, Any]]:
        objs = [json.loads(p.read_text(encoding="utf-8")) for p in self.root.glob("file-*.json")]
        objs = [o for o in objs if purpose is None or o["purpose"] == purpose]
        return sorted(objs, key=lambda o: (o["created_at"], o["id"]), reverse=True)

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        self._meta(file_id).unlink()  # unlisted first: a kill between the two leaves only unreachable bytes
        self._data(file_id).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def _meta(self, file_id: str) -> Path:
        return self.root / f"{_safe(file_id)}.json"

    def _data(self, file_id: str) -> Path:
        return self.root / f"{_safe(file_id)}.jsonl"


def _safe(file_id: str) -> str:
    """An id can only name a file of this store (no path parts)."""
    if not file_id.startswith("file-") or not file_id[5:].isalnum():
        raise ApiError(404, f"no file with id '{file_id}'", param="file_id", code="file_not_found")
    return file_id
