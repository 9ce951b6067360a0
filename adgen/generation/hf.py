"""Hugging Face generation backend: batched (left padding, length-sorted batches, KV cache) and streaming.

Thread safety: one `HFGenerator` may be shared by many threads (the API server does). Every use of
the model -- one batch of `generate()`, or one whole `stream()` -- holds `generator.lock` (an RLock),
so calls never interleave on the model; they queue on the lock in turn. A long `generate()` call
releases the lock between batches, which lets streams of other requests in. A stream's model thread
never waits for its reader (tokens go to an unbounded queue), so a slow client does not hold the
model; a client that goes away must `close()` the stream (or set its `cancel` event), which stops
the model after its current step. A seeded sampling call holds the lock for the whole call (the RNG
is global).

Stopping: `eos_token_id` passed to `model.generate` is the formatter's `stop_token_ids` -- every
end-of-turn id of the model (Llama-3: 128001 `<|end_of_text|>` *and* 128009 `<|eot_id|>`). The
model's own generation_config is not trusted for this, nor for sampling defaults: a
`DecodingConfig` says everything (greedy unless asked otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import replace
from typing import Callable, Iterator, Sequence

from adgen.generation.config import GENERATION_BATCH_SIZE, DecodingConfig, FinishReason, Generation
from adgen.generation.protocol import check_prompts
from adgen.generation.text import (
    decode,
    find_stop,
    finished_generation,
    stop_window,
)

log = logging.getLogger(__name__)


class HFGenerator:
    """Generation with a transformers model (base, or a PeftModel = base + adapter).

    Prompts: a `str` is an AdGen content string ("类型#裙*颜色#黑色"), rendered through
    `formatter.messages` (system prompt + user turn); a list of `{"role", "content"}` dicts is a chat
    used as is. Both go through `formatter.prompt_ids` (the chat template with the generation prompt,
    never a doubled BOS).
    """

    backend = "hf"

    def __init__(
        self,
        model,
        tokenizer,
        formatter=None,
        batch_size: int = GENERATION_BATCH_SIZE,
        *,
        model_name: str | None = None,
        adapter: str | None = None,
        continuous: bool = True,
    ) -> None:
        from adgen.data.chat import ChatFormatter

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = formatter if formatter is not None else ChatFormatter(tokenizer)
        self.batch_size = int(batch_size)
        self.model_name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or "model"
        self.adapter = str(adapter) if adapter is not None else None
        self.lock = threading.RLock()
        # continuous batching (adgen.generation.engine) where the model allows it, else model.generate
        self.continuous = bool(continuous)
        self.last_engine_stats: dict | None = None  # decode steps / prefix tokens saved by the last generate()
        # Streams and bulk jobs run the model in worker threads: see prime_torch_threads.
        if threading.current_thread() is threading.main_thread():
            prime_torch_threads()

    # ---- properties ------------------------------------------------------------------------
    @property
    def device(self):
        try:
            return self.model.device
        except AttributeError:
            return next(self.model.parameters()).device

    @property
    def stop_token_ids(self) -> list[int]:
        """Every id that ends a turn, the end-of-turn id first (the ending bonus goes to the first)."""
        ids = list(self.formatter.stop_token_ids)
        eot = self.formatter.end_of_turn_id
        return [eot] + [i for i in ids if i != eot] if eot in ids else ids

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.stop_token_ids[0]

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.formatter.prompt_ids(prompt)
        if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
            return self.formatter.prompt_ids(list(prompt))
        raise TypeError(f"a prompt is an AdGen content string or a list of message dicts, not {type(prompt).__name__}")

    # ---- batched ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence,
        config: DecodingConfig | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """One `Generation` per prompt, in the order given.

        Continuous batching (`adgen.generation.engine`): up to `batch_size` prompts decode together, a
        finished one leaves at once and the next prompt takes its place; the prompts' shared start
        (chat header + system prompt) is computed once. Models the engine cannot drive (see
        `engine.supports_engine`), or `continuous=False`: prompts sorted by length (longest first) and
        cut into left-padded batches of `batch_size` for `model.generate`.
        With `config.seed`, sampling is reproducible for the same call. `progress(k)` is called as
        prompts finish, with how many.
        """
        prompts = check_prompts(prompts)
        config = self.resolve(config)
        if not prompts:
            return []
        encoded = [self.prompt_ids(p) for p in prompts]
        if self.uses_engine:
            results: list[Generation | None] = [None] * len(encoded)
            for i, g in self._continuous(encoded, config):
                results[i] = g
                if progress is not None:
                    progress(1)
            return results  # type: ignore[return-value]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results = [None] * len(encoded)
        with self._seeded(config):
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                outs = self._generate_batch([encoded[i] for i in idx], config)
                for i, out in zip(idx, outs):
                    results[i] = out
                if progress is not None:
                    progress(len(idx))
        return results  # type: ignore[return-value]

    @property
    def uses_engine(self) -> bool:
        from adgen.generation.engine import supports_engine

        return self.continuous and supports_engine(self.model)

    def generate_each(self, prompts: Sequence, config: DecodingConfig | None = None) -> Iterator[tuple[int, Generation]]:
        """(index, Generation) for every prompt: with continuous batching each as soon as it is done
        (`batch_size` prompts keep running over the whole list); without it, all after `generate`."""
        if not self.uses_engine:
            yield from enumerate(self.generate(prompts, config))
            return
        config = self.resolve(config)
        yield from self._continuous([self.prompt_ids(p) for p in check_prompts(prompts)], config)

    def decode_engine(self, slots: int | None = None, *, capacity: int | None = None):
        """A continuous-batching engine over this generator's model (`uses_engine` must be true).
        `capacity`: a KV cache of `slots x capacity` tokens fixed now (a GPU server's budget)."""
        from adgen.generation.engine import DecodeEngine

        return DecodeEngine(self.model, self.tokenizer, self.stop_token_ids, slots=slots or self.batch_size,
                            capacity=capacity)

    def _continuous(self, encoded: list[list[int]], config: DecodingConfig) -> Iterator[tuple[int, Generation]]:
        from adgen.generation.engine import Request

        # one engine (and prefix cache) per call: the adapter may be switched between calls
        engine = self.decode_engine()
        # each request samples from its own RNG: a seeded call gives prompt k the seed + k (as the server's
        # choice k), so repeated prompts (-n candidates) differ and the call stays reproducible
        requests = [Request(ids, config if config.greedy or config.seed is None else replace(config, seed=config.seed + k))
                    for k, ids in enumerate(encoded)]
        index = {id(r): i for i, r in enumerate(requests)}
        with self.lock:
            for request in engine.run_each(requests):
                yield index[id(request)], request.result  # type: ignore[misc]
        self.last_engine_stats = engine.stats()

    def resolve(self, config: DecodingConfig | None) -> DecodingConfig:
        """The config this generator runs: `max_new_tokens` sized from the tokenizer when unset."""
        return (config or DecodingConfig()).for_tokenizer(self.tokenizer)

    def repeat_control(self, config: DecodingConfig, batch_size: int, prompt_width: int):
        """The character-level repetition control for one left-padded batch (None when it is off)."""
        from adgen.generation.hf_processors import BatchRepeatControl

        if not config.controls_repetition:
            return None
        return BatchRepeatControl(self.tokenizer, config, self.stop_token_ids, batch_size, prompt_width)

    def _generate_batch(self, batch: list[list[int]], config: DecodingConfig) -> list[Generation]:
        import torch

        width = max(len(ids) for ids in batch)
        pad = self.pad_token_id
        device = self.device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], dtype=torch.long, device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long,
                                 device=device)
        stop_strings = _StopStringCriteria(self.tokenizer, config.stop, width) if config.stop else None
        criteria = [stop_strings] if stop_strings else []
        repeats = self.repeat_control(config, len(batch), width)
        if repeats is not None:
            criteria += repeats.criteria()
        with self.lock, torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                generation_config=self._generation_config(config),
                stopping_criteria=_criteria_list(criteria),
                logits_processor=_processor_list(repeats.processors() if repeats is not None else []),
            )
        new = out[:, width:].tolist()
        return [
            finished_generation(
                self.tokenizer, len(ids), gen, self.stop_token_ids, config.stop,
                stop_hit=stop_strings is not None and stop_strings.hit[row],
                looped=repeats is not None and repeats.states[row].looped,
            )
            for row, (ids, gen) in enumerate(zip(batch, new))
        ]

    def _generation_config(self, config: DecodingConfig):
        from transformers import GenerationConfig

        kwargs = dict(
            max_new_tokens=config.max_new_tokens,
            num_beams=1,
            use_cache=True,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.stop_token_ids[0],  # finished rows are filled with a stop id
            bos_token_id=self.tokenizer.bos_token_id,
            repetition_penalty=config.repetition_penalty,
            no_repeat_ngram_size=config.no_repeat_ngram_size,
        )
        if config.greedy:
            # Set explicitly: the model's own generation_config (e.g. Llama-3: temperature 0.6,
            # top_p 0.9, do_sample) would otherwise fill in whatever is left unset.
            kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)  # the neutral defaults
        else:
            kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
        return GenerationConfig(**kwargs)

    @contextlib.contextmanager
    def _seeded(self, config: DecodingConfig):
        """Seed sampling without disturbing the caller's global RNG state."""
        if config.greedy or config.seed is None:
            yield
            return
        import torch

        devices = [self.device] if self.device.type == "cuda" else []
        with self.lock, torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            yield

    # ---- streaming -------------------------------------------------------------------------
    def stream(self, prompt, config: DecodingConfig | None = None, *, cancel: threading.Event | None = None) -> "TextStream":
        """Stream the completion of one prompt as text pieces, as the model makes them.

        Returns a `TextStream`: iterate it for `str` pieces (each a whole number of characters, no
        special tokens, nothing past a stop string); concatenated they equal `generate([prompt])[0].text`
        for greedy decoding. Stop early with `stream.close()` (or by setting the `cancel` event from
        any thread): the model thread stops after its current step and the lock is released. After
        the iteration ends, `stream.finish_reason`, `stream.prompt_tokens`, `stream.completion_tokens`
        and `stream.generation` say how it ended.
        """
        return TextStream(self, prompt, self.resolve(config), cancel)


class TextStream:
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
        self._repeats = generator.repeat_control(config, 1, len(self.prompt_ids))
        self._it = self._run()

    # iterator protocol
    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def __enter__(self) -> "TextStream":
        return self

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
        from adgen.generation.pieces import StreamPieces

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
                   q: queue.Queue, repeats=None) -> None:
    """Run one generation, putting each step's token ids on `q`, then None (an exception first, if any).

    The queue is unbounded: the model never waits for a slow reader, so the lock is held only for
    model time, and a cancelled generation ends after its current step.
    """
    import torch

    try:
        with gen._seeded(config), gen.lock, torch.inference_mode():
            if cancel.is_set():
                return
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=gen.device)
            gen.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=gen._generation_config(config),
                streamer=_QueueStreamer(q),
                stopping_criteria=_criteria_list([_CancelCriteria(cancel)] + (repeats.criteria() if repeats else [])),
                logits_processor=_processor_list(repeats.processors() if repeats else []),
            )
    except BaseException as e:  # handed to the consumer, re-raised there
        q.put(e)
    finally:
        q.put(None)


def _criteria_list(criteria):
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(criteria)


def _processor_list(processors):
    from transformers import LogitsProcessorList

    return LogitsProcessorList(processors)


def _QueueStreamer(q: queue.Queue):
    """A transformers streamer that puts each step's new token ids (a list) on a queue."""
    from transformers.generation.streamers import BaseStreamer

    class QueueStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            q.put([int(t) for t in value.reshape(-1).tolist()])

        def end(self) -> None:
            pass  # the worker thread signals the end itself (also on errors)

    return QueueStreamer()


def _CancelCriteria(event: threading.Event):
    import torch
    from transformers import StoppingCriteria

    class CancelCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return CancelCriteria()


def _StopStringCriteria(tokenizer, stops: Sequence[str], prompt_width: int):
    """Per-row stop: the row's newest tokens complete a stop string. Records which rows hit one.

    Not transformers' `GenerationConfig(stop_strings=...)`: it matches the raw token strings, so a stop
    string with a special token inside it (the text a user sees has none) is missed and the row runs on
    (tests/test_generation.py::test_stop_strings[padded]: 15 tokens instead of 5), and it records no
    per-row hit, which the token count needs."""
    import torch
    from transformers import StoppingCriteria

    window = stop_window(stops)

    class StopStringCriteria(StoppingCriteria):
        def __init__(self) -> None:
            self.hit: list[bool] = []

        def __call__(self, input_ids, scores, **kwargs):
            if not self.hit:
                self.hit = [False] * input_ids.shape[0]
            done = []
            for row in range(input_ids.shape[0]):
                if not self.hit[row]:
                    tail = input_ids[row, max(prompt_width, input_ids.shape[1] - window) :].tolist()
                    self.hit[row] = find_stop(decode(tokenizer, tail), stops) != -1
                done.append(self.hit[row])
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopStringCriteria()


def prime_torch_threads() -> None:
    """Run one parallel torch op on the calling (main) thread before any worker thread does.

    Measured on CPU (torch 2.13, OpenMP, 2 cores): when the process's first parallel op runs on a
    secondary thread, generation in secondary threads stays ~10-25x slower (16 tokens of the tiny
    model: 1.2 s instead of 0.05 s); one matmul on the main thread first avoids it.
    """
    import torch

    torch.ones(256, 256) @ torch.ones(256, 256)  # cpu-ok: the CPU's thread pool is what this primes
