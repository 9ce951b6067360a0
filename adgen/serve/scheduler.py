"""The request queue between the async web server and the (blocking) generator.

One worker thread owns the model; nothing else runs it. The scheduler is three parts (vLLM v1's shape):

- `SchedulingPolicy` (policy.py) decides which waiting jobs run next: live requests before batch rows, and
  batch rows only in room live work does not need.
- An executor (executor.py) runs what the policy hands out: `EngineExecutor` (continuous batching, models the
  decode engine drives: `generator.uses_engine`; the default) or `JobExecutor` (one job at a time: other backends,
  or `continuous=False`).
- This class: the queue's front door on the event loop (`complete`, `open_stream`), the worker thread's loop,
  and what happens when a job ends (`Outcomes`: counters, /metrics, the client's future or stream).

The locking rule: everything the event loop and the worker both touch (the policy's queue, the counters,
`active_generations`) is read and written under `self._cv` (one Condition). The executors' own state (the engine,
its requests) is touched by the worker thread only.

Every job carries a `threading.Event`: the API sets it when a client disconnects (or a waiting client gives up).
`stats()` reports queue length, active jobs and `model_forward_calls`: a forward hook counts every model call really
computed, which is how the tests tell that a cancelled request stopped burning compute rather than merely stopped
being sent. On a GPU the engine's KV cache is sized at start from the free memory (`--gpu-memory-utilization`,
adgen.generation.kv_budget) and never grows: requests beyond its slots wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import torch

from adgen.errors import ConfigError
from adgen.generation.engine import cache_dtype
from adgen.generation.hf import prime_torch_threads
from adgen.generation.kv_budget import GIB, plan_for_gpu
from adgen.serve.executor import EngineExecutor, JobExecutor
from adgen.serve.jobs import Abandoned, Completion, Job, Priority, QueueFull, StreamHandle
from adgen.serve.policy import SchedulingPolicy
from adgen.serve.settings import Limits

log = logging.getLogger(__name__)

# On a CPU, waiting requests are prefilled in one padded forward once this many wait (fewer: one by one, so a lone
# request's text stays bit-identical to `adgen generate`'s; under load the last bits may differ, as in vLLM).
SERVE_BATCH_PREFILL_MIN = 4

__all__ = ["Abandoned", "Completion", "Job", "QueueFull", "Scheduler", "StreamHandle"]


class Scheduler:
    def __init__(self, generator, *, max_queue: int = 256, max_batch: int | None = None,
                 continuous: bool = True, metrics=None, limits=None, gpu_memory_utilization: float = 0.9,
                 live_reserve: int | None = None) -> None:
        self.generator = generator
        self.metrics = metrics  # adgen.serve.metrics.ServeMetrics, or None
        self.max_queue = max_queue
        self.max_batch = max_batch or generator.batch_size
        self.kv_plan = None  # adgen.generation.kv_budget.KVPlan on a GPU: the cache's size, fixed at start
        self.engine = None
        # slots kept from batch rows for people arriving while a catalog runs; on a CPU they are slots on top of
        # --batch-size (a decode step of a few more rows costs little more), so a batch still fills --batch-size
        reserve = max(1, self.max_batch // 4) if live_reserve is None else live_reserve
        if continuous and generator.uses_engine:
            self.engine, self.kv_plan = _make_engine(generator, self.max_batch, reserve, limits, gpu_memory_utilization)
            self.executor: EngineExecutor | JobExecutor = EngineExecutor(generator, self.engine, self)
        else:
            self.executor = JobExecutor(generator, self)
        self.policy = SchedulingPolicy(max_queue=max_queue, max_batch=self.max_batch, live_reserve=reserve)
        self._cv = threading.Condition()  # the one lock (see the module's docstring)
        self._closing = False
        self._active = 0
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0, "batches": 0, "max_batch_seen": 0}
        self._forward_calls = 0
        self._hook = self._install_forward_counter()
        prime_torch_threads()
        work = self._work_engine if self.engine is not None else self._work_jobs
        self._thread = threading.Thread(target=work, name="adgen-serve-worker", daemon=True)
        self._thread.start()

    # ---- model access -----------------------------------------------------------------------
    @property
    def model(self):
        return self.generator.model

    @property
    def can_disable_adapter(self) -> bool:
        return self.generator.adapter is not None and hasattr(self.model, "disable_adapter")

    def _install_forward_counter(self):
        model = self.model
        if model is None or not hasattr(model, "register_forward_hook"):
            return None
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model

        def count(*_):
            with self._cv:
                self._forward_calls += 1

        return inner.register_forward_hook(count)

    # ---- submitting (event loop side) -------------------------------------------------------
    def _submit(self, job: Job) -> Job:
        if not job.use_adapter and not self.can_disable_adapter and self.generator.adapter:
            raise ValueError("this backend cannot switch its adapter off")
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            self.policy.add(job, engine_waiting=self.engine.waiting if self.engine is not None else 0)
            job.on_abandon = self._abandoned
            self._cv.notify()
        return job

    def _abandoned(self, job: Job) -> None:
        """A client left: a queued job leaves the queue now; a running one stops through its cancel flag."""
        with self._cv:
            queued = self.policy.remove(job)
        if queued:
            self.finish(job, cancelled=True)
        elif isinstance(self.executor, JobExecutor):
            self.executor.abandoned(job)

    async def complete(self, prompts: list, config, *, use_adapter: bool | str = True, disconnected=None,
                       priority: Priority = "live") -> list[Completion]:
        """Run `prompts` (one per choice) to the end. `disconnected`: async callable, polled while waiting."""
        loop = asyncio.get_running_loop()
        job = Job(list(prompts), config, use_adapter, False, loop, priority=priority, future=loop.create_future())
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

    def open_stream(self, prompts: list, config, *, use_adapter: bool | str = True) -> StreamHandle:
        """Queue a streaming job now (QueueFull is raised here, before any response is sent).

        Call from the event loop. Iterate the handle for ("piece", index, text) and
        ("done", index, Completion) per prompt in turn; `aclose()` (a disconnected client) cancels it.
        """
        loop = asyncio.get_running_loop()
        job = Job(list(prompts), config, use_adapter, True, loop, events=asyncio.Queue())
        self._submit(job)
        return StreamHandle(job)

    def _queued(self) -> int:
        return self.policy.waiting() + (self.engine.waiting if self.engine is not None else 0)

    # ---- the worker thread ------------------------------------------------------------------
    def _work_engine(self) -> None:
        executor: EngineExecutor = self.executor
        while True:
            with self._cv:
                while not self.policy and not executor.busy and not self._closing:
                    self._cv.wait()
                jobs = self.policy.admit(executor.room())
                closing = self._closing
                self._mark_running(jobs)
            for job in jobs:
                if job.running:
                    executor.start(job)
                else:  # its client left after the policy took it
                    self.finish(job, cancelled=True)
            if closing:  # shutting down: running requests end as cancelled at the next step
                executor.cancel_running()
                if not executor.busy:
                    return
            if executor.busy:
                executor.step()

    def _work_jobs(self) -> None:
        executor: JobExecutor = self.executor
        while True:
            with self._cv:
                while not self.policy and not self._closing:
                    self._cv.wait()
                group = self.policy.next_group()
                if group is None:  # closing, nothing left
                    return
                live = [job for job in group if not job.cancel.is_set()]
                self._mark_running(live)
            for job in group:
                if not job.running:  # its client left while it waited
                    self.finish(job, cancelled=True)
            if live:
                executor.run(live)

    def _mark_running(self, jobs: list[Job]) -> None:
        """(under the lock) jobs handed to the executor count as active until they end."""
        for job in jobs:
            if not job.cancel.is_set():
                job.running = True
                self._active += 1

    # ---- Outcomes: what happens when a job ends (worker thread) -----------------------------
    def first_token(self, job: Job) -> None:
        job.first_token_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.first_token(job.kind, job.created)

    def batch_size_seen(self, rows: int) -> None:
        with self._cv:
            self._counts["max_batch_seen"] = max(self._counts["max_batch_seen"], rows)

    def batch_ran(self, rows: int) -> None:
        with self._cv:
            self._counts["batches"] += 1
            self._counts["max_batch_seen"] = max(self._counts["max_batch_seen"], rows)

    def finish(self, job: Job, completions: list[Completion] | None = None, *, cancelled: bool = False) -> None:
        """The job ended (completed or cancelled): counted (and no longer active) before its client hears of it."""
        self._ended(job, "cancelled" if cancelled else "completed")
        if job.events is not None:
            job.emit(("end",))
        elif cancelled:
            job.resolve(cancelled=True)
        else:
            job.resolve(completions)

    def fail(self, job: Job, error: BaseException) -> None:
        self._ended(job, "failed")
        if job.future is not None:
            job.resolve(error=error)
        else:
            job.emit(("error", error))
            job.emit(("end",))

    def _ended(self, job: Job, outcome: str) -> None:
        with self._cv:
            if job.running:
                job.running = False
                self._active -= 1
            self._counts[outcome] += 1
        if self.metrics is not None:
            if outcome == "failed":
                self.metrics.finished(job.kind, outcome, job.created)
            else:
                self.metrics.finished(job.kind, outcome, job.created, job.prompt_tokens, job.generated_tokens)

    # ---- lifecycle and figures --------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        engine = self.engine
        with self._cv:
            queued = self._queued()
            counts = dict(self._counts)
            active, forward_calls = self._active, self._forward_calls
        return {
            "kv_cache": self.kv_cache_info(),
            "queued": queued,
            "active_generations": active,
            "model_forward_calls": forward_calls,
            "continuous_batching": engine is not None,
            "running_requests": engine.running if engine is not None else active,
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
            dropped = self.policy.drain()
            self._cv.notify_all()
        for job in dropped:
            job.cancel.set()
            self.finish(job, cancelled=True)
        self._thread.join(timeout)
        if self._hook is not None:
            self._hook.remove()


def _make_engine(generator, max_batch: int, live_reserve: int, limits, utilization: float):
    """(the continuous-batching engine, its KV plan). On a GPU the cache is sized once from the memory left
    (adgen.generation.kv_budget): as many slots as fit of the longest request the limits allow, never more
    than `max_batch`; requests beyond them wait in the queue. Elsewhere: `max_batch` + `live_reserve` slots,
    grown on demand, and waiting requests prefilled together once SERVE_BATCH_PREFILL_MIN of them wait (a CPU
    under load: 32 arrivals prefilled one by one put the last first token seconds behind)."""
    device = torch.device(generator.device)
    if device.type != "cuda":
        return generator.decode_engine(max_batch + live_reserve, batch_prefill=SERVE_BATCH_PREFILL_MIN), None
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
