"""The real server (uvicorn on a free loopback port, tiny random Llama-3 + a random LoRA adapter),
driven with the official `openai` client and plain HTTP.

Random weights write junk, which is fine: the tests compare outputs with each other (stream vs
non-stream, adapter on vs off vs the base model loaded on its own), never with real copy.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from adgen.serve.server import ServerThread, build
from adgen.serve.settings import Limits, ServeSettings

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = Limits(
    max_body_bytes=64_000,
    max_prompt_chars=4_000,
    max_prompt_tokens=256,
    max_tokens=2_000,
    default_max_tokens=12,
    max_n=3,
    max_queue=64,
)
CONTENT = "类型#裙*颜色#黑色*风格#简约"


@pytest.fixture(scope="module")
def server(tiny_llama3_dir, tiny_llama3_lora_dir, tiny_llama3_lora_b_dir, tmp_path_factory):
    settings = ServeSettings(
        model=str(tiny_llama3_dir), adapter=str(tiny_llama3_lora_dir), api_key=KEY, limits=LIMITS, batch_size=8,
        extra_adapters={"brand-b": str(tiny_llama3_lora_b_dir)}, state_dir=str(tmp_path_factory.mktemp("state")),
    )
    state, app = build(settings)
    with ServerThread(app, state=state) as srv:
        srv.state = state
        yield srv


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_body(server, content="类型#裙*颜色#黑色", **kw):
    return {"model": server.state.model_id, "messages": [{"role": "user", "content": content}], **kw}


def assert_error(r: httpx.Response, status: int, *, param=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def wait_idle(http, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = http.get("/health").json()
        if h["active_generations"] == 0 and h["queued"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"server still busy after {timeout}s: {h}")


# ---- OpenAI client ------------------------------------------------------------------------------
def test_openai_client_chat_completion(server, client):
    models = [m.id for m in client.models.list().data]
    assert models == [server.state.model_id, "brand-b", server.state.base_id]
    out = client.chat.completions.create(
        model=server.state.model_id, messages=[{"role": "user", "content": CONTENT}], max_tokens=8
    )
    assert out.object == "chat.completion"
    assert out.model == server.state.model_id
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(server.state.generator.prompt_ids([{"role": "user", "content": CONTENT}]))
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_openai_client_streaming_matches_non_streaming(server, client):
    kw = dict(model=server.state.model_id, messages=[{"role": "user", "content": CONTENT}], max_tokens=10)
    full = client.chat.completions.create(**kw)
    pieces, finish, usage, ids = [], None, None, set()
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert len(ids) == 1
    assert len(pieces) >= 2, "expected the text in several chunks"
    assert "".join(pieces) == full.choices[0].message.content  # greedy: same text either way
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_openai_client_n_stop_seed(server, client):
    base = dict(model=server.state.model_id, messages=[{"role": "user", "content": CONTENT}], max_tokens=8)
    sampled = dict(base, temperature=1.0, top_p=0.9, n=3, seed=1234)
    a = client.chat.completions.create(**sampled)
    b = client.chat.completions.create(**sampled)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # same seed
    assert 3 <= a.usage.completion_tokens <= 3 * 8  # all choices counted
    greedy = client.chat.completions.create(**base).choices[0].message.content
    assert len(greedy) > 3
    stop = greedy[2:4]
    cut = client.chat.completions.create(**base, stop=[stop]).choices[0]
    assert cut.message.content == greedy[: greedy.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **base, stop=stop, stream=True) if c.choices)
    assert streamed == cut.message.content


def test_openai_client_streaming_n_choices(server, client):
    kw = dict(model=server.state.model_id, messages=[{"role": "user", "content": CONTENT}], max_tokens=6,
              temperature=1.0, n=2, seed=7)
    texts, finish = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert set(finish) == {0, 1}
    assert all(texts.values())


def test_openai_client_errors(server, client):
    import openai

    msgs = [{"role": "user", "content": CONTENT}]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.state.model_id, messages=msgs, max_tokens=LIMITS.max_tokens + 1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=4)


# ---- /v1/adcopy, /health --------------------------------------------------------------------------
def test_adcopy_object_string_and_pairs_agree(server, http):
    bodies = [
        {"attributes": {"类型": "裙", "颜色": ["黑色"], "风格": "简约"}},
        {"attributes": CONTENT},
        {"attributes": [["类型", "裙"], ["颜色", "黑色"], ["风格", "简约"]]},
    ]
    results = []
    for body in bodies:
        r = http.post("/v1/adcopy", json={**body, "max_tokens": 10})
        assert r.status_code == 200, r.text
        results.append(r.json())
    first = results[0]
    assert first["object"] == "adcopy"
    assert first["content"] == CONTENT
    assert first["attributes"] == [["类型", "裙"], ["颜色", "黑色"], ["风格", "简约"]]
    assert first["model"] == server.state.model_id
    fig = first["faithfulness"]
    for key in ("attr_coverage", "attr_missing", "n_contradictions", "contradictions", "n_hallucinated"):
        assert key in fig
    assert 0.0 <= fig["attr_coverage"] <= 1.0
    assert first["usage"]["completion_tokens"] <= 10
    assert {r["text"] for r in results} == {first["text"]}  # greedy, same prompt


def test_adcopy_figures_are_computed_on_the_text(server):
    """The figures come from adgen.metrics on the generated text (checked on a known text)."""
    fig = server.state.figures([("类型", "裙"), ("颜色", "白色"), ("风格", "简约")], "这款简约的黑色连衣裙")
    assert fig["attr_coverage"] == 0.5
    assert fig["attr_missing"] == ["白色"]
    assert fig["n_contradictions"] == 1 and fig["contradictions"][0]["value"] == "黑色"


def test_adcopy_streaming(server, http):
    body = {"attributes": CONTENT, "max_tokens": 10, "style": "活泼", "length": 80}
    plain = http.post("/v1/adcopy", json=body).json()
    events = []
    with http.stream("POST", "/v1/adcopy", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    deltas = [o["delta"] for o in objs if o["object"] == "adcopy.chunk"]
    final = objs[-1]
    assert final["object"] == "adcopy"
    assert "".join(deltas) == final["text"] == plain["text"]
    assert final["faithfulness"] == plain["faithfulness"]


def test_adcopy_hints_change_the_prompt(server, http):
    messages = server.state.adcopy_messages(CONTENT, "活泼", 80)
    assert messages[0]["role"] == "system" and messages[0]["content"].endswith("文案风格：活泼。篇幅约80字。")
    assert messages[-1] == {"role": "user", "content": CONTENT}  # the user turn stays the training format
    a = http.post("/v1/adcopy", json={"attributes": CONTENT, "max_tokens": 4}).json()
    b = http.post("/v1/adcopy", json={"attributes": CONTENT, "max_tokens": 4, "style": "活泼"}).json()
    assert b["usage"]["prompt_tokens"] > a["usage"]["prompt_tokens"]


def test_health(server, http):
    h = http.get("/health").json()
    assert h["status"] == "ok"
    assert h["model"] == server.state.base_id and h["adapter"] == server.state.adapter_name
    assert h["device"] == "cpu"
    assert h["uptime_s"] > 0
    for key in ("queued", "active_generations", "model_forward_calls", "completed", "cancelled"):
        assert isinstance(h[key], int)
    # names only: no filesystem path leaks into public responses
    assert "/" not in h["model"] and "/" not in h["adapter"]


# ---- adapter off ---------------------------------------------------------------------------------
def test_adapter_off_is_the_base_model(server, http, tiny_llama3_dir):
    from adgen.generation import DecodingConfig, load_generator

    body = {"attributes": CONTENT, "max_tokens": 12}
    on = http.post("/v1/adcopy", json=body).json()["text"]
    off = http.post("/v1/adcopy", json={**body, "use_adapter": False}).json()
    on_again = http.post("/v1/adcopy", json=body).json()["text"]
    assert off["model"] == server.state.base_id
    assert off["text"] != on  # the random LoRA changes the output
    assert on_again == on  # the adapter is back on after the adapter-off request
    base = load_generator(str(tiny_llama3_dir))
    messages = server.state.adcopy_messages(CONTENT)
    assert base.generate([messages], DecodingConfig(max_new_tokens=12))[0].text == off["text"]
    # the same through the OpenAI route: model=<base id>
    chat = http.post("/v1/chat/completions", json={"model": server.state.base_id, "messages": messages,
                                                   "max_tokens": 12}).json()
    assert chat["choices"][0]["message"]["content"] == off["text"]


# ---- auth ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,method", [("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                                         ("/v1/adcopy", "POST"), ("/health", "GET"), ("/v1/unknown", "GET")])
def test_401_without_key(server, path, method):
    r = httpx.request(method, server.url + path, json={})
    err = assert_error(r, 401, code="invalid_api_key")
    assert "missing" in err["message"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer", KEY])
def test_401_with_wrong_key(server, header):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": header})
    assert_error(r, 401, code="invalid_api_key")


def test_ui_needs_the_key_as_password(server):
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/ui/config").status_code == 401
        assert c.post("/ui/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert c.post("/ui/login", data={"username": "me", "password": KEY}).status_code == 200
        assert c.get("/ui/config").status_code == 200


# ---- bad input: each case named ------------------------------------------------------------------
def post_raw(http, path, content: bytes, **headers):
    return http.post(path, content=content, headers={"content-type": "application/json", **headers})


def test_bad_input_malformed_json(http):
    err = assert_error(post_raw(http, "/v1/chat/completions", b'{"model": "x", "messages": [}'), 400, code="invalid_json")
    assert "malformed JSON" in err["message"]
    assert_error(post_raw(http, "/v1/adcopy", b"\xff\xfe not json"), 400, code="invalid_json")


def test_bad_input_empty_and_non_object_body(http):
    assert_error(post_raw(http, "/v1/chat/completions", b""), 400, code="invalid_json")
    assert_error(post_raw(http, "/v1/chat/completions", b"[1, 2]"), 400, code="invalid_type")
    assert_error(post_raw(http, "/v1/chat/completions", b'"hello"'), 400, code="invalid_type")


def test_bad_input_messages_not_a_list(server, http):
    body = chat_body(server)
    body["messages"] = {"role": "user", "content": "hi"}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param="messages", code="invalid_type")


def test_bad_input_temperature_a_string(server, http):
    r = http.post("/v1/chat/completions", json=chat_body(server, temperature="0.7"))
    assert_error(r, 400, param="temperature", code="invalid_type")


@pytest.mark.parametrize(
    "field,value,param",
    [
        ("max_tokens", "8", "max_tokens"),
        ("max_tokens", 0, "max_tokens"),
        ("n", True, "n"),
        ("temperature", 3.5, "temperature"),
        ("top_p", 0, "top_p"),
        ("stream", "yes", "stream"),
        ("stop", [""], "stop.0"),
        ("seed", 1.5, "seed"),
        # adgen's extension fields (character-level repetition control)
        ("dry_multiplier", -0.5, "dry_multiplier"),
        ("dry_multiplier", "0.8", "dry_multiplier"),
        ("dry_base", 0.5, "dry_base"),
        ("dry_allowed_length", 0, "dry_allowed_length"),
        ("no_repeat_char_ngram", 1, "no_repeat_char_ngram"),
        ("loop_detection", "yes", "loop_detection"),
        ("end_after_chars", -1, "end_after_chars"),
        ("end_after_chars", 1.5, "end_after_chars"),
        ("end_bias_per_char", -0.2, "end_bias_per_char"),
        ("banned_strings", [""], "banned_strings.0"),
        ("banned_strings", "<UNK>", "banned_strings"),
    ],
)
def test_bad_input_wrong_types_and_ranges(server, http, field, value, param):
    assert_error(http.post("/v1/chat/completions", json=chat_body(server, **{field: value})), 400, param=param)


def test_bad_input_bad_message(server, http):
    body = chat_body(server)
    body["messages"] = [{"role": "wizard", "content": "hi"}]
    assert_error(http.post("/v1/chat/completions", json=body), 400, param="messages.0.role")
    body["messages"] = [{"role": "user", "content": 42}]
    assert_error(http.post("/v1/chat/completions", json=body), 400)
    body["messages"] = []
    assert_error(http.post("/v1/chat/completions", json=body), 400, param="messages")


def test_bad_input_missing_messages(server, http):
    err = assert_error(http.post("/v1/chat/completions", json={"model": server.state.model_id}), 400,
                       param="messages", code="missing_required_parameter")
    assert "required" in err["message"]
    assert_error(http.post("/v1/adcopy", json={"max_tokens": 4}), 400, param="attributes",
                 code="missing_required_parameter")


def test_bad_input_max_tokens_above_cap(server, http):
    r = http.post("/v1/chat/completions", json=chat_body(server, max_tokens=LIMITS.max_tokens + 1))
    err = assert_error(r, 400, param="max_tokens", code="max_tokens_too_large")
    assert str(LIMITS.max_tokens) in err["message"]
    r = http.post("/v1/chat/completions", json=chat_body(server, max_completion_tokens=10**9))
    assert_error(r, 400, param="max_completion_tokens")
    assert_error(http.post("/v1/adcopy", json={"attributes": CONTENT, "max_tokens": 10**6}), 400, param="max_tokens")


def test_bad_input_n_above_cap(server, http):
    r = http.post("/v1/chat/completions", json=chat_body(server, n=LIMITS.max_n + 1))
    assert_error(r, 400, param="n", code="n_too_large")


def test_bad_input_prompt_too_long(server, http):
    # under the character cap, over the token cap
    r = http.post("/v1/chat/completions", json=chat_body(server, content="连衣裙" * 300))
    err = assert_error(r, 400, param="messages", code="context_length_exceeded")
    assert "tokens" in err["message"]
    # over the character cap (refused before tokenizing)
    r = http.post("/v1/chat/completions", json=chat_body(server, content="裙" * (LIMITS.max_prompt_chars + 1)))
    assert_error(r, 400, code="context_length_exceeded")
    r = http.post("/v1/adcopy", json={"attributes": {"类型": "裙", "描述": "很长" * 400}})
    assert_error(r, 400, param="attributes", code="context_length_exceeded")


def test_bad_input_body_too_big(server, http):
    big = json.dumps(chat_body(server, content="x" * (LIMITS.max_body_bytes + 10))).encode()
    assert_error(post_raw(http, "/v1/chat/completions", big), 413, code="request_too_large")

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(20):
            yield b" " * 8192

    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, code="request_too_large")


def test_bad_input_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing-here"), 404, code="not_found")
    assert_error(http.post("/v2/chat/completions", json={}), 404, code="not_found")
    assert_error(http.get("/v1/chat/completions"), 405, code="method_not_allowed")


def test_bad_input_unknown_model_and_paths_are_never_loaded(server, http, tiny_llama3_dir):
    for model in ["gpt-4o", str(tiny_llama3_dir), "../../etc/passwd", "/etc/passwd"]:
        r = http.post("/v1/chat/completions", json={**chat_body(server), "model": model, "max_tokens": 2})
        assert_error(r, 404, param="model", code="model_not_found")
    assert_error(http.get("/v1/models/" + str(tiny_llama3_dir)), 404, code="model_not_found")
    assert http.get("/v1/models/" + server.state.model_id).json()["id"] == server.state.model_id


def test_bad_input_bad_attributes(http):
    for attrs, fragment in [("类型裙", "not key#value"), ({}, "at least one"), ({"颜色": []}, "at least one"),
                            ({"颜色": "黑#色"}, "contains")]:
        err = assert_error(http.post("/v1/adcopy", json={"attributes": attrs}), 400, param="attributes")
        assert fragment in err["message"], err
    assert_error(http.post("/v1/adcopy", json={"attributes": 42}), 400, param="attributes")
    assert_error(http.post("/v1/adcopy", json={"attributes": CONTENT, "length": "long"}), 400, param="length")


def test_unsupported_features_are_refused_not_ignored(server, http):
    for extra, param in [({"tools": [{"type": "function"}]}, "tools"), ({"logprobs": True}, "logprobs"),
                         ({"presence_penalty": 0.5}, "presence_penalty")]:
        assert_error(http.post("/v1/chat/completions", json=chat_body(server, **extra)), 400, param=param)
    # no-op values of the same fields are fine (clients send them)
    r = http.post("/v1/chat/completions", json=chat_body(server, max_tokens=2, presence_penalty=0, logprobs=False,
                                                         user="u1", some_future_field={"x": 1}))
    assert r.status_code == 200, r.text


def test_flood_of_bad_requests_then_still_answers(server, http):
    """Malformed, wrong-typed, oversized and unauthenticated requests, 200 at once: all 4xx, none 5xx."""

    async def flood():
        bad = [
            (b"{oops", AUTH),
            (json.dumps({"messages": "no"}).encode(), AUTH),
            (b"x" * (LIMITS.max_body_bytes + 1), AUTH),
            (json.dumps(chat_body(server)).encode(), {}),
            (json.dumps(chat_body(server, n=99)).encode(), AUTH),
        ]
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as c:
            reqs = [c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json", **h})
                    for i in range(200) for body, h in [bad[i % len(bad)]]]
            return await asyncio.gather(*reqs)

    statuses = [r.status_code for r in asyncio.run(flood())]
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert {400, 401, 413} <= set(statuses)
    assert http.get("/health").json()["status"] == "ok"
    assert http.post("/v1/chat/completions", json=chat_body(server, max_tokens=2)).status_code == 200


# ---- concurrency, batching, disconnects ---------------------------------------------------------
def test_concurrent_requests_are_batched_and_not_mixed_up(server, http):
    contents = [f"类型#裙*颜色#{c}" for c in ("黑色", "白色", "红色", "蓝色", "绿色", "黄色")]
    expected = [http.post("/v1/adcopy", json={"attributes": c, "max_tokens": 8}).json()["text"] for c in contents]
    before = http.get("/health").json()

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            # a long stream occupies the worker, so the requests below queue up and run as one batch
            async def blocker():
                async with c.stream("POST", "/v1/chat/completions",
                                    json=chat_body(server, max_tokens=60, stream=True, end_after_chars=0,
                                                   loop_detection=False)) as r:
                    return [line async for line in r.aiter_lines()]

            task = asyncio.create_task(blocker())
            await asyncio.sleep(0.15)
            outs = await asyncio.gather(*[c.post("/v1/adcopy", json={"attributes": x, "max_tokens": 8}) for x in contents])
            await task
            return outs

    outs = asyncio.run(burst())
    assert [r.json()["content"] for r in outs] == contents
    assert [r.json()["text"] for r in outs] == expected
    after = http.get("/health").json()
    assert after["continuous_batching"] is True
    assert after["max_batch_seen"] >= 1 + len(contents), after  # they joined the running stream's batch
    assert after["prefix_tokens_saved"] > before["prefix_tokens_saved"]  # the shared system prompt, once


def test_disconnect_mid_stream_stops_generation(server, http):
    wait_idle(http)
    before = http.get("/health").json()
    max_tokens = 1500
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=chat_body(server, max_tokens=max_tokens, stream=True)) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert chunk["choices"][0]["finish_reason"] is None  # still generating
                    if chunk["choices"][0]["delta"].get("content"):
                        seen += 1
                if seen >= 2:
                    break
        # leaving both blocks closes the connection mid-stream
    h = wait_idle(http, timeout=5.0)
    assert h["cancelled"] == before["cancelled"] + 1
    calls = h["model_forward_calls"]
    time.sleep(0.5)
    assert http.get("/health").json()["model_forward_calls"] == calls  # the model really stopped
    assert calls - before["model_forward_calls"] < max_tokens // 5
    # and the server keeps answering
    r = http.post("/v1/chat/completions", json=chat_body(server, max_tokens=3))
    assert r.status_code == 200


def test_disconnect_of_a_queued_non_streaming_request_cancels_it(server, http):
    wait_idle(http)
    before = http.get("/health").json()

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            # a long stream holds the worker while the impatient request waits in the queue
            async with c.stream("POST", "/v1/chat/completions",
                                json=chat_body(server, max_tokens=1500, stream=True, end_after_chars=0,
                                               loop_detection=False)) as blocker:
                lines = blocker.aiter_lines()
                await lines.__anext__()
                async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=0.3) as impatient:
                    with pytest.raises(httpx.ReadTimeout):
                        await impatient.post("/v1/adcopy", json={"attributes": CONTENT, "max_tokens": 1500,
                                                                 "end_after_chars": 0, "loop_detection": False})
                # the server notices the closed connection and drops the job while it is still queued
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    h = (await c.get("/health")).json()
                    if h["cancelled"] == before["cancelled"] + 1:
                        break
                    await asyncio.sleep(0.05)
                assert h["cancelled"] == before["cancelled"] + 1, (h, before)
                assert h["active_generations"] == 1  # the blocker, still streaming
                assert h["queued"] == 0
            # leaving the block disconnects the blocker too

    asyncio.run(scenario())
    h = wait_idle(http)
    assert h["cancelled"] == before["cancelled"] + 2
    assert h["completed"] == before["completed"]  # neither ran to the end


def test_disconnect_of_a_running_non_streaming_request_stops_its_batch(server, http):
    wait_idle(http)
    before = http.get("/health").json()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/adcopy", headers=AUTH, timeout=0.5,
                   json={"attributes": CONTENT, "max_tokens": 1500, "end_after_chars": 0, "loop_detection": False})
    h = wait_idle(http, timeout=5.0)
    assert h["cancelled"] == before["cancelled"] + 1
    calls = h["model_forward_calls"] - before["model_forward_calls"]
    assert 0 < calls < 1500 // 3, calls  # it had started, and stopped early
    r = http.post("/v1/adcopy", json={"attributes": CONTENT, "max_tokens": 3})
    assert r.status_code == 200


def test_a_disconnect_frees_its_slot_and_the_other_streams_go_on(server, http):
    """Three streams decode in one batch; the first client leaves after two pieces. Its row leaves before
    the next step, the model keeps running only for the others, and their texts are what they would be alone."""
    wait_idle(http)
    contents = [f"类型#裙*颜色#{c}" for c in ("黑色", "白色", "红色")]
    alone = [http.post("/v1/adcopy", json={"attributes": c, "max_tokens": 40}).json()["text"] for c in contents[1:]]
    before = http.get("/health").json()

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            async def stream(content, max_tokens, leave_after=None):
                text, pieces = "", 0
                async with c.stream("POST", "/v1/adcopy", json={"attributes": content, "max_tokens": max_tokens,
                                                                 "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if chunk.get("object") == "adcopy.chunk":
                                text += chunk["delta"]
                                pieces += 1
                            elif chunk.get("object") == "adcopy":
                                return chunk["text"]
                        if leave_after is not None and pieces >= leave_after:
                            return None  # leaving the block closes the connection mid-stream
                return text

            return await asyncio.gather(stream(contents[0], 1500, leave_after=2),
                                        *[stream(x, 40) for x in contents[1:]])

    left, *others = asyncio.run(scenario())
    h = wait_idle(http, timeout=10.0)
    assert left is None and others == alone
    assert h["cancelled"] == before["cancelled"] + 1 and h["completed"] == before["completed"] + 2
    calls = h["model_forward_calls"] - before["model_forward_calls"]
    assert calls < 1500 // 5  # the long one stopped soon after its client left


def test_two_adapters_and_the_base_in_one_batch(server, http, tiny_llama3_dir, tiny_llama3_lora_b_dir):
    """`--adapter A --adapter brand-b=B`: /v1/models lists both and the base; concurrent requests for all three
    decode together, each equal to serving that adapter (or the base model) alone."""
    from adgen.generation import DecodingConfig, load_generator

    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids == [server.state.model_id, "brand-b", server.state.base_id]
    assert http.get("/v1/models/brand-b").json()["adapter"] == "brand-b"
    messages = server.state.adcopy_messages(CONTENT)
    wait_idle(http)
    before = http.get("/health").json()

    async def together():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/chat/completions", json={
                "model": m, "messages": messages, "max_tokens": 30}) for m in ids * 2])

    outs = [r.json()["choices"][0]["message"]["content"] for r in asyncio.run(together())]
    assert outs[:3] == outs[3:] and len(set(outs[:3])) == 3
    config = DecodingConfig(max_new_tokens=30)
    b_alone = load_generator(str(tiny_llama3_dir), adapter=str(tiny_llama3_lora_b_dir), continuous=False)
    base_alone = load_generator(str(tiny_llama3_dir), continuous=False)
    assert outs[1] == b_alone.generate([messages], config)[0].text
    assert outs[2] == base_alone.generate([messages], config)[0].text
    assert before["failed"] == http.get("/health").json()["failed"]


# ---- operations: /metrics, access log --------------------------------------------------------------
def _metrics(http) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_in_prometheus_format(server, http):
    assert httpx.get(server.url + "/metrics").status_code == 401  # behind the key, like the API
    wait_idle(http)
    before = _metrics(http)
    done = ("adgen_requests_total", (("kind", "complete"), ("outcome", "completed")))
    streamed = ("adgen_requests_total", (("kind", "stream"), ("outcome", "completed")))
    http.post("/v1/chat/completions", json=chat_body(server, max_tokens=5))
    r = http.post("/v1/chat/completions", json=chat_body(server, max_tokens=5)).json()
    with http.stream("POST", "/v1/chat/completions", json=chat_body(server, max_tokens=5, stream=True)) as s:
        assert any(line == "data: [DONE]" for line in s.iter_lines())
    wait_idle(http)
    after = _metrics(http)
    assert after[done] == before.get(done, 0) + 2 and after[streamed] == before.get(streamed, 0) + 1
    generated = after[("adgen_generated_tokens_total", ())] - before.get(("adgen_generated_tokens_total", ()), 0)
    assert generated >= 2 * r["usage"]["completion_tokens"] + 1
    ttft = ("adgen_time_to_first_token_seconds_count", (("kind", "stream"),))
    assert after[ttft] == before.get(ttft, 0) + 1
    assert ("adgen_request_latency_seconds_bucket", (("kind", "complete"), ("le", "+Inf"))) in after
    assert after[("adgen_queue_depth", ())] == 0 and after[("adgen_running_requests", ())] == 0
    assert after[("adgen_prefix_tokens_saved", ())] > 0  # the third prompt reuses the shared start


def test_access_log_is_one_json_line_per_request(server, http, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="adgen.access")
    http.post("/v1/chat/completions", json=chat_body(server, max_tokens=2))
    http.post("/v1/chat/completions", content=b"{not json")
    deadline = time.monotonic() + 5
    while len([r for r in caplog.records if r.name == "adgen.access"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "adgen.access"]
    assert [(x["method"], x["path"], x["status"]) for x in lines[-2:]] == [
        ("POST", "/v1/chat/completions", 200), ("POST", "/v1/chat/completions", 400)]
    assert all(x["duration_ms"] >= 0 and x["bytes_out"] > 0 and len(x["request_id"]) == 16 for x in lines[-2:])


def test_shutdown_cancels_running_and_waiting_streams_cleanly(tiny_llama3_dir):
    """`Scheduler.close()` (the server's shutdown): a running stream and one waiting for a slot both end
    (their iterators finish, no error), the worker thread exits, nothing is left running."""
    from adgen.generation import DecodingConfig, load_generator
    from adgen.serve.scheduler import Scheduler

    gen = load_generator(str(tiny_llama3_dir), dtype="fp32", device="cpu", batch_size=1)
    sched = Scheduler(gen, live_reserve=0)  # one slot in all (no extra slot kept for live requests)
    long = DecodingConfig(max_new_tokens=1500, dry_multiplier=0.0, loop_detection=False)

    async def scenario():
        running = sched.open_stream(["类型#裙"], long)
        waiting = sched.open_stream(["类型#裤"], long)  # one slot: this one waits
        first = await running.__anext__()
        await asyncio.to_thread(sched.close)
        rest = [e async for e in running]
        queued = [e async for e in waiting]
        return first, rest, queued

    first, rest, queued = asyncio.run(scenario())
    assert first[0] == "piece" and all(kind == "piece" for kind, *_ in rest) and queued == []
    assert not sched._thread.is_alive()
    st = sched.stats()
    assert st["cancelled"] == 2 and st["active_generations"] == 0 and st["running_requests"] == 0


# ---- fuzz: the API's own OpenAPI schema, positive and negative cases, never a 5xx ----------------
@pytest.fixture(scope="module")
def fuzz_server(tiny_llama3_dir, tiny_llama3_lora_dir, tmp_path_factory):
    """Its own server with small caps, so every valid case the fuzzer makes generates only a few tokens."""
    limits = Limits(max_body_bytes=16_000, max_prompt_chars=2_000, max_prompt_tokens=256, max_tokens=6,
                    default_max_tokens=4, max_n=2, max_queue=64, max_file_bytes=8_000, max_batch_lines=8)
    settings = ServeSettings(model=str(tiny_llama3_dir), adapter=str(tiny_llama3_lora_dir), api_key=KEY,
                             limits=limits, batch_size=4, ui=False, state_dir=str(tmp_path_factory.mktemp("fuzz")))
    state, app = build(settings)
    with ServerThread(app, state=state) as srv:
        yield srv


BODY_ROUTES = [("/v1/chat/completions", "POST"), ("/v1/adcopy", "POST"), ("/v1/completions", "POST"),
               ("/v1/files", "POST"), ("/v1/batches", "POST")]
# routes whose only inputs are strings in the path or query: every string is valid there, so no negative cases
PATH_ROUTES = [("/v1/files/{file_id}", "GET"), ("/v1/files/{file_id}/content", "GET"), ("/v1/files/{file_id}", "DELETE"),
               ("/v1/batches", "GET"), ("/v1/batches/{batch_id}", "GET"), ("/v1/batches/{batch_id}/cancel", "POST")]


@pytest.mark.parametrize("path,method,mode", [(p, m, mode) for p, m in BODY_ROUTES for mode in ("positive", "negative")]
                         + [(p, m, "positive") for p, m in PATH_ROUTES])
def test_fuzz_from_the_openapi_schema_never_gets_a_5xx(fuzz_server, path, method, mode):
    """schemathesis makes request bodies from the served schema (valid ones, and ones that break it on
    purpose), sent to the real server on loopback: every answer is < 500, and the broken ones are 4xx
    in OpenAI's error shape. Bounded: 30 cases per route and mode, derandomized (the same cases each run)."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode
    from schemathesis.openapi import from_dict

    served = httpx.get(fuzz_server.url + "/openapi.json", headers=AUTH, timeout=30).json()  # what clients read
    operation = from_dict(served)[path][method]
    statuses: list[int] = []

    @settings(max_examples=30, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def fuzz(case):
        r = case.call(base_url=fuzz_server.url, headers=AUTH, timeout=30)
        statuses.append(r.status_code)
        assert r.status_code < 500, (case.body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()) == {"error"}, r.text[:300]

    fuzz()
    assert statuses
    if mode == "negative":
        assert any(400 <= s < 500 for s in statuses)
    elif path in ("/v1/chat/completions", "/v1/completions"):
        assert 200 in statuses  # valid cases reach generation (adcopy's schema-valid attribute strings rarely parse)
    with httpx.Client(base_url=fuzz_server.url, headers=AUTH, timeout=30) as c:
        assert c.get("/health").json()["status"] == "ok"
