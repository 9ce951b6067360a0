"""The Batch API and /v1/completions on the real server (tiny random Llama-3), driven with the official `openai`
client: upload, create, poll, read; bad lines; cancel; the key; /metrics; and a server killed with SIGKILL mid-batch
that finishes the batch after a restart with every custom_id exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from adgen.serve.server import ServerThread, build, free_port
from adgen.serve.settings import Limits, ServeSettings

KEY = "batch-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
COLORS = ["黑色", "白色", "红色", "蓝色", "绿色", "灰色", "粉色", "黄色"]


@pytest.fixture(scope="module")
def server(tiny_llama3_dir, tmp_path_factory):
    limits = Limits(max_tokens=400, default_max_tokens=8, max_queue=64)
    settings = ServeSettings(model=str(tiny_llama3_dir), api_key=KEY, limits=limits, batch_size=8, ui=False,
                             state_dir=str(tmp_path_factory.mktemp("state")))
    state, app = build(settings)
    with ServerThread(app, state=state) as srv:
        srv.state = state
        yield srv


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_line(custom_id: str, model: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def wait_for(client, batch_id: str, statuses: tuple[str, ...], timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


def rows_of(client, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


def test_the_openai_client_runs_a_batch_of_24_chat_requests(server, client):
    model = server.state.model_id
    lines = [chat_line(f"req-{i}", model, f"类型#裙*颜色#{COLORS[i % 8]}*图案#{i}") for i in range(24)]
    uploaded = client.files.create(file=("catalog.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"catalog": "spring"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"catalog": "spring"}
    batch = wait_for(client, batch.id, ("completed", "failed"))
    assert batch.status == "completed" and batch.error_file_id is None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (24, 24, 0)
    rows = rows_of(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"req-{i}" for i in range(24))  # one row each
    assert all(r["response"]["status_code"] == 200 and r["response"]["body"]["object"] == "chat.completion"
               for r in rows)
    # a batch row is answered exactly as the live route answers the same request (greedy)
    row = next(r for r in rows if r["custom_id"] == "req-5")
    live = client.chat.completions.create(**lines[5]["body"])
    assert row["response"]["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_bad_lines_become_error_rows_not_a_failed_batch(server, client):
    model = server.state.model_id
    lines = [json.dumps(chat_line("ok", model, "类型#裤")), "{broken json",
             json.dumps(chat_line("too-long", model, "类型#裤", max_tokens=100_000)),
             json.dumps(chat_line("no-messages", model, "x") | {"body": {"model": model}}),
             json.dumps({**chat_line("streamed", model, "类型#裤"), "body": {**chat_line("s", model, "类型#裤")["body"],
                                                                           "stream": True}})]
    f = client.files.create(file=("mixed.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = wait_for(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                   completion_window="24h").id, ("completed", "failed"))
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 4)
    errors = {r["custom_id"]: r for r in rows_of(client, batch.error_file_id)}
    assert set(errors) == {None, "too-long", "no-messages", "streamed"}
    assert errors[None]["error"]["code"] == "invalid_json_line" and errors[None]["error"]["line"] == 2
    assert errors["too-long"]["response"]["status_code"] == 400
    assert errors["too-long"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert errors["no-messages"]["response"]["body"]["error"]["param"] == "messages"
    assert errors["streamed"]["response"]["body"]["error"]["param"] == "stream"


def test_cancel_stops_the_batch_within_a_step_and_keeps_what_finished(server, client):
    model = server.state.model_id
    long = {"max_tokens": 300, "end_after_chars": 0, "loop_detection": False, "banned_strings": []}
    lines = [chat_line(f"r{i}", model, f"类型#裙*颜色#{COLORS[i % 8]}", **long) for i in range(40)]
    f = client.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    http = httpx.Client(base_url=server.url, headers=AUTH, timeout=30)
    while http.get("/health").json()["running_requests"] == 0:
        time.sleep(0.02)
    steps = http.get("/health").json()["decode_steps"]
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = wait_for(client, batch.id, ("cancelled",), timeout=30)
    deadline = time.monotonic() + 10
    while http.get("/health").json()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert http.get("/health").json()["running_requests"] == 0
    assert http.get("/health").json()["decode_steps"] - steps < 150  # not the 300 steps a row would take
    done = rows_of(client, batch.output_file_id)
    assert batch.request_counts.completed == len(done) < 40 and batch.cancelled_at is not None


def test_the_key_guards_every_file_and_batch_route_and_metrics_count_them(server, client):
    for method, path in [("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/batches"),
                         ("POST", "/v1/batches"), ("GET", "/v1/batches/batch_x/cancel"), ("GET", "/openapi.json")]:
        r = httpx.request(method, server.url + path, timeout=10)
        assert r.status_code == 401, (method, path, r.status_code)
    metrics = httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    assert 'adgen_batches{status="completed"}' in metrics and 'adgen_batch_rows_total{outcome="completed"}' in metrics
    completed = [x for x in metrics.splitlines() if x.startswith('adgen_batch_rows_total{outcome="completed"}')]
    assert float(completed[0].split()[-1]) >= 1


def test_completions_take_raw_prompts(server, client):
    """/v1/completions: no chat template; n choices per prompt numbered as OpenAI does; stream == non-stream."""
    model = server.state.model_id
    out = client.completions.create(model=model, prompt=["类型#裙*颜色#黑色\n", "类型#裤\n"], max_tokens=6)
    assert [c.index for c in out.choices] == [0, 1] and out.object == "text_completion"
    tok = server.state.generator.tokenizer
    assert out.usage.prompt_tokens == sum(len(tok(p)["input_ids"]) for p in ["类型#裙*颜色#黑色\n", "类型#裤\n"])
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "类型#裤\n"}], max_tokens=6)
    one = client.completions.create(model=model, prompt="类型#裤\n", max_tokens=6)
    assert one.usage.prompt_tokens == len(tok("类型#裤\n")["input_ids"]) < chat.usage.prompt_tokens  # no template
    assert one.choices[0].text == out.choices[1].text  # the same prompt alone or beside another
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=model, prompt="类型#裤\n",
                                                                              max_tokens=6, stream=True)
                       if c.choices)
    assert streamed == out.choices[1].text
    echoed = client.completions.create(model=model, prompt="类型#裤\n", max_tokens=6, echo=True)
    assert echoed.choices[0].text == "类型#裤\n" + out.choices[1].text
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=10,
                   json={"model": model, "prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


@pytest.mark.slow
def test_a_batch_survives_kill_9_of_the_server(tiny_llama3_dir, tmp_path):
    """SIGKILL mid-batch, restart with the same --state-dir: the batch completes; every custom_id exactly once."""
    from openai import OpenAI

    state = tmp_path / "state"
    port = free_port()
    cmd = [sys.executable, "-m", "adgen", "serve", "--model", str(tiny_llama3_dir), "--port", str(port), "--no-ui",
           "--state-dir", str(state), "--batch-size", "4", "--api-key", KEY, "--log-level", "warning"]
    env = {**os.environ, "ADGEN_API_KEY": KEY}

    def start():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", headers=AUTH, timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)

    proc = start()
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    long = {"max_tokens": 40, "end_after_chars": 0, "loop_detection": False, "banned_strings": []}
    ids = [f"row-{i}" for i in range(32)]
    lines = [chat_line(cid, model, f"类型#裙*颜色#{COLORS[i % 8]}*编号#{i}", **long) for i, cid in enumerate(ids)]
    f = client.files.create(file=("catalog.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    rows_file = state / "batches" / batch.id / "rows.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not rows_file.exists() or rows_file.read_bytes().count(b"\n") < 4:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        finished_before = rows_file.read_bytes().count(b"\n")
        assert finished_before < 32  # killed mid-batch
        proc = start()
        batch = wait_for(client, batch.id, ("completed", "failed"))
        rows = rows_of(client, batch.output_file_id)
    finally:
        proc.kill()
        proc.wait(10)
    assert batch.status == "completed" and batch.request_counts.completed == 32
    assert sorted(r["custom_id"] for r in rows) == sorted(ids)  # every custom_id exactly once
