"""Hugging Face generation backend: `HFGenerator`, a transformers model (+ adapter) behind the `Generator` protocol.

How it generates: continuous batching on `adgen.generation.engine` where the model allows it; otherwise
length-sorted left-padded `model.generate` batches (adgen.generation.hf_padded); one prompt streamed as text
pieces (adgen.generation.hf_stream). Loading is `adgen.generation.loader.load_generator`'s.

Thread safety: one `HFGenerator` may be shared by many threads (the API server does). Every use of
the model -- one batch of `generate()`, or one whole `stream()` -- holds `generator.lock` (an RLock),
so calls never interleave on the model; they queue on the lock in turn. A long `generate()` call
releases the lock between batches, which lets streams of other requests in. A seeded sampling call holds
the lock for the whole call (the RNG is global).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import replace
from typing import Callable, Iterator, Sequence

import torch
from transformers import GenerationConfig

from adgen.data.chat import ChatFormatter
from adgen.generation.config import GENERATION_BATCH_SIZE, DecodingConfig, Generation
from adgen.generation.engine import DecodeEngine, Request, supports_engine
from adgen.generation.hf_padded import generate_padded, generation_config, seeded
from adgen.generation.hf_stream import TextStream
from adgen.generation.protocol import check_prompts

__all__ = ["HFGenerator", "TextStream", "prime_torch_threads"]


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
        formatter: ChatFormatter | None = None,
        batch_size: int = GENERATION_BATCH_SIZE,
        *,
        model_name: str | None = None,
        adapter: str | None = None,
        continuous: bool = True,
    ) -> None:
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
    def device(self) -> torch.device:
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

    @property
    def uses_engine(self) -> bool:
        return self.continuous and supports_engine(self.model)

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.formatter.prompt_ids(prompt)
        if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
            return self.formatter.prompt_ids(list(prompt))
        raise TypeError(f"a prompt is an AdGen content string or a list of message dicts, not {type(prompt).__name__}")

    def resolve(self, config: DecodingConfig | None) -> DecodingConfig:
        """The config this generator runs: `max_new_tokens` sized from the tokenizer when unset."""
        return (config or DecodingConfig()).for_tokenizer(self.tokenizer)

    # ---- batched ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence,
        config: DecodingConfig | None = None,
        *,
        progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Generation]:
        """One `Generation` per prompt, in the order given.

        Continuous batching (`adgen.generation.engine`): up to `batch_size` prompts decode together, a
        finished one leaves at once and the next prompt takes its place; the prompts' shared start
        (chat header + system prompt) is computed once. Models the engine cannot drive (see
        `engine.supports_engine`), or `continuous=False`: prompts sorted by length (longest first) and
        cut into left-padded batches of `batch_size` for `model.generate`.
        With `config.seed`, sampling is reproducible for the same call. `progress(k)` is called as
        prompts finish, with how many. `cancel` set from another thread stops every prompt after its current
        step (their generations end early: a caller that cancels discards them).
        """
        prompts = check_prompts(prompts)
        config = self.resolve(config)
        if not prompts:
            return []
        encoded = [self.prompt_ids(p) for p in prompts]
        results: list[Generation | None] = [None] * len(encoded)
        if self.uses_engine:
            for i, g in self._continuous(encoded, config, cancel):
                results[i] = g
                if progress is not None:
                    progress(1)
            return results  # type: ignore[return-value]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        with self.seeded(config):
            for start in range(0, len(order), self.batch_size):
                if cancel is not None and cancel.is_set():
                    break  # (the prompts not started stay None: a caller that cancels discards the results)
                idx = order[start : start + self.batch_size]
                outs = self._generate_batch([encoded[i] for i in idx], config, cancel)
                for i, out in zip(idx, outs):
                    results[i] = out
                if progress is not None:
                    progress(len(idx))
        return results  # type: ignore[return-value]

    def generate_each(self, prompts: Sequence, config: DecodingConfig | None = None) -> Iterator[tuple[int, Generation]]:
        """(index, Generation) for every prompt: with continuous batching each as soon as it is done
        (`batch_size` prompts keep running over the whole list); without it, all after `generate`."""
        if not self.uses_engine:
            yield from enumerate(self.generate(prompts, config))
            return
        config = self.resolve(config)
        yield from self._continuous([self.prompt_ids(p) for p in check_prompts(prompts)], config)

    def decode_engine(self, slots: int | None = None, *, capacity: int | None = None,
                      batch_prefill: bool | str | int = "auto") -> DecodeEngine:
        """A continuous-batching engine over this generator's model (`uses_engine` must be true).
        `capacity`: a KV cache of `slots x capacity` tokens fixed now (a GPU server's budget);
        `batch_prefill`: see DecodeEngine."""
        return DecodeEngine(self.model, self.tokenizer, self.stop_token_ids, slots=slots or self.batch_size,
                            capacity=capacity, batch_prefill=batch_prefill)

    def _continuous(self, encoded: list[list[int]], config: DecodingConfig,
                    cancel: threading.Event | None = None) -> Iterator[tuple[int, Generation]]:
        # one engine (and prefix cache) per call: the adapter may be switched between calls
        engine = self.decode_engine()
        # each request samples from its own RNG: a seeded call gives prompt k the seed + k (as the server's
        # choice k), so repeated prompts (-n candidates) differ and the call stays reproducible
        requests = [Request(ids, config if config.greedy or config.seed is None else replace(config, seed=config.seed + k),
                            cancel=cancel or threading.Event())
                    for k, ids in enumerate(encoded)]
        index = {id(r): i for i, r in enumerate(requests)}
        with self.lock:
            for request in engine.run_each(requests):
                yield index[id(request)], request.result  # type: ignore[misc]
        self.last_engine_stats = engine.stats()

    def _generate_batch(self, batch: list[list[int]], config: DecodingConfig,
                        cancel: threading.Event | None = None) -> list[Generation]:
        return generate_padded(self.model, self.tokenizer, batch, config, device=self.device,
                               stop_ids=self.stop_token_ids, pad_id=self.pad_token_id, lock=self.lock, cancel=cancel)

    def generation_config(self, config: DecodingConfig) -> GenerationConfig:
        """What `model.generate` gets for `config` (resolved): this model's stop ids, nothing of its own defaults."""
        return generation_config(config, self.stop_token_ids, self.tokenizer.bos_token_id)

    def seeded(self, config: DecodingConfig) -> contextlib.AbstractContextManager:
        """Seed sampling for a `model.generate` call without disturbing the caller's global RNG state."""
        return seeded(config, self.device, self.lock)

    # ---- streaming -------------------------------------------------------------------------
    def stream(self, prompt, config: DecodingConfig | None = None, *, cancel: threading.Event | None = None) -> TextStream:
        """Stream the completion of one prompt as text pieces, as the model makes them.

        Returns a `TextStream`: iterate it for `str` pieces (each a whole number of characters, no
        special tokens, nothing past a stop string); concatenated they equal `generate([prompt])[0].text`
        for greedy decoding. Stop early with `stream.close()` (or by setting the `cancel` event from
        any thread): the model thread stops after its current step and the lock is released. After
        the iteration ends, `stream.finish_reason`, `stream.prompt_tokens`, `stream.completion_tokens`
        and `stream.generation` say how it ended.
        """
        return TextStream(self, prompt, self.resolve(config), cancel)


def prime_torch_threads() -> None:
    """Run one parallel torch op on the calling (main) thread before any worker thread does.

    Measured on CPU (torch 2.13, OpenMP, 2 cores): when the process's first parallel op runs on a
    secondary thread, generation in secondary threads stays ~10-25x slower (16 tokens of the tiny
    model: 1.2 s instead of 0.05 s); one matmul on the main thread first avoids it.
    """
    torch.ones(256, 256) @ torch.ones(256, 256)  # cpu-ok: the CPU's thread pool is what this primes
