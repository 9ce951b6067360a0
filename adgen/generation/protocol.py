"""What evaluation, bulk generation and serving use of a generation engine: one `typing.Protocol`.

Implemented by `HFGenerator` (transformers; continuous batching), `VLLMGenerator` (optional GPU backend)
and the tests' fakes (tests/fake_generator.py). Consumers read these attributes directly, no
`getattr(..., default)` probing, so an engine that lacks one fails at once, by name.

`decode_engine` is optional: only a backend that runs adgen's `DecodeEngine` has it, and it says so with
`uses_engine = True` -- that backend is an `EngineGenerator` (the server then drives the engine step by step).
A backend without one (vLLM batches inside its own engine; the tests' fakes) says `uses_engine = False` and
need not define `decode_engine`; callers look at `uses_engine`, never at whether the method exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence, runtime_checkable

from adgen.generation.config import DecodingConfig, Generation

if TYPE_CHECKING:
    from adgen.generation.engine import DecodeEngine


@runtime_checkable
class Generator(Protocol):
    backend: str  # "hf", "vllm", ... (written into eval metrics and /health)
    model_name: str  # what reports and the API call the model
    adapter: str | None  # the PEFT adapter directory, when one is attached
    batch_size: int  # prompts per decode batch (continuous batching: slots)
    formatter: Any  # adgen.data.chat.ChatFormatter: prompts, system prompt, stop ids
    tokenizer: Any
    model: Any  # the torch module (None where the engine owns it, e.g. vLLM)

    @property
    def device(self) -> Any: ...

    @property
    def uses_engine(self) -> bool:
        """True when this backend runs adgen's `DecodeEngine`: `generate_each` hands out results as they finish
        and `decode_engine` gives the engine to drive (continuous batching)."""

    @property
    def stop_token_ids(self) -> list[int]:
        """Every token id that ends a turn (the end-of-turn id first)."""

    def prompt_ids(self, prompt) -> list[int]:
        """The token ids the model generates from: a content string or a chat through the formatter's template."""

    def resolve(self, config: DecodingConfig | None) -> DecodingConfig:
        """`config` (or the default) with everything left open fixed, e.g. max_new_tokens from the tokenizer."""

    def generate(self, prompts: Sequence, config: DecodingConfig | None = None) -> list[Generation]: ...

    def generate_each(self, prompts: Sequence, config: DecodingConfig | None = None) -> Iterator[tuple[int, Generation]]:
        """(index, Generation) for every prompt as soon as it is done."""

    def stream(self, prompt, config: DecodingConfig | None = None, *, cancel=None) -> Any:
        """An iterator of text pieces; `.generation` (or the final attributes) once exhausted."""


@runtime_checkable
class EngineGenerator(Generator, Protocol):
    """A `Generator` whose `uses_engine` is True: it hands out adgen's continuous-batching engine."""

    def decode_engine(self, slots: int | None = None, *, capacity: int | None = None,
                      batch_prefill: bool | str | int = "auto") -> DecodeEngine:
        """A `DecodeEngine` over this generator's model (`slots` default: `batch_size`). `capacity`: a KV cache
        of `slots x capacity` tokens fixed now (a GPU server's budget); `batch_prefill`: see DecodeEngine."""


def check_prompts(prompts) -> list:
    """`generate` takes a list of prompts (content strings or chats); a single one is a caller's mistake."""
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict)
    ):
        raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list: generate([prompt], config)")
    return list(prompts)
