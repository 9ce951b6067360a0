"""Decoding settings and the result of one generation (shared by every backend)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from adgen.errors import ConfigError

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class DecodingConfig:
    """How to decode. Greedy by default (deterministic, what evaluation reports).

    - `do_sample=False` -> greedy; the sampling fields are then ignored. `temperature <= 0` also
      means greedy (the OpenAI convention), whatever `do_sample` says.
    - `top_k=0` and `top_p=1.0` disable those filters. `repetition_penalty=1.0` is off.
    - `no_repeat_ngram_size=N` (> 0) forbids any N-token sequence from occurring twice, prompt
      included (Hugging Face's n-gram blocking; 0 = off). It stays deterministic under greedy
      decoding and stops small models' phrase loops; N counts *tokens*, so pick it per tokenizer
      (SmolLM2 spends ~2.5 byte tokens on a Chinese character, Llama-3 about one).
    - `seed` makes sampling reproducible (the same seed and prompts give the same text).
    - `stop`: strings that end the text; the text is cut before the first one (finish_reason "stop").
    The model's own end-of-turn ids always stop generation; they are not configured here.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept a list (or a single string) for `stop`, keep a hashable tuple.
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        self.validate()

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, not {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), not {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1.0 = off), not {self.repetition_penalty}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), not {self.no_repeat_ngram_size!r}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ConfigError("stop must be a list of strings")

    def replace(self, **changes) -> "DecodingConfig":
        return replace(self, **changes)

    def describe(self) -> str:
        """One line for reports: which decoding produced the numbers."""
        if self.greedy:
            s = f"greedy, max_new_tokens={self.max_new_tokens}"
        else:
            s = (f"sampling temperature={self.temperature} top_p={self.top_p} top_k={self.top_k}, "
                 f"max_new_tokens={self.max_new_tokens}, seed={self.seed}")
        if self.repetition_penalty != 1.0:
            s += f", repetition_penalty={self.repetition_penalty}"
        if self.no_repeat_ngram_size:
            s += f", no_repeat_ngram_size={self.no_repeat_ngram_size}"
        return s


@dataclass
class Generation:
    """One finished completion.

    `text` is clean: no special tokens, cut before the first stop string, never ending in half a
    UTF-8 character. `completion_tokens` counts the generated tokens including the end-of-turn token
    the model emitted (as OpenAI-style usage does). `finish_reason`: "stop" (end-of-turn token or a
    stop string), "length" (max_new_tokens reached), "cancelled" (a stream closed early).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    token_ids: list[int] = field(default_factory=list, repr=False)
