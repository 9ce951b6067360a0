"""Run batches on the server's own engine, at the lowest priority, and resume them after a restart.

Each row goes through the same handler as a live request of its endpoint (the same validation, decoding and
response shape), submitted as priority "batch": the scheduler's policy gives live requests the engine's slots
first and lets batch rows fill the rest (adgen.serve.policy). A bad line becomes a row of the error file, never a
failed batch. At most `in_flight` rows of a batch are queued at once, so a cancel or a shutdown has little to drop.

Cancel: the batch's task is cancelled; the rows in flight are abandoned, which takes them off the engine before
its next decode step; what finished is kept and written to the output / error files. Shutdown: the same, but the
batch keeps its status and is resumed by the next server with the same state directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from adgen.serve.batches.files import FileStore
from adgen.serve.batches.store import (ACTIVE, COMPLETION_WINDOWS, BatchStore, error_row, is_success, new_batch,
                                       parse_input_line, response_row)
from adgen.serve.security import ApiError, error_body

log = logging.getLogger(__name__)

# A row's request body -> (HTTP status, response body), as the live route of its endpoint would answer.
Handler = Callable[[dict], Awaitable[tuple[int, dict]]]


class BatchRunner:
    def __init__(self, files: FileStore, store: BatchStore, handlers: Mapping[str, Handler], *,
                 in_flight: int = 32, on_row: Callable[[str], None] | None = None) -> None:
        self.files = files
        self.store = store
        self.handlers = handlers
        self.in_flight = max(1, in_flight)
        self.on_row = on_row  # called with "completed" / "failed" per finished row (/metrics)
        self._tasks: dict[str, asyncio.Task] = {}
        self._closing = False

    # ---- the API's calls (event loop) ----------------------------------------------------------
    def create(self, input_file_id: str, endpoint: str, completion_window: str = "24h",
               metadata: dict | None = None) -> dict[str, Any]:
        if endpoint not in self.handlers:
            raise ApiError(400, f"endpoint must be one of {', '.join(self.handlers)}, not {endpoint!r}",
                           param="endpoint")
        if completion_window not in COMPLETION_WINDOWS:
            raise ApiError(400, f"completion_window must be {' or '.join(COMPLETION_WINDOWS)}, not "
                                f"{completion_window!r}", param="completion_window")
        file = self.files.get(input_file_id)
        if file["purpose"] != "batch":
            raise ApiError(400, f"file {input_file_id} has purpose {file['purpose']!r}; upload the input with "
                                "purpose 'batch'", param="input_file_id")
        batch = new_batch(input_file_id, endpoint, completion_window, metadata)
        self.store.save(batch)
        self._start(batch)
        return batch

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.store.get(batch_id)
        if batch["status"] in ("cancelling", "cancelled"):
            return batch
        if batch["status"] not in ACTIVE:
            raise ApiError(409, f"batch {batch_id} is already {batch['status']}; only a running batch can be "
                                "cancelled", param="batch_id", code="batch_not_cancellable")
        self.store.set_status(batch, "cancelling")
        task = self._tasks.get(batch_id)
        if task is not None:
            task.cancel()  # its rows in flight are abandoned; the task then writes what finished
        else:
            self._start(batch)
        return batch

    def resume_all(self) -> list[str]:
        """Start the batches a previous server left unfinished (call once the event loop runs)."""
        resumed = []
        for batch in reversed(self.store.list()):  # oldest first
            if batch["status"] in ACTIVE:
                log.info("resuming batch %s (%s)", batch["id"], batch["status"])
                self._start(batch)
                resumed.append(batch["id"])
        return resumed

    async def close(self) -> None:
        """Server shutdown: stop the rows in flight; the batches stay resumable."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- running one batch ---------------------------------------------------------------------
    def _start(self, batch: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(batch), name=f"adgen-{batch['id']}")
        self._tasks[batch["id"]] = task
        task.add_done_callback(lambda _t, bid=batch["id"]: self._tasks.pop(bid, None))

    async def _run(self, batch: dict[str, Any]) -> None:
        try:
            if batch["status"] != "cancelling":
                await self._run_rows(batch)
        except asyncio.CancelledError:
            if self._closing:
                return  # shutdown: resumed by the next server
            batch = self.store.get(batch["id"])  # cancelled by a client: its status is "cancelling"
        except Exception as e:  # e.g. the input file was deleted: the batch fails, the server goes on
            log.exception("batch %s failed", batch["id"])
            batch["errors"] = {"object": "list", "data": [{"code": "batch_failed", "message": str(e), "line": None}]}
            self.store.set_status(batch, "failed")
            return
        await asyncio.to_thread(self._finalize, batch)

    async def _run_rows(self, batch: dict[str, Any]) -> None:
        if batch["status"] == "validating":
            self.store.set_status(batch, "in_progress")
        work, errors = self._work_of(batch)
        done = {_row_key(row) for row in self.store.rows(batch["id"])}
        rows_so_far = list(self.store.rows(batch["id"]))
        batch["request_counts"] = {"total": len(work) + len(errors),
                                   "completed": sum(is_success(r) for r in rows_so_far),
                                   "failed": sum(not is_success(r) for r in rows_so_far)}
        self.store.save(batch)
        handler = self.handlers[batch["endpoint"]]
        gate = asyncio.Semaphore(self.in_flight)
        with self.store.appender(batch["id"]) as out:
            for key, row in errors:
                if key not in done:
                    await self._record(batch, out, row)

            async def one(custom_id: str, body: dict) -> None:
                async with gate:
                    status, response = await _answer(handler, body)
                    await self._record(batch, out, response_row(custom_id, status, response))

            await asyncio.gather(*(one(cid, body) for cid, body in work if ("id", cid) not in done))

    def _work_of(self, batch: dict[str, Any]) -> tuple[list[tuple[str, dict]], list[tuple[tuple, dict]]]:
        """(custom_id, body) of every request line; (key, error row) of every line that is not one."""
        work, errors, seen = [], [], set()
        data = self.files.content(batch["input_file_id"])
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            custom_id, body, error = parse_input_line(raw, number, batch["endpoint"])
            if error is None and custom_id in seen:
                error = {"code": "duplicate_custom_id", "line": number,
                         "message": f"line {number}: custom_id {custom_id!r} was used on an earlier line; each "
                                    "request needs its own"}
            if error is not None:
                errors.append((("line", number), error_row(custom_id, error)))
            else:
                seen.add(custom_id)
                work.append((custom_id, body))
        return work, errors

    async def _record(self, batch: dict[str, Any], out, row: dict[str, Any]) -> None:
        await asyncio.to_thread(out.write, row)  # fsynced: a finished row survives a kill
        outcome = "completed" if is_success(row) else "failed"
        batch["request_counts"][outcome] += 1
        if self.on_row is not None:
            self.on_row(outcome)
        counts = batch["request_counts"]
        if (counts["completed"] + counts["failed"]) % 16 == 0:  # the counts /v1/batches shows, now and then
            self.store.save(batch)

    def _finalize(self, batch: dict[str, Any]) -> None:
        """Write the output and error files from the finished rows; the batch ends completed or cancelled."""
        cancelled = batch["status"] == "cancelling"
        if not cancelled:
            self.store.set_status(batch, "finalizing")
        rows = list(self.store.rows(batch["id"]))
        ok = [r for r in rows if is_success(r)]
        bad = [r for r in rows if not is_success(r)]
        batch["request_counts"].update(completed=len(ok), failed=len(bad))
        for rows_of, field, name in ((ok, "output_file_id", "output"), (bad, "error_file_id", "errors")):
            if rows_of and batch[field] is None:
                data = "".join(_jsonl(r) for r in rows_of).encode("utf-8")
                batch[field] = self.files.write(data, filename=f"{batch['id']}_{name}.jsonl",
                                                purpose="batch_output")["id"]
        self.store.set_status(batch, "cancelled" if cancelled else "completed")


async def _answer(handler: Handler, body: dict) -> tuple[int, dict]:
    """The handler's answer; a client's mistake is its 4xx, anything else a 500 row (the batch goes on)."""
    try:
        return await handler(body)
    except ApiError as e:
        return e.status, e.body()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.exception("a batch row failed")
        return 500, error_body(f"generation failed: {type(e).__name__}", type="server_error")


def _row_key(row: dict[str, Any]) -> tuple:
    error = row.get("error")
    if error is not None and error.get("line") is not None:
        return ("line", error["line"])
    return ("id", row["custom_id"])


def _jsonl(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"
