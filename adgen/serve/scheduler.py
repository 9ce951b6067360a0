"""The request queue between the async web server and the (blocking) generator.

One worker thread owns the model; nothing else runs it. Two ways it works:

- Continuous batching (models the decode engine drives: `generator.uses_engine`; the default): every
  request, streaming or not, becomes one engine request per choice. New requests join the running batch
  between decode steps and finished ones leave (`adgen.generation.engine`); a stream's text pieces are
  sent as its tokens come (`StreamPieces`). Adapter on / off is a per-request choice the engine passes
  to PEFT's mixed-adapter forward, so requests for both decode in one batch. Cancellation is the
  request's flag: a disconnected client's rows leave before the next step.
- One job at a time (other backends, or `continuous=False`): requests wait in a bounded FIFO and run
  one job at a time; non-streaming requests with equal decoding settings are batched into one
  `generator.generate` call, streams run one by one; the adapter is switched off for exactly one job.
  A running batch whose clients all left is stopped from a forward hook.

Errors: a request that fails on its own in the engine (its logits processing, sampling, stop check, a
callback: `Request.error`) fails its job alone -- a 5xx in OpenAI's shape, or an error event ending its
stream -- while the other rows of the batch go on; an error of a step's shared forward fails the jobs
running then, and the worker goes on with the next ones. On a GPU the engine's KV cache is sized at start
from the free memory (`--gpu-memory-utilization`, adgen.generation.kv_budget) and never grows: requests
beyond its slots wait in the queue.

Every job carries a `threading.Event`: the API sets it when a client disconnects (or a waiting client
gives up). `stats()` reports queue length, active jobs and `model_forward_calls`: a forward hook counts
every model call really computed, which is how the tests tell that a cancelled request stopped burning
compute rather than merely stopped being sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from adgen.generation.hf import prime_torch_threads
from adgen.generation.pieces import StreamPieces

log = logging.getLogger(__name__)

_ids = itertools.count(1)


class QueueFull(Exception):
    pass


class Abandoned(Exception):
    """The client of a non-streaming request disconnected while it waited or ran."""


class _BatchAbandoned(Exception):
    """Raised from the forward hook to stop a batch whose clients all disconnected.

    `generator.generate` takes no cancel event (streams do), so this is how a running
    non-streaming batch is stopped early; see `Scheduler._run_batch`.
    """


@dataclass
class Completion:
    """One finished choice (non-streaming) or the summary at the end of a stream."""

    index: int
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(eq=False)  # identity: jobs are found in the queue by who they are, not by their fields
class Job:
    prompts: list  # one prompt per choice (a message list)
    config: Any  # DecodingConfig
    use_adapter: bool | str  # True: the default adapter; False: none (the base model); a name: that adapter
    stream: bool
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None  # non-streaming: list[Completion]
    events: asyncio.Queue | None = None  # streaming: ("piece", i, text) / ("done", i, Completion) / ("error", e) / ("end",)
    # The running stream's own cancel event: generator streams set theirs when they end, so each
    # stream gets a fresh one, and `abandon()` sets it along with `cancel`.
    stream_cancel: threading.Event | None = None
    on_abandon: Any = None  # set by the scheduler: drops the job from the queue at once
    # figures for /metrics
    first_token_at: float | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def kind(self) -> str:
        return "stream" if self.stream else "complete"

    def abandon(self) -> None:
        """The client is gone: drop the job if queued, stop its stream after the current step."""
        if self.cancel.is_set():
            return
        self.cancel.set()
        ev = self.stream_cancel
        if ev is not None:
            ev.set()
        if self.on_abandon is not None:
            self.on_abandon(self)

    def batch_key(self):
        cfg = self.config
        if self.stream or (not cfg.greedy and cfg.seed is not None):
            return None  # a seeded sample must not share an RNG stream with other requests
        return (cfg, self.use_adapter)

    # called from the worker thread
    def _emit(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def _resolve(self, result=None, error: BaseException | None = None, cancelled: bool = False) -> None:
        def settle():
            if self.future.done():
                return
            if cancelled:
                self.future.cancel()
            elif error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(settle)


@dataclass(eq=False)
class _EngineJob:
    """A job on the engine: its requests (one per distinct choice) and the completions so far."""

    job: Job
    completions: list
    remaining: int
    error: BaseException | None = None  # set when one of its requests failed: the job fails when all have left


class Scheduler:
    def __init__(self, generator, *, max_queue: int = 256, max_batch: int | None = None,
                 continuous: bool = True, metrics=None, limits=None, gpu_memory_utilization: float = 0.9) -> None:
        self.generator = generator
        self.metrics = metrics  # adgen.serve.metrics.ServeMetrics, or None
        self.max_queue = max_queue
        self.max_batch = max_batch or generator.batch_size
        self.kv_plan = None  # adgen.generation.kv_budget.KVPlan on a GPU: the cache's size, fixed at start
        self.engine = None
        if continuous and generator.uses_engine:
            self.engine, self.kv_plan = _make_engine(generator, self.max_batch, limits, gpu_memory_utilization)
        self._owners: dict = {}  # engine request -> (its _EngineJob, choice indices, StreamPieces | None)
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._active = 0
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0, "batches": 0, "max_batch_seen": 0}
        self._forward_calls = 0
        self._stats_lock = threading.Lock()
        self._running_batch: list[Job] | None = None
        self._hook = self._install_forward_counter()
        prime_torch_threads()
        work = self._work_engine if self.engine is not None else self._work
        self._thread = threading.Thread(target=work, name="adgen-serve-worker", daemon=True)
        self._thread.start()

    # ---- model access -----------------------------------------------------------------------
    @property
    def model(self):
        return self.generator.model

    @property
    def can_disable_adapter(self) -> bool:
        model = self.model
        return self.generator.adapter is not None and hasattr(model, "disable_adapter")

    def _install_forward_counter(self):
        model = self.model
        if model is None or not hasattr(model, "register_forward_hook"):
            return None
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model

        def count(*_):
            self._forward_calls += 1
            batch = self._running_batch
            if batch and all(job.cancel.is_set() for job in batch):
                raise _BatchAbandoned()  # unwinds model.generate: every requester of this batch has gone

        return inner.register_forward_hook(count)

    def _adapter_context(self, use_adapter: bool | str):
        if isinstance(use_adapter, str):
            return _adapter_switched(self.model, use_adapter)
        if use_adapter or not self.can_disable_adapter:
            return contextlib.nullcontext()
        # Safe without generator.lock here: this worker is the only thread that runs the model.
        return self.model.disable_adapter()

    # ---- submitting (event loop side) -------------------------------------------------------
    def _submit(self, job: Job) -> Job:
        if not job.use_adapter and not self.can_disable_adapter and self.generator.adapter:
            raise ValueError("this backend cannot switch its adapter off")
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            queued = self._queued()
            if queued >= self.max_queue:
                raise QueueFull(f"{queued} requests are already waiting")
            self._pending.append(job)
            job.on_abandon = self._drop
            self._cv.notify()
        return job

    def _drop(self, job: Job) -> None:
        """Take an abandoned job out of the queue now (a running one stops via its events)."""
        with self._cv:
            try:
                self._pending.remove(job)
            except ValueError:
                return  # already taken by the worker
        self._finish(job, cancelled=True)

    async def complete(self, prompts: list, config, *, use_adapter: bool | str = True, disconnected=None) -> list[Completion]:
        """Run `prompts` (one per choice) to the end. `disconnected`: async callable, polled while waiting."""
        loop = asyncio.get_running_loop()
        job = Job(list(prompts), config, use_adapter, False, loop, future=loop.create_future())
        self._submit(job)
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=0.25)
                if done:
                    return job.future.result()
                if disconnected is not None and await disconnected():
                    job.abandon()
                    raise Abandoned("client disconnected")
        finally:
            job.abandon()  # no-op when finished; stops a queued job when the caller went away

    def open_stream(self, prompts: list, config, *, use_adapter: bool | str = True) -> "StreamHandle":
        """Queue a streaming job now (QueueFull is raised here, before any response is sent).

        Call from the event loop. Iterate the handle for ("piece", index, text) and
        ("done", index, Completion) per prompt in turn; `aclose()` (a disconnected client) cancels it.
        """
        loop = asyncio.get_running_loop()
        job = Job(list(prompts), config, use_adapter, True, loop, events=asyncio.Queue())
        self._submit(job)
        return StreamHandle(job)

    def _queued(self) -> int:
        return len(self._pending) + (self.engine.waiting if self.engine is not None else 0)

    # ---- the worker thread: continuous batching ----------------------------------------------
    def _work_engine(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not self._pending and not engine.busy and not self._closing:
                    self._cv.wait()
                new = list(self._pending)
                self._pending.clear()
                closing = self._closing
            for job in new:
                try:
                    self._start_on_engine(job)
                except Exception as e:  # this job's own failure (its prompts, its settings): it alone fails
                    log.exception("request failed")
                    self._fail_engine_job(job, e)
            if closing:  # shutting down: running requests end as cancelled at the next step
                for job_run, _indices, _pieces in list(self._owners.values()):
                    job_run.job.cancel.set()
                if not engine.busy:
                    return
            try:
                finished = engine.step()  # a request's own error comes back on it (request.error), alone
            except Exception as e:  # an error the engine did not handle: fail what was running, keep serving
                log.exception("generation failed")
                for request in engine.abort():
                    self._request_failed(request, e)
                continue
            with self._stats_lock:
                self._counts["max_batch_seen"] = max(self._counts["max_batch_seen"], engine.max_running)
            for request in finished:
                try:
                    self._engine_request_done(request)
                except Exception as e:  # e.g. a stream's text pieces: that job fails, the others go on
                    log.exception("request failed")
                    self._request_failed(request, e)

    def _start_on_engine(self, job: Job) -> None:
        from adgen.generation.engine import Request

        if job.cancel.is_set():
            self._finish(job, cancelled=True)
            return
        config = job.config
        if config.greedy and len({repr(p) for p in job.prompts}) == 1:
            groups = [(job.prompts[0], list(range(len(job.prompts))))]  # equal greedy choices: computed once
        else:
            groups = [(p, [i]) for i, p in enumerate(job.prompts)]
        encoded = [self.generator.prompt_ids(p) for p, _ in groups]
        run = _EngineJob(job, [None] * len(job.prompts), len(groups))
        adapter = (job.use_adapter if isinstance(job.use_adapter, str)
                   else None if job.use_adapter or self.generator.adapter is None else "__base__")
        owned = []
        for k, (ids, (_prompt, indices)) in enumerate(zip(encoded, groups)):
            # choices of one seeded request differ: choice k samples with seed + k
            cfg = replace(config, seed=config.seed + k) if k and not config.greedy and config.seed is not None else config
            pieces = StreamPieces(self.generator.tokenizer, cfg, self.generator.stop_token_ids) if job.stream else None
            request = Request(ids, cfg, cancel=job.cancel, adapter=adapter,
                              on_tokens=self._token_sink(job, pieces, indices))
            owned.append((request, (run, indices, pieces)))
        # all built before any is submitted: an error above leaves nothing of this job on the engine
        self._active += 1
        for request, owner in owned:
            self._owners[request] = owner
            self.engine.submit(request)

    def _token_sink(self, job: Job, pieces: StreamPieces | None, indices: list[int]):
        """What runs on each new token of a request: the first-token time, and a stream's text pieces."""
        def on_tokens(ids: list[int]) -> None:
            if job.first_token_at is None:
                self._first_token(job)
            if pieces is None:
                return
            piece = pieces.push(ids)
            if piece and not job.cancel.is_set():
                for i in indices:
                    job._emit(("piece", i, piece))

        return on_tokens

    def _first_token(self, job: Job) -> None:
        job.first_token_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.first_token(job.kind, job.created)

    def _fail_engine_job(self, job: Job, error: BaseException) -> None:
        """A job that failed before it reached the engine (`_start_on_engine` submits all or nothing)."""
        job.cancel.set()
        self._fail(job, error)

    def _request_failed(self, request, error: BaseException) -> None:
        """One engine request failed on its own (`request.error`, or its completion's handling)."""
        owner = self._owners.pop(request, None)
        if owner is None:
            return
        run = owner[0]
        if run.error is None:
            run.error = error
            run.job.cancel.set()  # the job's other choices leave at the next step: the job has failed
        run.remaining -= 1
        if not run.remaining:
            self._active -= 1  # counted before the client hears of the failure (a /health right after it is idle)
            self._fail(run.job, run.error)

    def _engine_request_done(self, request) -> None:
        if request.error is not None:
            log.error("request failed", exc_info=request.error)
            self._request_failed(request, request.error)
            return
        run, indices, pieces = self._owners[request]
        if run.error is not None:  # a sibling choice failed: this one only counts down
            self._request_failed(request, run.error)
            return
        job, g = run.job, request.result
        # decided before the last events go out: a client that leaves once it has them still completed
        cancelled = job.cancel.is_set()
        job.prompt_tokens += g.prompt_tokens
        job.generated_tokens += g.completion_tokens
        for i in indices:
            run.completions[i] = Completion(i, g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason)
        if pieces is not None and not cancelled:
            rest = pieces.finish(g.text)
            for i in indices:
                if rest:
                    job._emit(("piece", i, rest))
                job._emit(("done", i, run.completions[i]))
        del self._owners[request]  # (an error above: the worker fails the job through `_request_failed`)
        run.remaining -= 1
        if run.remaining:
            return
        self._active -= 1  # counted (and the job no longer active) before the client hears of the end
        self._finish(job, cancelled=cancelled)
        if not cancelled and job.future is not None:
            job._resolve(run.completions)

    # ---- the worker thread: one job at a time ------------------------------------------------
    def _next_jobs(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._closing:
                self._cv.wait()
            if self._closing and not self._pending:
                return None
            job = self._pending.popleft()
            key = job.batch_key()
            if key is None or job.cancel.is_set():
                return [job]
            batch, size, keep = [job], len(job.prompts), deque()
            for other in self._pending:
                if not other.cancel.is_set() and other.batch_key() == key and size + len(other.prompts) <= self.max_batch:
                    batch.append(other)
                    size += len(other.prompts)
                else:
                    keep.append(other)
            self._pending = keep
            return batch

    def _work(self) -> None:
        while True:
            jobs = self._next_jobs()
            if jobs is None:
                return
            live = []
            for job in jobs:
                if job.cancel.is_set():
                    self._finish(job, cancelled=True)
                else:
                    live.append(job)
            if not live:
                continue
            self._active += len(live)
            try:
                if live[0].stream:
                    self._run_stream(live[0])
                else:
                    self._run_batch(live)
            except Exception as e:  # never let one request kill the worker
                log.exception("generation failed")
                for job in live:
                    self._fail(job, e)
            finally:
                self._active -= len(live)

    def _run_batch(self, jobs: list[Job]) -> None:
        config, use_adapter = jobs[0].config, jobs[0].use_adapter
        prompts, owners = [], []
        for job in jobs:
            # Greedy choices of one request are identical: compute one, copy it.
            distinct = job.prompts[:1] if config.greedy and len({repr(p) for p in job.prompts}) == 1 else job.prompts
            prompts.extend(distinct)
            owners.append((job, len(distinct)))
        self._running_batch = jobs
        try:
            with self._adapter_context(use_adapter):
                results = self.generator.generate(prompts, config)
        except _BatchAbandoned:
            for job in jobs:
                self._finish(job, cancelled=True)
            return
        finally:
            self._running_batch = None
        self._counts["batches"] += 1
        self._counts["max_batch_seen"] = max(self._counts["max_batch_seen"], len(prompts))
        pos = 0
        for job, count in owners:
            mine = results[pos : pos + count]
            pos += count
            self._first_token(job)  # (a batch's tokens are seen only at its end)
            job.prompt_tokens += sum(g.prompt_tokens for g in mine)
            job.generated_tokens += sum(g.completion_tokens for g in mine)
            if count < len(job.prompts):
                mine = mine * len(job.prompts)
            job._resolve(
                [
                    Completion(i, g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason)
                    for i, g in enumerate(mine)
                ]
            )
            self._finish(job)

    def _run_stream(self, job: Job) -> None:
        with self._adapter_context(job.use_adapter):
            for index, prompt in enumerate(job.prompts):
                if job.cancel.is_set():
                    break
                job.stream_cancel = threading.Event()
                if job.cancel.is_set():
                    break
                stream = self.generator.stream(prompt, job.config, cancel=job.stream_cancel)
                text = []
                try:
                    for piece in stream:
                        if job.cancel.is_set():
                            break
                        text.append(piece)
                        if job.first_token_at is None:
                            self._first_token(job)
                        job._emit(("piece", index, piece))
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()  # waits for the model thread: the model is free after this
                if job.cancel.is_set():
                    break
                summary = self._summary(index, stream, "".join(text), prompt, job.config)
                job.prompt_tokens += summary.prompt_tokens
                job.generated_tokens += summary.completion_tokens
                job._emit(("done", index, summary))
        self._finish(job, cancelled=job.cancel.is_set())

    def _summary(self, index: int, stream, text: str, prompt, config) -> Completion:
        gen = getattr(stream, "generation", None)
        if gen is not None:
            return Completion(index, gen.text, gen.prompt_tokens, gen.completion_tokens, gen.finish_reason)
        # A backend whose stream is a plain iterator: count what we can.
        tok = self.generator.tokenizer
        completion = len(tok(text, add_special_tokens=False)["input_ids"])
        prompt_tokens = len(self.generator.prompt_ids(prompt))
        finish = "length" if config.max_new_tokens is not None and completion >= config.max_new_tokens else "stop"
        return Completion(index, text, prompt_tokens, completion, finish)

    def _finish(self, job: Job, cancelled: bool = False) -> None:
        with self._stats_lock:
            self._counts["cancelled" if cancelled else "completed"] += 1
        if self.metrics is not None:
            self.metrics.finished(job.kind, "cancelled" if cancelled else "completed", job.created,
                                  job.prompt_tokens, job.generated_tokens)
        if job.events is not None:
            job._emit(("end",))
        elif cancelled:
            job._resolve(cancelled=True)

    def _fail(self, job: Job, error: BaseException) -> None:
        with self._stats_lock:
            self._counts["failed"] += 1
        if self.metrics is not None:
            self.metrics.finished(job.kind, "failed", job.created)
        if job.future is not None:
            job._resolve(error=error)
        else:
            job._emit(("error", error))
            job._emit(("end",))

    # ---- lifecycle and figures --------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._cv:
            queued = self._queued()
        with self._stats_lock:
            counts = dict(self._counts)
        engine = self.engine
        return {
            "kv_cache": self.kv_cache_info(),
            "queued": queued,
            "active_generations": self._active,
            "model_forward_calls": self._forward_calls,
            "continuous_batching": engine is not None,
            "running_requests": engine.running if engine is not None else self._active,
            "decode_steps": engine.steps if engine is not None else None,
            "prefix_tokens_saved": engine.stats()["prefix_tokens_saved"] if engine is not None else None,
            **counts,
        }

    def kv_cache_info(self) -> dict[str, Any] | None:
        """The engine's KV cache: slots x tokens per slot, bytes, and on a GPU the budget it was sized by."""
        if self.engine is None:
            return None
        info = self.engine.cache_info()
        info["tokens"] = info["slots"] * info["tokens_per_slot"]
        plan = self.kv_plan
        if plan is not None:
            info.update(budget_bytes=plan.budget_bytes, gpu_memory_utilization=plan.utilization)
        return info

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            for job in self._pending:
                job.cancel.set()
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._hook is not None:
            self._hook.remove()


def _make_engine(generator, max_batch: int, limits, utilization: float):
    """(the continuous-batching engine, its KV plan). On a GPU the cache is sized once from the memory left
    (adgen.generation.kv_budget): as many slots as fit of the longest request the limits allow, never more
    than `max_batch`; requests beyond them wait in the queue. Elsewhere: `max_batch` slots, grown on demand."""
    import torch

    device = torch.device(generator.device)
    if device.type != "cuda":
        return generator.decode_engine(max_batch), None
    from adgen.errors import ConfigError
    from adgen.generation.engine import cache_dtype
    from adgen.generation.kv_budget import GIB, plan_for_gpu
    from adgen.serve.settings import Limits

    limits = limits or Limits()
    max_len = limits.max_prompt_tokens + limits.max_tokens + 1  # the engine's need: prompt + limit + 1
    model = generator.model
    free, total = torch.cuda.mem_get_info(device)
    plan = plan_for_gpu(model.config, cache_dtype(model), free_bytes=free, total_bytes=total,
                        utilization=utilization, max_prompt_tokens=limits.max_prompt_tokens, max_len=max_len,
                        max_slots=max_batch)
    if plan.slots == 0:
        raise ConfigError(
            f"the KV cache of one request of {max_len} tokens needs {max_len * plan.bytes_per_token / GIB:.2f} GiB, "
            f"but only {plan.budget_bytes / GIB:.2f} GiB are left for it under --gpu-memory-utilization "
            f"{utilization:g} ({free / GIB:.1f} of {total / GIB:.1f} GiB free after loading the model): raise "
            f"--gpu-memory-utilization, or lower --max-prompt-tokens / --max-tokens-limit")
    log.info("%s", plan.describe())
    return generator.decode_engine(plan.slots, capacity=plan.capacity), plan


@contextlib.contextmanager
def _adapter_switched(model, name: str):
    """One job at a time with a named adapter (without continuous batching): active for exactly that job."""
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")


class StreamHandle:
    """The event-loop side of a streaming job (an async iterator of its events)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._ended = False

    def __aiter__(self) -> "StreamHandle":
        return self

    async def __anext__(self) -> tuple:
        if self._ended:
            raise StopAsyncIteration
        item = await self.job.events.get()
        if item[0] == "end":
            self._ended = True
            raise StopAsyncIteration
        if item[0] == "error":
            self._ended = True
            raise item[1]
        return item

    async def aclose(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        self.job.abandon()
