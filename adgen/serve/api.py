"""The FastAPI app: OpenAI-compatible chat completions, the /v1/adcopy domain endpoint, /health, /ui.

    POST /v1/chat/completions   OpenAI chat API (stream, n, stop, seed, max_tokens, usage)
    GET  /v1/models             the served model (and "<base>" = adapter off, when an adapter is loaded)
    POST /v1/adcopy             attributes -> ad copy + faithfulness figures (stream or not)
    GET  /health                model, adapter, device, uptime, queue figures
    GET  /metrics               Prometheus text format: requests, tokens, queue, batch, TTFT / latency histograms
    GET  /openapi.json          the OpenAPI schema: both request bodies with every decoding field (from DecodingConfig)
    /ui                         the Gradio web UI

Every error is JSON in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. Bodies are
parsed by hand (`schemas.parse_body`) so that malformed JSON, wrong types and missing fields all
come back as 400s that name the field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adgen.serve.scheduler import Abandoned, QueueFull
from adgen.serve.schemas import AdcopyRequest, ChatCompletionRequest, parse_body
from adgen.serve.security import ApiError, ApiKeyMiddleware, BodyLimitMiddleware, error_body
from adgen.serve.service import ServeState

log = logging.getLogger(__name__)

# Framed by hand (one line), not yet with sse-starlette's EventSourceResponse: tried 2026-12-02, it watches for
# disconnects itself and cancels the generator, which changes what a client leaving mid-stream cancels; the
# disconnect test (test_a_disconnect_frees_its_slot_and_the_other_streams_go_on) is timing-sensitive under load
# with either, so the switch was not shown to do the same job.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(state: ServeState, *, ui: bool | None = None) -> FastAPI:
    settings = state.settings
    app = FastAPI(
        title="adgen",
        version="0.1.0",
        docs_url=None,  # no Swagger page: it loads its assets from a CDN and is one more open route
        redoc_url=None,
        openapi_url="/openapi.json",  # the contract, for client generators and fuzzers (behind the API key)
    )
    app.state.adgen = state
    _add_error_handlers(app)
    _add_info_routes(app, state)
    _add_generation_routes(app, state)
    ui_enabled = settings.ui if ui is None else ui

    @app.get("/", include_in_schema=False)
    async def root():
        if ui_enabled:
            return RedirectResponse("/ui/")
        return {"service": "adgen", "routes": ["/v1/chat/completions", "/v1/models", "/v1/adcopy", "/health",
                                               "/openapi.json"]}

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

    @app.exception_handler(_ClientGone)
    async def _client_gone(_request: Request, _exc: Exception):
        return Response(status_code=499)

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



def _add_generation_routes(app: FastAPI, state: ServeState) -> None:
    """/v1/chat/completions and /v1/adcopy (streamed or not)."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = parse_body(ChatCompletionRequest, await request.body())
        use_adapter = state.use_adapter_for(req.model)
        messages = [m.as_template_message() for m in req.messages]
        config = state.decoding_config(req, n=req.n)
        prompt_tokens = state.check_prompt(messages)
        prompts = [messages] * req.n
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _open_stream(state, prompts, config, use_adapter)
            return StreamingResponse(
                _chat_sse(events, rid, created, req.model, req.n, include_usage, prompt_tokens),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        results = await _complete(state, prompts, config, use_adapter, request)
        completion_tokens = sum(r.completion_tokens for r in results)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": r.index,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": None,
                    "finish_reason": _openai_finish(r.finish_reason),
                    **_stop_reason(r.finish_reason),
                }
                for r in results
            ],
            "usage": _usage(results[0].prompt_tokens, completion_tokens),
        }

    @app.post("/v1/adcopy")
    async def adcopy(request: Request):
        req: AdcopyRequest = parse_body(AdcopyRequest, await request.body())
        use_adapter = req.use_adapter and state.use_adapter_for(req.model)
        if not req.use_adapter and not state.can_compare:
            raise ApiError(400, "use_adapter=false needs a server started with an adapter", param="use_adapter")
        content, pairs = state.content_of(req.attributes)
        messages = state.adcopy_messages(content, req.style, req.length)
        config = state.decoding_config(req)
        state.check_prompt(messages, param="attributes")
        rid, created = f"adcopy-{uuid.uuid4().hex}", int(time.time())
        model_name = state.id_for(use_adapter)
        head = {"id": rid, "created": created, "model": model_name, "content": content}
        if req.stream:
            events = _open_stream(state, [messages], config, use_adapter)
            return StreamingResponse(
                _adcopy_sse(state, events, head, pairs), media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        (result,) = await _complete(state, [messages], config, use_adapter, request)
        return _adcopy_result(state, head, pairs, result)



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
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    from adgen.serve.access_log import AccessLogMiddleware

    app.add_middleware(AccessLogMiddleware)  # outermost: every request is logged, refused ones too


BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/adcopy": AdcopyRequest}


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


def _openai_finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _stop_reason(reason: str) -> dict[str, str]:
    """OpenAI's finish_reason has no value for a loop: it says "stop", and `stop_reason` (the field vLLM
    uses for what stopped a choice) says "loop" -- loop detection stopped it and trimmed the repeats."""
    return {"stop_reason": "loop"} if reason == "loop" else {}


def _busy(e: Exception) -> ApiError:
    return ApiError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                    code="rate_limit_exceeded", headers={"Retry-After": "1"})


class _ClientGone(Exception):
    pass


async def _complete(state: ServeState, prompts, config, use_adapter: bool | str, request: Request):
    try:
        return await state.scheduler.complete(
            prompts, config, use_adapter=use_adapter, disconnected=request.is_disconnected
        )
    except QueueFull as e:
        raise _busy(e) from None
    except Abandoned:
        raise _ClientGone() from None  # answered with 499, which nobody reads
    except ApiError:
        raise
    except Exception as e:  # this request's generation failed (the others went on): a 5xx naming the error
        raise _generation_failed(e) from e


def _generation_failed(e: Exception) -> ApiError:
    from adgen.errors import AdgenError

    if isinstance(e, AdgenError):  # something the client can change (e.g. a request too long for the cache)
        return ApiError(400, str(e), code="generation_refused")
    return ApiError(500, f"generation failed: {type(e).__name__}", type="server_error", code="generation_failed")


def _open_stream(state: ServeState, prompts, config, use_adapter: bool | str):
    """Queue the stream now, so a full queue is a 429 before any byte of the response is sent."""
    try:
        return state.scheduler.open_stream(prompts, config, use_adapter=use_adapter)
    except QueueFull as e:
        raise _busy(e) from None


async def _chat_sse(events, rid, created, model, n, include_usage, prompt_tokens) -> AsyncIterator[str]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None}
    completion_tokens = 0
    started: set[int] = set()
    try:
        for i in range(n):
            # The role comes first in every choice, as OpenAI sends it.
            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
            started.add(i)
        async for kind, index, payload in events:
            if kind == "piece":
                yield _sse({**base, "choices": [{"index": index, "delta": {"content": payload},
                                                 "logprobs": None, "finish_reason": None}]})
            elif kind == "done":
                completion_tokens += payload.completion_tokens
                yield _sse({**base, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                 "finish_reason": _openai_finish(payload.finish_reason),
                                                 **_stop_reason(payload.finish_reason)}]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    except Exception as e:  # the status line is gone: report in-band, like OpenAI does
        log.exception("stream failed")
        yield _sse(error_body(f"generation failed: {type(e).__name__}", type="server_error"))
    finally:
        await events.aclose()  # a disconnected client cancels its generation here


async def _adcopy_sse(state: ServeState, events, head, pairs) -> AsyncIterator[str]:
    try:
        async for kind, _index, payload in events:
            if kind == "piece":
                yield _sse({**head, "object": "adcopy.chunk", "delta": payload})
            elif kind == "done":
                result = await asyncio.to_thread(_adcopy_result, state, head, pairs, payload)
                yield _sse(result)
        yield "data: [DONE]\n\n"
    except Exception as e:
        log.exception("stream failed")
        yield _sse(error_body(f"generation failed: {type(e).__name__}", type="server_error"))
    finally:
        await events.aclose()


def _adcopy_result(state: ServeState, head, pairs, result) -> dict[str, Any]:
    return {
        **head,
        "object": "adcopy",
        "attributes": [list(p) for p in pairs],
        "text": result.text,
        "finish_reason": result.finish_reason,
        "faithfulness": state.figures(pairs, result.text),
        "usage": _usage(result.prompt_tokens, result.completion_tokens),
    }
