"""One engine request and the decoding state it carries while it runs.

`Request` is what a caller submits (prompt ids, settings, cancel flag, token callback) and where the engine
puts the outcome (`result` or `error`). `RunningRequest` is the engine's state of an admitted request: its
length in the cache, the tokens generated, its repetition control, its transformers processors, its seeded
generator, its token limit; `record(token)` is the host's part of each chosen token (callback, repetition
state, stop string, whether it ends) and sets `request.result` when the request ends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from adgen.generation.config import DecodingConfig, Generation
from adgen.generation.repetition import RepeatState
from adgen.generation.text import decode, find_stop, finished_generation, stop_window


@dataclass(eq=False)
class Request:
    """One prompt to complete. `on_tokens(ids)` (optional) is called with each step's new token ids.

    `adapter`: for a PEFT model with LoRA adapters, the adapter this request runs with ("__base__" = none);
    None = the model's active adapter. Requests for different adapters decode in one batch (PEFT's
    mixed-adapter forward). `cancel`: set it from any thread; the request leaves before the next step.
    `error`: set when the request failed on its own (its prefill, its logits processing or sampling, its
    stop check, its `on_tokens`): it left the batch with `result` None and the other requests went on.
    """

    prompt_ids: list[int]
    config: DecodingConfig
    cancel: threading.Event = field(default_factory=threading.Event)
    on_tokens: Callable[[list[int]], None] | None = None
    adapter: str | None = None
    result: Generation | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def cancelled_before_start(self) -> bool:
        """Whether the request was cancelled before it took a slot (then it ends with no tokens)."""
        if self.cancel.is_set():
            self.result = Generation("", len(self.prompt_ids), 0, "cancelled", [])
            return True
        return False


@dataclass(eq=False)
class RunningRequest:
    """An admitted request's decoding state (see the module docstring)."""

    request: Request
    length: int  # tokens in the cache (= the column of the token the next step feeds)
    limit: int  # tokens it may generate (the config's max_new_tokens, sized from the tokenizer when unset)
    tokenizer: object
    stop_ids: Sequence[int]
    repeat: RepeatState | None
    processors: object  # transformers LogitsProcessorList reading the token ids (or None): before the shaping
    warpers: object  # transformers' temperature / top-k / top-p for a sampled request (or None): after it
    rng: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    stop_hit: bool = False

    def record(self, token: int) -> None:
        """The host's part of a chosen token: the request's text state, its callback, whether it ends."""
        request, config = self.request, self.request.config
        self.generated.append(token)
        if request.on_tokens is not None:
            request.on_tokens([token])
        if self.repeat is not None:
            self.repeat.push([token])
        if config.stop and token not in self.stop_ids:
            tail = self.generated[-stop_window(config.stop):]
            self.stop_hit = find_stop(decode(self.tokenizer, tail), config.stop) != -1
        done = (token in self.stop_ids or self.stop_hit or (self.repeat is not None and self.repeat.looped)
                or len(self.generated) >= self.limit or request.cancel.is_set())
        if done:
            request.result = self.result()

    def result(self) -> Generation:
        """The request's `Generation` from what it generated so far."""
        request = self.request
        return finished_generation(
            self.tokenizer, len(request.prompt_ids), self.generated, self.stop_ids, request.config.stop,
            stop_hit=self.stop_hit, looped=self.repeat is not None and self.repeat.looped,
            cancelled=request.cancel.is_set(),
        )


def seeded_rng(config: DecodingConfig, device) -> torch.Generator | None:
    """A seeded request's own generator, on the device its logits are on (torch.multinomial refuses a CPU
    generator for CUDA probabilities). On the CPU the same seed gives the same draws as before."""
    if config.greedy or config.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(config.seed))
    return g
