"""The Batch API's runner and stores without a model: bad lines become error rows, a killed run resumes with
every custom_id exactly once, a cancel keeps what finished. (The HTTP routes with a real model and the openai
client: tests/test_batches_api.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest

from adgen.serve.batches import BatchRunner, BatchStore, FileStore
from adgen.serve.security import ApiError

URL = "/v1/adcopy"


def line(custom_id, body=None, url=URL) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body or {"attributes": "类型#裙"}})


class Handler:
    """Answers like a live route: a 400 for a body it refuses; blocks before answering while `gate` is closed."""

    def __init__(self, block_after: int | None = None) -> None:
        self.seen: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.cancelled = 0
        self.block_after = block_after  # rows answered before the gate closes by itself

    async def __call__(self, body: dict):
        if body.get("attributes") == "bad":
            raise ApiError(400, "attributes: not key#value pairs", param="attributes")
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.seen.append(body["attributes"])
        if self.block_after is not None and len(self.seen) >= self.block_after:
            self.gate.clear()
        return 200, {"object": "adcopy", "text": "copy of " + body["attributes"]}


def runner_for(tmp_path, handler, in_flight=2) -> BatchRunner:
    return BatchRunner(FileStore(tmp_path), BatchStore(tmp_path), {URL: handler}, in_flight=in_flight)


async def wait_status(runner, batch_id, statuses, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        batch = runner.store.get(batch_id)
        if batch["status"] in statuses:
            return batch
        assert asyncio.get_running_loop().time() < deadline, batch
        await asyncio.sleep(0.01)


def output_rows(runner, file_id):
    return [json.loads(x) for x in runner.files.content(file_id).decode().splitlines()] if file_id else []


def test_bad_lines_are_error_rows_and_the_batch_completes(tmp_path):
    text = "\n".join([line("a", {"attributes": "类型#裙"}), "{not json", line("b", {"attributes": "bad"}),
                      line("a", {"attributes": "again"}), line("c", url="/v1/chat/completions"),
                      json.dumps({"method": "POST", "url": URL, "body": {}}), line("d", {"attributes": "类型#裤"})]) + "\n"

    async def run():
        handler = Handler()
        runner = runner_for(tmp_path, handler)
        f = runner.files.create(text.encode(), filename="in.jsonl", purpose="batch")
        batch = runner.create(f["id"], URL)
        batch = await wait_status(runner, batch["id"], ("completed",))
        return runner, batch, handler

    runner, batch, handler = asyncio.run(run())
    assert batch["request_counts"] == {"total": 7, "completed": 2, "failed": 5}
    ok = output_rows(runner, batch["output_file_id"])
    assert sorted(r["custom_id"] for r in ok) == ["a", "d"]
    assert {r["response"]["body"]["text"] for r in ok} == {"copy of 类型#裙", "copy of 类型#裤"}
    errors = {(r["custom_id"], (r["error"] or r["response"]["body"]["error"]).get("code")) for r in
              output_rows(runner, batch["error_file_id"])}
    assert errors == {(None, "invalid_json_line"), ("b", None), ("a", "duplicate_custom_id"),
                      ("c", "mismatched_endpoint"), (None, "missing_custom_id")}
    bad = next(r for r in output_rows(runner, batch["error_file_id"]) if r["custom_id"] == "b")
    assert bad["response"]["status_code"] == 400 and "attributes" in bad["response"]["body"]["error"]["message"]
    assert sorted(handler.seen) == ["类型#裙", "类型#裤"]  # the duplicate never ran


def test_a_killed_batch_resumes_and_holds_every_custom_id_once(tmp_path):
    ids = [f"r{i}" for i in range(8)]
    text = "".join(line(i, {"attributes": f"类型#{i}"}) + "\n" for i in ids)

    async def first_server():
        handler = Handler(block_after=3)  # then the rest hang in the model ...
        runner = runner_for(tmp_path, handler)
        batch = runner.create(runner.files.create(text.encode(), filename="in.jsonl", purpose="batch")["id"], URL)
        while len(handler.seen) < 3:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        await runner.close()  # ... when the server goes down
        return batch["id"], list(handler.seen)

    batch_id, before = asyncio.run(first_server())
    assert len(before) == 3
    rows_file = tmp_path / "batches" / batch_id / "rows.jsonl"
    with open(rows_file, "ab") as f:
        f.write(b'{"id": "batch_req_x", "custom_id": "r7", "respo')  # a write the kill cut short

    async def second_server():
        handler = Handler()
        runner = runner_for(tmp_path, handler)
        assert runner.resume_all() == [batch_id]
        return await wait_status(runner, batch_id, ("completed",)), handler, runner

    batch, handler, runner = asyncio.run(second_server())
    rows = output_rows(runner, batch["output_file_id"])
    assert sorted(r["custom_id"] for r in rows) == ids  # each exactly once
    assert batch["error_file_id"] is None and batch["request_counts"]["completed"] == 8
    assert sorted(before + handler.seen) == sorted(f"类型#{i}" for i in ids)  # nothing ran twice


def test_cancel_stops_the_rows_in_flight_and_keeps_what_finished(tmp_path):
    text = "".join(line(f"r{i}", {"attributes": f"类型#{i}"}) + "\n" for i in range(6))

    async def run():
        handler = Handler(block_after=2)
        runner = runner_for(tmp_path, handler, in_flight=2)
        batch = runner.create(runner.files.create(text.encode(), filename="in.jsonl", purpose="batch")["id"], URL)
        while len(handler.seen) < 2:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # two rows now wait in the model
        assert runner.cancel(batch["id"])["status"] == "cancelling"
        batch = await wait_status(runner, batch["id"], ("cancelled",))
        assert runner.cancel(batch["id"])["status"] == "cancelled"  # cancelling again: no change
        with pytest.raises(ApiError) as e:
            runner.cancel("batch_nonexistent0")
        return batch, handler, runner, e.value

    batch, handler, runner, missing = asyncio.run(run())
    assert handler.cancelled == 2  # the rows in flight were abandoned, not waited for
    done = output_rows(runner, batch["output_file_id"])
    assert len(done) == len(handler.seen) >= 2 and batch["request_counts"]["completed"] == len(done)
    assert batch["cancelled_at"] is not None and missing.status == 404


def test_file_store_limits_and_ids(tmp_path):
    from adgen.serve.batches.files import FileLimits

    files = FileStore(tmp_path, FileLimits(max_bytes=100, max_lines=2))
    with pytest.raises(ApiError) as e:
        files.create(b"x" * 101, filename="big.jsonl", purpose="batch")
    assert e.value.status == 413
    with pytest.raises(ApiError, match="at most 2"):
        files.create(b"{}\n{}\n{}\n", filename="long.jsonl", purpose="batch")
    with pytest.raises(ApiError, match="purpose"):
        files.create(b"{}\n", filename="a.jsonl", purpose="fine-tune")
    f = files.create(b"{}\n", filename="a.jsonl", purpose="batch")
    assert files.get(f["id"])["bytes"] == 3 and files.content(f["id"]) == b"{}\n"
    for bad in ("../batches", "file-../../x", "nope"):
        with pytest.raises(ApiError) as e:
            files.get(bad)
        assert e.value.status == 404
    assert files.delete(f["id"])["deleted"] and files.list() == []
