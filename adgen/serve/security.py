"""Request guards: OpenAI-shaped errors, bearer-key check, request body cap.

Both guards are plain ASGI middleware, so they run before any route (a wrong key never learns
whether a route exists; a huge body is refused before it is read into memory).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

# Paths that the key check leaves alone: the web UI has its own login (Gradio auth, same key).
UI_PREFIX = "/ui"


class ApiError(Exception):
    """A client-visible error, rendered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param=None, code=None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def send_error(send, error: ApiError) -> None:
    payload = json.dumps(error.body(), ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body above `max_bytes`: from Content-Length up front, or counted while streaming in."""

    def __init__(self, app, max_bytes: int, per_path: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}  # routes with their own cap (file uploads)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.per_path.get(scope.get("path", ""), self.max_bytes)
        too_large = ApiError(
            413,
            f"request body is larger than this server accepts ({max_bytes} bytes)",
            code="request_too_large",
        )
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await send_error(send, ApiError(400, "invalid Content-Length header", code="bad_request"))
            if declared > max_bytes:
                return await send_error(send, too_large)

        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_error(send, too_large)


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but the web UI (which asks for the same key)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    def authorized(self, scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self._key)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == UI_PREFIX or path.startswith(UI_PREFIX + "/"):
            return await self.app(scope, receive, send)
        if not self.authorized(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            given = _header(scope, b"authorization")
            return await send_error(
                send,
                ApiError(
                    401,
                    "invalid API key" if given else "missing API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                ),
            )
        return await self.app(scope, receive, send)


def check_ui_login(api_key: str):
    """Gradio auth callable: any user name, the API key as the password."""

    def auth(username: str, password: str) -> bool:
        return hmac.compare_digest((password or "").encode(), api_key.encode())

    return auth
