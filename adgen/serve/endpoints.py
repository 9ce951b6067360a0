"""The generation endpoints: /v1/chat/completions, /v1/completions and /v1/adcopy, streamed or not.

One body-building function per endpoint serves both a live request and a row of a batch (the Batch API): the same
validation, decoding and response, only the way the job reaches the scheduler differs (`Submit`: live, watching
the client's connection; or batch priority, adgen.serve.policy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from adgen.errors import AdgenError
from adgen.generation.config import DecodingConfig
from adgen.serve.jobs import Abandoned, Completion, QueueFull, RawPrompt
from adgen.serve.schemas import AdcopyRequest, ChatCompletionRequest, CompletionRequest, parse_body
from adgen.serve.security import ApiError, error_body
from adgen.serve.service import ServeState

log = logging.getLogger(__name__)

# Framed by hand (one line), not yet with sse-starlette's EventSourceResponse: tried 2026-12-02, it watches for
# disconnects itself and cancels the generator, which changes what a client leaving mid-stream cancels; the
# disconnect test (test_a_disconnect_frees_its_slot_and_the_other_streams_go_on) is timing-sensitive under load
# with either, so the switch was not shown to do the same job.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# How a non-streaming job reaches the scheduler: (prompts, config, use_adapter) -> its completions.
Submit = Callable[[list, DecodingConfig, "bool | str"], Awaitable[list[Completion]]]
BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/v1/adcopy": AdcopyRequest}
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/adcopy", "/v1/completions")


class _ClientGone(Exception):
    pass


def add_generation_routes(app: FastAPI, state: ServeState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = parse_body(ChatCompletionRequest, await request.body())
        if not req.stream:
            return await chat_body(state, req, live_submit(state, request))
        return _choices_stream(state, req, _chat_call(state, req), req.n, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = parse_body(CompletionRequest, await request.body())
        if not req.stream:
            return await completion_body(state, req, live_submit(state, request))
        call = _completion_call(state, req)
        return _choices_stream(state, req, call, len(call.prompts), chat=False)

    @app.post("/v1/adcopy")
    async def adcopy(request: Request):
        req: AdcopyRequest = parse_body(AdcopyRequest, await request.body())
        if not req.stream:
            return await adcopy_body(state, req, live_submit(state, request))
        call, head, pairs = _adcopy_call(state, req)
        events = _open_stream(state, call.prompts, call.config, call.use_adapter)
        return _sse_response(_adcopy_sse(state, events, head, pairs))

    @app.exception_handler(_ClientGone)
    async def _client_gone(_request: Request, _exc: Exception):
        from fastapi import Response

        return Response(status_code=499)


# ---- one call: what a request asks the scheduler for -----------------------------------------
class _Call:
    def __init__(self, prompts: list, config: DecodingConfig, use_adapter: bool | str, prompt_tokens: int,
                 model: str, prefix: str, echo: list[str] | None = None) -> None:
        self.prompts, self.config, self.use_adapter = prompts, config, use_adapter
        self.prompt_tokens, self.model, self.echo = prompt_tokens, model, echo
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}


def _chat_call(state: ServeState, req: ChatCompletionRequest) -> _Call:
    use_adapter = state.use_adapter_for(req.model)
    messages = [m.as_template_message() for m in req.messages]
    config = state.decoding_config(req, n=req.n)
    prompt_tokens = state.check_prompt(messages)
    return _Call([messages] * req.n, config, use_adapter, prompt_tokens, req.model, "chatcmpl")


def _completion_call(state: ServeState, req: CompletionRequest) -> _Call:
    """Raw prompts (no chat template): choice i * n + j answers prompt i, as OpenAI numbers them."""
    if state.scheduler.engine is None:
        raise ApiError(400, "/v1/completions needs continuous batching (this server runs one job at a time); use "
                            "/v1/chat/completions", code="unsupported_endpoint")
    use_adapter = state.use_adapter_for(req.model)
    texts = req.prompts()
    config = state.decoding_config(req, n=req.n * len(texts))
    prompt_tokens = sum(state.check_prompt(RawPrompt(t), param="prompt") for t in texts)
    prompts = [RawPrompt(t) for t in texts for _ in range(req.n)]
    echo = [t for t in texts for _ in range(req.n)] if req.echo else None
    return _Call(prompts, config, use_adapter, prompt_tokens, req.model, "cmpl", echo)


def _adcopy_call(state: ServeState, req: AdcopyRequest) -> tuple[_Call, dict[str, Any], list]:
    use_adapter = req.use_adapter and state.use_adapter_for(req.model)
    if not req.use_adapter and not state.can_compare:
        raise ApiError(400, "use_adapter=false needs a server started with an adapter or --base", param="use_adapter")
    content, pairs = state.content_of(req.attributes)
    messages = state.adcopy_messages(content, req.style, req.length)
    config = state.decoding_config(req)
    prompt_tokens = state.check_prompt(messages, param="attributes")
    call = _Call([messages], config, use_adapter, prompt_tokens, state.id_for(use_adapter), "adcopy")
    head = {"id": call.id, "created": call.created, "model": call.model, "content": content}
    return call, head, pairs


# ---- non-streaming bodies (live requests and batch rows alike) --------------------------------
async def chat_body(state: ServeState, req: ChatCompletionRequest, submit: Submit) -> dict[str, Any]:
    call = _chat_call(state, req)
    results = await submit(call.prompts, call.config, call.use_adapter)
    choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                **_finish(r.finish_reason)} for r in results]
    return {**call.head("chat.completion"), "choices": choices,
            "usage": _usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))}


async def completion_body(state: ServeState, req: CompletionRequest, submit: Submit) -> dict[str, Any]:
    call = _completion_call(state, req)
    results = await submit(call.prompts, call.config, call.use_adapter)
    choices = [{"index": r.index, "text": (call.echo[r.index] if call.echo else "") + r.text, "logprobs": None,
                **_finish(r.finish_reason)} for r in results]
    return {**call.head("text_completion"), "choices": choices,
            "usage": _usage(call.prompt_tokens, sum(r.completion_tokens for r in results))}


async def adcopy_body(state: ServeState, req: AdcopyRequest, submit: Submit) -> dict[str, Any]:
    call, head, pairs = _adcopy_call(state, req)
    (result,) = await submit(call.prompts, call.config, call.use_adapter)
    return await asyncio.to_thread(_adcopy_result, state, head, pairs, result)


def _adcopy_result(state: ServeState, head, pairs, result) -> dict[str, Any]:
    return {**head, "object": "adcopy", "attributes": [list(p) for p in pairs], "text": result.text,
            "finish_reason": result.finish_reason, "faithfulness": state.figures(pairs, result.text),
            "usage": _usage(result.prompt_tokens, result.completion_tokens)}


# ---- how a job reaches the scheduler ----------------------------------------------------------
def live_submit(state: ServeState, request: Request) -> Submit:
    async def submit(prompts, config, use_adapter):
        try:
            return await state.scheduler.complete(prompts, config, use_adapter=use_adapter,
                                                  disconnected=request.is_disconnected)
        except QueueFull as e:
            raise _busy(e) from None
        except Abandoned:
            raise _ClientGone() from None  # answered with 499, which nobody reads
        except ApiError:
            raise
        except Exception as e:  # this request's generation failed (the others went on): a 5xx naming the error
            raise _generation_failed(e) from e

    return submit


def batch_handlers(state: ServeState) -> dict[str, Callable[[dict], Awaitable[tuple[int, dict]]]]:
    """The Batch API's row handlers: a row's body -> (200, the endpoint's response body), at batch priority.
    A row the live endpoint would refuse raises that ApiError (the runner writes it as an error row)."""
    async def submit(prompts, config, use_adapter):
        try:
            return await state.scheduler.complete(prompts, config, use_adapter=use_adapter, priority="batch")
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise _generation_failed(e) from e

    def handler(path: str, build):
        model = BODIES[path]

        async def handle(body: dict) -> tuple[int, dict]:
            req = parse_body(model, json.dumps(body, ensure_ascii=False).encode("utf-8"))
            if req.stream:
                raise ApiError(400, "stream is not available in a batch: each row's answer is written whole",
                               param="stream")
            return 200, await build(state, req, submit)

        return handle

    builds = {"/v1/chat/completions": chat_body, "/v1/adcopy": adcopy_body, "/v1/completions": completion_body}
    return {path: handler(path, builds[path]) for path in BATCH_ENDPOINTS}


def _busy(e: Exception) -> ApiError:
    return ApiError(429, f"the server is busy ({e}); retry later", type="rate_limit_error",
                    code="rate_limit_exceeded", headers={"Retry-After": "1"})


def _generation_failed(e: Exception) -> ApiError:
    if isinstance(e, AdgenError):  # something the client can change (e.g. a request too long for the cache)
        return ApiError(400, str(e), code="generation_refused")
    return ApiError(500, f"generation failed: {type(e).__name__}", type="server_error", code="generation_failed")


def _open_stream(state: ServeState, prompts, config, use_adapter: bool | str):
    """Queue the stream now, so a full queue is a 429 before any byte of the response is sent."""
    try:
        return state.scheduler.open_stream(prompts, config, use_adapter=use_adapter)
    except QueueFull as e:
        raise _busy(e) from None


# ---- response pieces --------------------------------------------------------------------------
def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(reason: str | None) -> dict[str, Any]:
    """OpenAI's finish_reason has no value for a loop: it says "stop", and `stop_reason` (the field vLLM
    uses for what stopped a choice) says "loop" -- loop detection stopped it and trimmed the repeats."""
    if reason is None:
        return {"finish_reason": None}
    out = {"finish_reason": "length" if reason == "length" else "stop"}
    return {**out, "stop_reason": "loop"} if reason == "loop" else out


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _choices_stream(state: ServeState, req, call: _Call, n: int, *, chat: bool) -> StreamingResponse:
    """A streamed chat completion or text completion: queued now (a full queue is a 429 before any byte)."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    events = _open_stream(state, call.prompts, call.config, call.use_adapter)
    head = call.head("chat.completion.chunk" if chat else "text_completion")
    return _sse_response(_choices_sse(events, head, n, include_usage, call.prompt_tokens, chat=chat, echo=call.echo))


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _choices_sse(events, base: dict, n: int, include_usage: bool, prompt_tokens: int, *, chat: bool,
                       echo: list[str] | None = None) -> AsyncIterator[str]:
    """Chunks of chat.completion.chunk (deltas) or text_completion (text) objects, then [DONE]."""
    def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": None, **_finish(finish)}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, **_finish(finish)}
        return _sse({**base, "choices": [choice]})

    completion_tokens = 0
    try:
        for i in range(n):
            if chat:  # the role comes first in every choice, as OpenAI sends it
                yield chunk(i, None, role=True)
            elif echo:
                yield chunk(i, echo[i])
        async for kind, index, payload in events:
            if kind == "piece":
                yield chunk(index, payload)
            elif kind == "done":
                completion_tokens += payload.completion_tokens
                yield chunk(index, None, payload.finish_reason)
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
                yield _sse(await asyncio.to_thread(_adcopy_result, state, head, pairs, payload))
        yield "data: [DONE]\n\n"
    except Exception as e:
        log.exception("stream failed")
        yield _sse(error_body(f"generation failed: {type(e).__name__}", type="server_error"))
    finally:
        await events.aclose()
