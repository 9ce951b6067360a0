"""What evaluation, bulk generation and serving use of a generation engine: one `typing.Protocol`.

Implemented by `HFGenerator` (transformers; continuous batching), `VLLMGenerator` (optional GPU backend)
and the tests' fakes. Consumers read these attributes directly, no `getattr(..., default)` probing, so an
engine that lacks one fails at once, by name.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from adgen.generation.config import DecodingConfig, Generation


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
        """True when `generate_each` hands out results as they finish (continuous batching)."""

    def resolve(self, config: DecodingConfig | None) -> DecodingConfig:
        """`config` (or the default) with everything left open fixed, e.g. max_new_tokens from the tokenizer."""

    def generate(self, prompts: Sequence, config: DecodingConfig | None = None) -> list[Generation]: ...

    def generate_each(self, prompts: Sequence, config: DecodingConfig | None = None) -> Iterator[tuple[int, Generation]]:
        """(index, Generation) for every prompt as soon as it is done."""

    def stream(self, prompt, config: DecodingConfig | None = None, *, cancel=None) -> Any:
        """An iterator of text pieces; `.generation` (or the final attributes) once exhausted."""


def check_prompts(prompts) -> list:
    """`generate` takes a list of prompts (content strings or chats); a single one is a caller's mistake."""
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict)
    ):
        raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list: generate([prompt], config)")
    return list(prompts)
