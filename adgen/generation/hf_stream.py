"""Streaming one generation of an `HFGenerator`: `model.generate` in a model thread, text pieces to the reader.

A stream's model thread never waits for its reader (tokens go to an unbounded queue), so a slow client does
not hold the model; a client that goes away must `close()` the stream (or set its `cancel` event), which stops
the model after its current step. The whole stream holds `generator.lock` (calls never interleave on the model).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Iterator

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from adgen.generation.config import DecodingConfig, FinishReason, Generation
from adgen.generation.hf_padded import CancelCriteria, generation_config, repeat_control, seeded
from adgen.generation.hf_processors import BatchRepeatControl
from adgen.generation.pieces import StreamPieces
from adgen.generation.text import finished_generation

if TYPE_CHECKING:
    from adgen.generation.hf import HFGenerator


class TextStream(AbstractContextManager):
    """Iterator of text pieces from one generation running in a background thread.

    - `close()` stops generation promptly (one model step) and waits for the thread; also called when
      the stream is garbage-collected or used as a context manager.
    - `cancel` (a `threading.Event`) may be set from any thread to stop it the same way.
    - With loop detection on, the longest tail that repeats earlier text is held back until the text
      moves on: a loop's repeats are trimmed, never sent (stream == generate).
    - When done: `finish_reason` ("stop" | "length" | "loop" | "cancelled"), `prompt_tokens`,
      `completion_tokens`, `text`, `generation` (a `Generation`). `finish_reason` is None while running.
    The model thread starts on the first `next()`; until then no lock is held.
    """

    def __init__(self, generator: HFGenerator, prompt, config: DecodingConfig, cancel: threading.Event | None) -> None:
        self._gen = generator
        self.config = config
        self.cancel = cancel if cancel is not None else threading.Event()
        self.prompt_ids = generator.prompt_ids(prompt)
        self.prompt_tokens = len(self.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.text = ""
        self.token_ids: list[int] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._repeats = repeat_control(generator.tokenizer, config, generator.stop_token_ids, [self.prompt_ids],
                                       len(self.prompt_ids))
        self._it = self._run()

    # iterator protocol
    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @property
    def generation(self) -> Generation | None:
        if self.finish_reason is None:
            return None
        return Generation(self.text, self.prompt_tokens, self.completion_tokens, self.finish_reason, list(self.token_ids))

    def close(self) -> None:
        """Stop generating (if still running) and wait for the model thread to end."""
        self.cancel.set()
        with contextlib.suppress(ValueError):  # "generator already executing": closed from another thread
            self._it.close()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    # the model thread
    def _start(self) -> None:
        # The thread gets no reference to the stream: a stream dropped without close() is still
        # collected, and its finalizer cancels the generation.
        self._thread = threading.Thread(
            target=_stream_worker,
            args=(self._gen, self.prompt_ids, self.config, self.cancel, self._queue, self._repeats),
            name="adgen-generate", daemon=True,
        )
        self._thread.start()

    def _run(self) -> Iterator[str]:
        gen = self._gen
        pieces = StreamPieces(gen.tokenizer, self.config, gen.stop_token_ids)
        self._start()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if pieces.ended or self.cancel.is_set():
                    continue  # tokens made after we decided to stop: drain, don't count
                self.token_ids.extend(int(t) for t in item)
                piece = pieces.push(item)
                if pieces.ended:
                    self.cancel.set()  # an end of turn or a stop string: the model thread may stop
                if piece:
                    self.text = pieces.sent
                    yield piece
            if self.cancel.is_set() and not pieces.ended:
                self.finish_reason = "cancelled"  # stopped from outside: nothing more to say
                return
            looped = self._repeats is not None and self._repeats.states[0].looped
            done = finished_generation(gen.tokenizer, self.prompt_tokens, self.token_ids, gen.stop_token_ids,
                                       self.config.stop, stop_hit=pieces.stop_string_hit, looped=looped)
            rest = pieces.finish(done.text)
            self.text, self.finish_reason = pieces.sent, done.finish_reason
            self.token_ids, self.completion_tokens = list(done.token_ids), done.completion_tokens
            if rest:
                yield rest
        finally:
            self.cancel.set()
            self.completion_tokens = self.completion_tokens or len(self.token_ids)
            if self.finish_reason is None:
                self.finish_reason = "cancelled"


def _stream_worker(gen: HFGenerator, prompt_ids: list[int], config: DecodingConfig, cancel: threading.Event,
                   q: queue.Queue, repeats: BatchRepeatControl | None = None) -> None:
    """Run one generation, putting each step's token ids on `q`, then None (an exception first, if any).

    The queue is unbounded: the model never waits for a slow reader, so the lock is held only for
    model time, and a cancelled generation ends after its current step.
    """
    try:
        with seeded(config, gen.device, gen.lock), gen.lock, torch.inference_mode():
            if cancel.is_set():
                return
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=gen.device)
            gen.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=generation_config(config, gen.stop_token_ids, gen.tokenizer.bos_token_id),
                streamer=QueueStreamer(q),
                stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)] + (repeats.criteria() if repeats else [])),
                logits_processor=LogitsProcessorList(repeats.processors() if repeats else []),
            )
    except BaseException as e:  # handed to the consumer, re-raised there
        q.put(e)
    finally:
        q.put(None)


class QueueStreamer(BaseStreamer):
    """A transformers streamer that puts each step's new token ids (a list) on a queue."""

    def __init__(self, q: queue.Queue) -> None:
        self.queue = q
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.queue.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass  # the worker thread signals the end itself (also on errors)
