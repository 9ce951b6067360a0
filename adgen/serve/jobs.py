"""What the scheduler moves between the web server's event loop and the worker thread: jobs and their results.

A `Job` is one API request: one prompt per choice, its decoding, its adapter, and how its client hears back (a
future for a non-streaming request, an event queue for a stream). It belongs to a priority class: "live" (a person
or a system waiting on the answer) or "batch" (a row of a catalog run, filling what live work leaves free).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from adgen.generation.config import DecodingConfig, Generation

Priority = Literal["live", "batch"]
PRIORITIES: tuple[Priority, ...] = ("live", "batch")  # the order the policy serves them in

_ids = itertools.count(1)


@dataclass(frozen=True)
class RawPrompt:
    """A prompt sent as it is, without the chat template (`/v1/completions`): the tokenizer's own special
    tokens (BOS) are added, an end-of-sequence token some tokenizers append is not."""

    text: str

    def token_ids(self, tokenizer) -> list[int]:
        ids = tokenizer(self.text, add_special_tokens=True)["input_ids"]
        eos = tokenizer.eos_token_id
        written = bool(tokenizer.eos_token) and self.text.endswith(tokenizer.eos_token)
        if eos is not None and len(ids) > 1 and ids[-1] == eos and not written:
            ids = ids[:-1]
        return ids


def encode_prompt(generator, prompt) -> list[int]:
    """A job's prompt as token ids: raw text as it is, anything else through the generator's chat template."""
    if isinstance(prompt, RawPrompt):
        return prompt.token_ids(generator.tokenizer)
    return generator.prompt_ids(prompt)


class QueueFull(Exception):
    pass


class Abandoned(Exception):
    """The client of a non-streaming request disconnected while it waited or ran."""


@dataclass
class Completion:
    """One finished choice (non-streaming) or the summary at the end of a stream."""

    index: int
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    @classmethod
    def of(cls, index: int, generation: "Generation") -> "Completion":
        """The one way a generation becomes a choice's completion (engine, batch and stream alike)."""
        return cls(index, generation.text, generation.prompt_tokens, generation.completion_tokens,
                   generation.finish_reason)


@dataclass(eq=False)  # identity: jobs are found in the queue by who they are, not by their fields
class Job:
    prompts: list  # one prompt per choice (a message list)
    config: "DecodingConfig"
    use_adapter: bool | str  # True: the default adapter; False: none (the base model); a name: that adapter
    stream: bool
    loop: asyncio.AbstractEventLoop
    priority: Priority = "live"
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)
    future: asyncio.Future | None = None  # non-streaming: list[Completion]
    events: asyncio.Queue | None = None  # streaming: ("piece", i, text) / ("done", i, Completion) / ("error", e) / ("end",)
    # The running stream's own cancel event: generator streams set theirs when they end, so each
    # stream gets a fresh one, and `abandon()` sets it along with `cancel`.
    stream_cancel: threading.Event | None = None
    on_abandon: Callable[["Job"], None] | None = None  # set by the scheduler: drops the job from the queue at once
    running: bool = False  # handed to an executor (counted in `active_generations` until it ends)
    # figures for /metrics
    first_token_at: float | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def kind(self) -> str:
        """The /metrics label: a batch row's times are kept apart from the live requests' ones."""
        if self.priority == "batch":
            return "batch"
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

    def distinct_choices(self) -> list[tuple[Any, list[int]]]:
        """(prompt, the choice indices it answers): equal greedy choices are computed once and copied."""
        if self.config.greedy and len({repr(p) for p in self.prompts}) == 1:
            return [(self.prompts[0], list(range(len(self.prompts))))]
        return [(p, [i]) for i, p in enumerate(self.prompts)]

    def batch_key(self):
        """Jobs with equal keys may share one `generator.generate` call (one job at a time); None: never."""
        cfg = self.config
        if self.stream or (not cfg.greedy and cfg.seed is not None):
            return None  # a seeded sample must not share an RNG stream with other requests
        return (cfg, self.use_adapter)

    def count_tokens(self, generations) -> None:
        for g in generations:
            self.prompt_tokens += g.prompt_tokens
            self.generated_tokens += g.completion_tokens

    # called from the worker thread
    def emit(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def resolve(self, result=None, error: BaseException | None = None, cancelled: bool = False) -> None:
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
