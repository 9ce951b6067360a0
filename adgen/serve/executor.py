"""Run what the policy hands out, on the worker thread: the engine's requests, or one job at a time.

- `EngineExecutor` (continuous batching, models the decode engine drives): every distinct choice of a job becomes
  one engine request; new requests join the running batch between decode steps and finished ones leave
  (`adgen.generation.engine`); a stream's text pieces are sent as its tokens come (`StreamPieces`). Adapter on /
  off / named is a per-request choice the engine passes to PEFT's mixed-adapter forward. Cancellation is the
  request's flag: a disconnected client's rows leave before the next step.
- `JobExecutor` (other backends, or `continuous=False`): a group of non-streaming jobs with equal decoding runs as
  one `generator.generate` call, a stream runs on its own; the adapter is switched for exactly one group. A group
  whose clients all left is stopped through the generator's `cancel` event.

Errors: a request that fails on its own in the engine (its logits processing, sampling, stop check, a callback:
`Request.error`) fails its job alone while the other rows go on; an error of a step's shared forward fails the jobs
running then. Either way the executor reports to `Outcomes` (the scheduler), which tells the client.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from adgen.generation.config import Generation
from adgen.generation.engine import Request
from adgen.generation.pieces import StreamPieces
from adgen.serve.jobs import Completion, Job, encode_prompt
from adgen.serve.policy import EngineRoom

if TYPE_CHECKING:
    from adgen.generation.engine import DecodeEngine

log = logging.getLogger(__name__)


class Outcomes(Protocol):
    """How an executor reports what happened to a job (the scheduler: counters, metrics, the client)."""

    def first_token(self, job: Job) -> None: ...

    def finish(self, job: Job, completions: list[Completion] | None = None, *, cancelled: bool = False) -> None: ...

    def fail(self, job: Job, error: BaseException) -> None: ...

    def batch_size_seen(self, rows: int) -> None: ...

    def batch_ran(self, rows: int) -> None: ...


@dataclass(eq=False)
class _EngineJob:
    """A job on the engine: its requests (one per distinct choice) and the completions so far."""

    job: Job
    completions: list
    remaining: int
    error: BaseException | None = None  # set when one of its requests failed: the job fails when all have left


@dataclass(eq=False)
class _Owner:
    run: _EngineJob
    indices: list[int]  # the choices this request answers
    pieces: StreamPieces | None  # a stream's text so far


class EngineExecutor:
    def __init__(self, generator, engine: "DecodeEngine", outcomes: Outcomes) -> None:
        self.generator = generator
        self.engine = engine
        self.outcomes = outcomes
        self._owners: dict[Request, _Owner] = {}

    @property
    def busy(self) -> bool:
        return self.engine.busy

    def room(self) -> EngineRoom:
        batch_rows = sum(1 for owner in self._owners.values() if owner.run.job.priority == "batch")
        return EngineRoom(self.engine.slots, self.engine.running, self.engine.waiting, batch_rows)

    def start(self, job: Job) -> None:
        """Submit a job's requests (all or none); a job that fails before it reaches the engine fails alone."""
        try:
            owned = self._requests(job)
        except Exception as e:  # this job's own failure (its prompts, its settings)
            log.exception("request failed")
            job.cancel.set()
            self.outcomes.fail(job, e)
            return
        for request, owner in owned:
            self._owners[request] = owner
            self.engine.submit(request)

    def _requests(self, job: Job) -> list[tuple[Request, _Owner]]:
        groups = job.distinct_choices()
        encoded = [encode_prompt(self.generator, p) for p, _ in groups]
        run = _EngineJob(job, [None] * len(job.prompts), len(groups))
        adapter = (job.use_adapter if isinstance(job.use_adapter, str)
                   else None if job.use_adapter or self.generator.adapter is None else "__base__")
        config, owned = job.config, []
        for k, (ids, (_prompt, indices)) in enumerate(zip(encoded, groups)):
            # choices of one seeded request differ: choice k samples with seed + k
            cfg = replace(config, seed=config.seed + k) if k and not config.greedy and config.seed is not None else config
            pieces = StreamPieces(self.generator.tokenizer, cfg, self.generator.stop_token_ids) if job.stream else None
            request = Request(ids, cfg, cancel=job.cancel, adapter=adapter,
                              on_tokens=self._token_sink(job, pieces, indices))
            owned.append((request, _Owner(run, indices, pieces)))
        return owned

    def _token_sink(self, job: Job, pieces: StreamPieces | None, indices: list[int]):
        """What runs on each new token of a request: the first-token time, and a stream's text pieces."""
        def on_tokens(ids: list[int]) -> None:
            if job.first_token_at is None:
                self.outcomes.first_token(job)
            if pieces is None:
                return
            piece = pieces.push(ids)
            if piece and not job.cancel.is_set():
                for i in indices:
                    job.emit(("piece", i, piece))

        return on_tokens

    def cancel_running(self) -> None:
        """Shutting down: every running request ends as cancelled at the next step."""
        for owner in list(self._owners.values()):
            owner.run.job.cancel.set()

    def step(self) -> None:
        """One decode step, then what it finished is reported."""
        try:
            finished = self.engine.step()  # a request's own error comes back on it (request.error), alone
        except Exception as e:  # an error the engine did not handle: fail what was running, keep serving
            log.exception("generation failed")
            for request in self.engine.abort():
                self._request_failed(request, e)
            return
        self.outcomes.batch_size_seen(self.engine.max_running)
        for request in finished:
            try:
                self._request_done(request)
            except Exception as e:  # e.g. a stream's text pieces: that job fails, the others go on
                log.exception("request failed")
                self._request_failed(request, e)

    def _request_failed(self, request: Request, error: BaseException) -> None:
        owner = self._owners.pop(request, None)
        if owner is None:
            return
        run = owner.run
        if run.error is None:
            run.error = error
            run.job.cancel.set()  # the job's other choices leave at the next step: the job has failed
        run.remaining -= 1
        if not run.remaining:
            self.outcomes.fail(run.job, run.error)

    def _request_done(self, request: Request) -> None:
        if request.error is not None:
            log.error("request failed", exc_info=request.error)
            self._request_failed(request, request.error)
            return
        owner = self._owners[request]
        run = owner.run
        if run.error is not None:  # a sibling choice failed: this one only counts down
            self._request_failed(request, run.error)
            return
        job, g = run.job, request.result
        # decided before the last events go out: a client that leaves once it has them still completed
        cancelled = job.cancel.is_set()
        job.count_tokens([g])
        for i in owner.indices:
            run.completions[i] = Completion.of(i, g)
        if owner.pieces is not None and not cancelled:
            rest = owner.pieces.finish(g.text)
            for i in owner.indices:
                if rest:
                    job.emit(("piece", i, rest))
                job.emit(("done", i, run.completions[i]))
        del self._owners[request]  # (an error above: the worker fails the job through `_request_failed`)
        run.remaining -= 1
        if not run.remaining:
            self.outcomes.finish(job, None if cancelled or job.stream else run.completions, cancelled=cancelled)


class JobExecutor:
    """One group of jobs at a time on `generator.generate` / `generator.stream`."""

    def __init__(self, generator, outcomes: Outcomes) -> None:
        self.generator = generator
        self.outcomes = outcomes
        self._group: list[Job] = []
        self._group_cancel = threading.Event()
        self._takes_cancel = "cancel" in inspect.signature(generator.generate).parameters

    @property
    def can_disable_adapter(self) -> bool:
        return self.generator.adapter is not None and hasattr(self.generator.model, "disable_adapter")

    def abandoned(self, job: Job) -> None:
        """A running job's client left (any thread): stop the group's generation once all of them have."""
        group = self._group
        if job in group and all(j.cancel.is_set() for j in group):
            self._group_cancel.set()

    def run(self, jobs: list[Job]) -> None:
        try:
            with self._adapter_context(jobs[0].use_adapter):
                if jobs[0].stream:
                    self._run_stream(jobs[0])
                else:
                    self._run_batch(jobs)
        except Exception as e:  # never let one request kill the worker
            log.exception("generation failed")
            for job in jobs:
                self.outcomes.fail(job, e)

    def _adapter_context(self, use_adapter: bool | str):
        model = self.generator.model
        if isinstance(use_adapter, str):
            return _adapter_switched(model, use_adapter)
        if use_adapter or not self.can_disable_adapter:
            return contextlib.nullcontext()
        # Safe without generator.lock here: the worker is the only thread that runs the model.
        return model.disable_adapter()

    def _run_batch(self, jobs: list[Job]) -> None:
        prompts, owners = [], []
        for job in jobs:
            distinct = job.distinct_choices()
            prompts.extend(p for p, _ in distinct)
            owners.append((job, distinct))
        self._group, self._group_cancel = jobs, threading.Event()
        try:
            kwargs = {"cancel": self._group_cancel} if self._takes_cancel else {}
            results = self.generator.generate(prompts, jobs[0].config, **kwargs)
        finally:
            self._group = []
        if self._group_cancel.is_set():
            for job in jobs:
                self.outcomes.finish(job, cancelled=True)
            return
        self.outcomes.batch_ran(len(prompts))
        pos = 0
        for job, distinct in owners:
            mine = results[pos : pos + len(distinct)]
            pos += len(distinct)
            self.outcomes.first_token(job)  # (a batch's tokens are seen only at its end)
            job.count_tokens(mine)
            completions = [None] * len(job.prompts)
            for g, (_prompt, indices) in zip(mine, distinct):
                for i in indices:
                    completions[i] = Completion.of(i, g)
            self.outcomes.finish(job, completions)

    def _run_stream(self, job: Job) -> None:
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
                        self.outcomes.first_token(job)
                    job.emit(("piece", index, piece))
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()  # waits for the model thread: the model is free after this
            if job.cancel.is_set():
                break
            summary = Completion.of(index, self._generation_of(stream, "".join(text), prompt, job.config))
            job.prompt_tokens += summary.prompt_tokens
            job.generated_tokens += summary.completion_tokens
            job.emit(("done", index, summary))
        self.outcomes.finish(job, cancelled=job.cancel.is_set())

    def _generation_of(self, stream, text: str, prompt, config) -> Generation:
        gen = getattr(stream, "generation", None)
        if gen is not None:
            return gen
        # A backend whose stream is a plain iterator: count what we can.
        tok = self.generator.tokenizer
        completion = len(tok(text, add_special_tokens=False)["input_ids"])
        prompt_tokens = len(self.generator.prompt_ids(prompt))
        finish = "length" if config.max_new_tokens is not None and completion >= config.max_new_tokens else "stop"
        return Generation(text, prompt_tokens, completion, finish)


@contextlib.contextmanager
def _adapter_switched(model, name: str):
    """One job at a time with a named adapter (without continuous batching): active for exactly that job."""
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")
