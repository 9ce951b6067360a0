"""The FastAPI app: OpenAI-compatible chat completions, the /v1/adcopy domain endpoint, /health, /ui.

    POST /v1/chat/completions   OpenAI chat API (stream, n, stop, seed, max_tokens, usage)
    GET  /v1/models             the served model (and "<base>" = adapter off, when an adapter is loaded)
    POST /v1/completions        OpenAI's legacy completions: raw prompts, no chat template (stream, n, echo)
    POST /v1/adcopy             attributes -> ad copy + faithfulness figures (stream or not)
    /v1/files, /v1/batches      OpenAI's Files and Batch APIs: a catalog run beside live traffic, at lower
                                priority, kept under --state-dir and resumed after a restart (adgen.serve.batches)
    GET  /health                model, adapter, device, uptime, queue figures
    GET  /metrics               Prometheus text format: requests, tokens, queue, batch, TTFT / latency histograms
    GET  /openapi.json          the OpenAPI schema: both request bodies with every decoding field (from DecodingConfig)
    /ui                         the Gradio web UI

Every error is JSON in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. Bodies are
parsed by hand (`schemas.parse_body`) so that malformed JSON, wrong types and missing fields all
come back as 400s that name the field.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adgen.serve.batches import BatchRunner, BatchStore, FileLimits, FileStore, add_batch_routes
from adgen.serve.endpoints import BODIES, add_generation_routes, batch_handlers
from adgen.serve.security import ApiError, ApiKeyMiddleware, BodyLimitMiddleware, error_body
from adgen.serve.service import ServeState

log = logging.getLogger(__name__)

# Rows of one batch queued on the scheduler at once: enough to fill the engine's slots and keep them full.
BATCH_ROWS_IN_FLIGHT = 64


def create_app(state: ServeState, *, ui: bool | None = None) -> FastAPI:
    settings = state.settings
    limits = settings.limits
    state_dir = settings.resolved_state_dir()
    runner = BatchRunner(FileStore(state_dir, FileLimits(limits.max_file_bytes, limits.max_batch_lines)),
                         BatchStore(state_dir), batch_handlers(state), in_flight=BATCH_ROWS_IN_FLIGHT,
                         on_row=state.metrics.batch_row)
    state.metrics.watch_batches(runner.store)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        resumed = runner.resume_all()  # batches a previous server left unfinished
        if resumed:
            log.warning("resuming %d unfinished batch(es) from %s", len(resumed), state_dir)
        yield
        await runner.close()  # rows in flight stop; the batches stay resumable

    app = FastAPI(
        title="adgen",
        version="0.1.0",
        docs_url=None,  # no Swagger page: it loads its assets from a CDN and is one more open route
        redoc_url=None,
        openapi_url="/openapi.json",  # the contract, for client generators and fuzzers (behind the API key)
        lifespan=lifespan,
    )
    app.state.adgen = state
    app.state.batches = runner
    _add_error_handlers(app)
    _add_info_routes(app, state)
    add_generation_routes(app, state)
    add_batch_routes(app, runner)
    ui_enabled = settings.ui if ui is None else ui

    @app.get("/", include_in_schema=False)
    async def root():
        if ui_enabled:
            return RedirectResponse("/ui/")
        return {"service": "adgen", "routes": ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adcopy",
                                               "/v1/files", "/v1/batches", "/health", "/openapi.json"]}

    app.openapi = lambda: _openapi(app)  # what /openapi.json serves
    if ui_enabled:
        from adgen.serve.webui import mount_ui

        mount_ui(app, state)
    _add_guards(app, settings)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; a client's mistake is a 4xx, only a bug is a 500."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message, code = f"unknown route: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)



def _add_info_routes(app: FastAPI, state: ServeState) -> None:
    """/health, /metrics, /v1/models."""

    @app.get("/health")
    async def health():
        return state.health()

    @app.get("/metrics")
    async def metrics():
        from adgen.serve.metrics import CONTENT_TYPE

        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(state, m) for m in state.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in state.model_ids():
            raise ApiError(404, f"the model '{model_id}' does not exist on this server", param="model",
                           code="model_not_found")
        return _model_card(state, model_id)



def _add_guards(app: FastAPI, settings) -> None:
    """The last added runs first: access log, body cap, then CORS, then the key."""
    api_key = settings.resolved_api_key()
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Outside the key check: preflights are answered here, and 401s carry the CORS headers.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # an upload to /v1/files may be a whole catalog: its own cap (+ room for the multipart framing)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes,
                       per_path={"/v1/files": settings.limits.max_file_bytes + 64 * 1024})
    from adgen.serve.access_log import AccessLogMiddleware

    app.add_middleware(AccessLogMiddleware)  # outermost: every request is logged, refused ones too


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema with the request bodies described (they are parsed by hand, see
    `schemas.parse_body`, so FastAPI cannot see them): the JSON schemas of the pydantic models."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            # the served ids are the only values `model` takes (anything else is a 404)
            ids = {"type": "string", "enum": app.state.adgen.model_ids()}
            body["properties"]["model"] = ids if "model" in body.get("required", []) else {"anyOf": [ids, {"type": "null"}]}
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        app.openapi_schema = schema
    return app.openapi_schema


def _model_card(state: ServeState, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(state.started),
        "owned_by": "adgen",
        "adapter": state.adapter_of(model_id),
    }
