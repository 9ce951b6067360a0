"""Structured access logs: one JSON object per HTTP request on the `adgen.access` logger.

An ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers streaming responses): it notes the
status when the response starts and logs when the response ends, so a stream is logged with its whole
duration. Fields: time, method, path, status, duration_ms, client, bytes_out, request_id.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

access_log = logging.getLogger("adgen.access")


class AccessLogMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        entry = {"method": scope.get("method"), "path": scope.get("path"), "status": None, "bytes_out": 0,
                 "client": (scope.get("client") or ("", 0))[0], "request_id": uuid.uuid4().hex[:16]}

        async def logged_send(message):
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            elif message["type"] == "http.response.body":
                entry["bytes_out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            entry["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
            entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if entry["status"] is None:
                entry["status"] = 499  # the client left before a response started
            access_log.info(json.dumps(entry, ensure_ascii=False))


def configure(log_level: str) -> None:
    """`adgen serve`: access lines to stderr at info level and below (uvicorn's own access log is off)."""
    if access_log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO if log_level in ("info", "debug") else logging.WARNING)
    access_log.propagate = False
