"""Serving pieces without a real model: bind policy, CLI refusals, the scheduler (batching, queue
limit, cancellation) with a scripted fake generator, UI form <-> AdGen string."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from adgen.cli import main
from adgen.errors import ConfigError
from adgen.generation import DecodingConfig, Generation
from adgen.serve.scheduler import QueueFull, Scheduler
from adgen.serve.settings import Limits, ServeSettings, check_bind, is_loopback
from adgen.serve.webui import content_to_form, form_to_content, format_figures

from fake_generator import FakeGeneratorBase


# ---- bind policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(host)
    check_bind(host, None, False)  # fine without a key


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.com", "localhost.evil.com"])
def test_non_loopback_needs_key_or_insecure(host):
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match="refusing to bind"):
        check_bind(host, None, False)
    check_bind(host, "k", False)
    check_bind(host, None, True)


def test_cli_refuses_public_bind_without_key_before_loading(monkeypatch, capsys):
    monkeypatch.delenv("ADGEN_API_KEY", raising=False)
    t = time.monotonic()
    # the model does not exist: the bind check must fail first, without touching it
    assert main(["serve", "--model", "/nonexistent/model", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to bind to 0.0.0.0" in err and "--api-key" in err
    assert time.monotonic() - t < 5


def test_cli_key_from_environment_allows_public_bind(monkeypatch, capsys):
    monkeypatch.setenv("ADGEN_API_KEY", "from-env")
    assert main(["serve", "--model", "/nonexistent/model", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing" not in err and "not found" in err  # got past the bind check, to the model


def test_cli_rejects_inconsistent_limits(capsys):
    assert main(["serve", "--model", "x", "--max-n", "0"]) == 2
    assert "max_n" in capsys.readouterr().err


def _serve_settings(argv):
    import argparse

    from adgen.commands import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    return serve.settings_from_args(parser.parse_args(["serve", *argv]))


def test_cli_several_adapters_by_name(tmp_path):
    a = tmp_path / "brand-a"
    settings = _serve_settings(["--model", "m", "--adapter", str(a), "--adapter", "b=/x/brand-b",
                                "--adapter", "/y/brand-c"])
    assert settings.adapter == str(a) and settings.adapter_name is None  # named after its directory later
    assert settings.extra_adapters == {"b": "/x/brand-b", "brand-c": "/y/brand-c"}
    named = _serve_settings(["--model", "m", "--adapter", "tone-a=/x/a"])
    assert named.adapter == "/x/a" and named.adapter_name == "tone-a"
    with pytest.raises(ConfigError, match="distinct name"):
        _serve_settings(["--model", "m", "--adapter", "/x/a", "--adapter", "b=/x/1", "--adapter", "b=/x/2"])
    assert _serve_settings(["--model", "m"]).continuous_batching is True
    assert _serve_settings(["--model", "m", "--no-continuous-batching"]).continuous_batching is False


def test_limits_validate():
    Limits().validate()
    with pytest.raises(ConfigError):
        Limits(max_tokens=10, default_max_tokens=20).validate()


def test_settings_key_from_env(monkeypatch):
    monkeypatch.setenv("ADGEN_API_KEY", "k1")
    assert ServeSettings(model="m").resolved_api_key() == "k1"
    assert ServeSettings(model="m", api_key="k2").resolved_api_key() == "k2"
    monkeypatch.setenv("ADGEN_API_KEY", "")
    assert ServeSettings(model="m").resolved_api_key() is None


# ---- scheduler with a scripted generator ---------------------------------------------------------
class FakeStream:
    def __init__(self, gen, prompt, cancel):
        self.gen, self.prompt, self.cancel = gen, prompt, cancel
        self.generation = None

    def __iter__(self):
        for i in range(self.gen.stream_len):
            if self.cancel.is_set():
                self.generation = Generation("", 1, i, "cancelled")
                return
            self.gen.steps += 1
            self.gen.release.wait(5)
            time.sleep(0.002)
            yield f"{self.prompt}:{i};"
        text = "".join(f"{self.prompt}:{i};" for i in range(self.gen.stream_len))
        self.generation = Generation(text, 1, self.gen.stream_len, "length")


class FakeGenerator(FakeGeneratorBase):

    def __init__(self, stream_len=5):
        self.stream_len = stream_len
        self.calls: list[list] = []
        self.steps = 0
        self.release = threading.Event()
        self.release.set()

    def generate(self, prompts, config):
        self.calls.append(list(prompts))
        return [Generation(f"out({p})", 1, 2, "stop") for p in prompts]

    def stream(self, prompt, config=None, cancel=None):
        return FakeStream(self, prompt, cancel)


def test_scheduler_batches_compatible_waiting_requests():
    gen = FakeGenerator()
    sched = Scheduler(gen, max_queue=16)
    greedy = DecodingConfig(max_new_tokens=4)

    async def run():
        gen.release.clear()  # the stream below holds the worker
        handle = sched.open_stream(["s"], greedy)
        await asyncio.sleep(0.05)
        tasks = [asyncio.create_task(sched.complete([f"p{i}"], greedy)) for i in range(5)]
        other = asyncio.create_task(sched.complete(["q"], DecodingConfig(max_new_tokens=9)))
        seeded = [asyncio.create_task(sched.complete([f"r{i}"], DecodingConfig(do_sample=True, seed=i)))
                  for i in range(2)]
        await asyncio.sleep(0.05)
        gen.release.set()
        async for _ in handle:
            pass
        return await asyncio.gather(*tasks), await other, await asyncio.gather(*seeded)

    outs, other, seeded = asyncio.run(run())
    assert [o[0].text for o in outs] == [f"out(p{i})" for i in range(5)]  # each gets its own
    assert other[0].text == "out(q)"
    assert ["p0", "p1", "p2", "p3", "p4"] in gen.calls  # one batch
    assert ["q"] in gen.calls  # different settings: not batched with them
    assert ["r0"] in gen.calls and ["r1"] in gen.calls  # seeded samples never share a batch
    assert sched.stats()["max_batch_seen"] == 5
    sched.close()


def test_scheduler_greedy_n_computes_once():
    gen = FakeGenerator()
    sched = Scheduler(gen)
    out = asyncio.run(sched.complete(["a"] * 3, DecodingConfig()))
    assert [c.index for c in out] == [0, 1, 2] and {c.text for c in out} == {"out(a)"}
    assert gen.calls == [["a"]]
    out = asyncio.run(sched.complete(["a"] * 2, DecodingConfig(do_sample=True)))
    assert gen.calls[-1] == ["a", "a"]  # sampling: each choice is drawn
    sched.close()


def test_scheduler_queue_limit():
    gen = FakeGenerator()
    sched = Scheduler(gen, max_queue=2)

    async def run():
        gen.release.clear()
        running = sched.open_stream(["s"], DecodingConfig())
        await asyncio.sleep(0.05)  # taken by the worker: no longer queued
        waiting = [sched.open_stream([f"w{i}"], DecodingConfig()) for i in range(2)]
        with pytest.raises(QueueFull):
            sched.open_stream(["x"], DecodingConfig())
        gen.release.set()
        for h in [running, *waiting]:
            async for _ in h:
                pass

    asyncio.run(run())
    sched.close()


def test_scheduler_stream_cancel_stops_and_frees_the_worker():
    gen = FakeGenerator(stream_len=10_000)
    sched = Scheduler(gen)

    async def run():
        handle = sched.open_stream(["s"], DecodingConfig())
        pieces = []
        async for kind, _i, payload in handle:
            pieces.append(payload)
            if len(pieces) == 3:
                await handle.aclose()
                break
        deadline = time.monotonic() + 2
        while sched.stats()["active_generations"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return await sched.complete(["after"], DecodingConfig())

    out = asyncio.run(run())
    assert out[0].text == "out(after)"
    assert gen.steps < 200
    deadline = time.monotonic() + 2
    while sched.stats()["active_generations"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker counts itself idle just after answering
    st = sched.stats()
    assert st["cancelled"] == 1 and st["active_generations"] == 0
    sched.close()


def test_scheduler_survives_generator_errors():
    gen = FakeGenerator()
    gen.generate = lambda prompts, config: (_ for _ in ()).throw(RuntimeError("boom"))
    sched = Scheduler(gen)
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(sched.complete(["a"], DecodingConfig()))
    stream_out = []

    async def consume():
        async for item in sched.open_stream(["s"], DecodingConfig()):
            stream_out.append(item)

    asyncio.run(consume())  # the worker is still alive
    assert stream_out[-1][0] == "done"
    assert sched.stats()["failed"] == 1
    sched.close()


# ---- a real server around the fake generator: 429 when the queue is full -----------------------
class FakeFormatter:
    def messages(self, content):
        return [{"role": "user", "content": content}]


class FakeServedGenerator(FakeGenerator):
    formatter = FakeFormatter()
    device = "cpu"
    tokenizer = None

    def prompt_ids(self, prompt):
        return [1] * 5


def test_full_queue_is_429_and_server_keeps_answering():
    from adgen.serve.api import create_app
    from adgen.serve.server import ServerThread
    from adgen.serve.service import ServeState

    gen = FakeServedGenerator(stream_len=3)
    gen.release.clear()
    state = ServeState(gen, ServeSettings(model="fake", limits=Limits(max_queue=2)), vocab=object(), examples=[])
    app = create_app(state, ui=False)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with ServerThread(app, state=state) as srv:

        async def flood():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=body)) for _ in range(8)]
                await asyncio.sleep(0.5)
                health = await c.get("/health")
                gen.release.set()
                return health, await asyncio.gather(*tasks)

        gen.generate_block = True
        original = gen.generate

        def slow_generate(prompts, config):
            gen.release.wait(5)
            return original(prompts, config)

        gen.generate = slow_generate
        health, responses = asyncio.run(flood())
        codes = sorted(r.status_code for r in responses)
        assert health.status_code == 200  # answered while the worker was stuck
        assert codes.count(429) >= 1 and codes.count(200) >= 2, codes
        err = next(r for r in responses if r.status_code == 429)
        assert err.json()["error"]["code"] == "rate_limit_exceeded"
        assert err.headers["retry-after"] == "1"
        ok = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=10)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"].startswith("out(")


# ---- UI form <-> AdGen content -------------------------------------------------------------------
def test_form_to_content():
    content, pairs = form_to_content("裙", [("颜色", "黑色"), ("版型", "宽松，显瘦"), ("", ""), (" 风格 ", " 简约 ")])
    assert content == "类型#裙*颜色#黑色*版型#宽松*版型#显瘦*风格#简约"
    assert pairs[0] == ("类型", "裙")
    # the raw box wins
    assert form_to_content("裙", [("颜色", "黑色")], "类型#裤*颜色#白色")[0] == "类型#裤*颜色#白色"
    for category, rows, raw, msg in [
        ("", [], "", "give a category"),
        ("裙", [("颜色", "")], "", "needs both"),
        ("裙", [("颜色", "黑#色")], "", "contains"),
        ("", [], "类型裙", "not key#value"),
    ]:
        with pytest.raises(ValueError, match=msg):
            form_to_content(category, rows, raw)


def test_content_to_form_round_trip():
    content = "类型#上衣*版型#宽松*版型#显瘦*材质#蚕丝*图案#印花*衣样式#衬衫"
    category, rows = content_to_form(content, n_rows=8)
    assert category == "上衣"
    assert rows[0] == ("版型", "宽松，显瘦") and len(rows) == 8 and rows[-1] == ("", "")
    assert form_to_content(category, rows)[0] == content


def test_format_figures():
    fig = {"attr_coverage": 0.5, "attr_missing": ["白色"], "n_contradictions": 1, "n_hallucinated": 0,
           "contradictions": [{"key": "颜色", "value": "黑色", "input": ["白色"]}], "hallucinated": [],
           "chinese_share": 1.0, "length_chars": 12}
    md = format_figures(fig)
    assert "50%" in md and "缺失 missing: 白色" in md and "颜色 写成「黑色」" in md
    assert format_figures(None) == ""


# ---- CORS: off unless configured -----------------------------------------------------------------
@pytest.mark.parametrize("origins", [[], ["https://shop.example"]])
def test_cors_only_when_configured(origins):
    from adgen.serve.api import create_app
    from adgen.serve.server import ServerThread
    from adgen.serve.service import ServeState

    settings = ServeSettings(model="fake", cors_origins=origins, api_key="k")
    state = ServeState(FakeServedGenerator(), settings, vocab=object(), examples=[])
    preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with ServerThread(create_app(state, ui=False), state=state) as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers=preflight)
        got = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://shop.example", "Authorization": "Bearer k"})
        evil = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        no_key = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://shop.example"})
    assert no_key.status_code == 401  # CORS never bypasses the key
    assert "access-control-allow-origin" not in evil.headers
    if origins:
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://shop.example"
        assert got.headers["access-control-allow-origin"] == "https://shop.example"
        assert no_key.headers["access-control-allow-origin"] == "https://shop.example"  # the browser sees the 401
    else:
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in got.headers


def test_repetition_fields_reach_the_decoding_config_and_loops_are_reported():
    from adgen.serve.endpoints import _finish
    from adgen.serve.schemas import ChatCompletionRequest, parse_body
    from adgen.serve.service import ServeState

    state = ServeState(FakeServedGenerator(), ServeSettings(model="fake"), vocab=object(), examples=[])
    body = b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'
    default = state.decoding_config(parse_body(ChatCompletionRequest, body))
    assert default.dry_multiplier == DecodingConfig().dry_multiplier and default.loop_detection  # on by default
    body = (b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "dry_multiplier": 0, '
            b'"no_repeat_char_ngram": 5, "loop_detection": false, "dry_allowed_length": 4, "end_after_chars": 0, '
            b'"end_bias_per_char": 0.5}')
    cfg = state.decoding_config(parse_body(ChatCompletionRequest, body))
    assert (cfg.dry_multiplier, cfg.no_repeat_char_ngram, cfg.loop_detection, cfg.dry_allowed_length) == (0, 5, False, 4)
    assert (cfg.end_after_chars, cfg.end_bias_per_char) == (0, 0.5) and default.ends_copy
    # a loop is an OpenAI "stop", with vLLM's stop_reason field saying why
    assert _finish("loop") == {"finish_reason": "stop", "stop_reason": "loop"}
    assert _finish("stop") == {"finish_reason": "stop"} and _finish("length") == {"finish_reason": "length"}


def test_a_subnormal_repetition_penalty_is_a_400_not_a_failed_generation():
    """Found by the schema fuzzer: 5e-324 passed `> 0` and divided logits into inf (NaN probabilities, a 500)."""
    import json as _json

    from adgen.serve.schemas import ChatCompletionRequest, parse_body
    from adgen.serve.security import ApiError

    body = {"model": "m", "messages": [{"role": "user", "content": "类型#裙"}], "repetition_penalty": 5e-324}
    with pytest.raises(ApiError) as e:
        parse_body(ChatCompletionRequest, _json.dumps(body).encode())
    assert e.value.status == 400 and "repetition_penalty" in str(e.value)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        DecodingConfig(repetition_penalty=5e-324).validate()
