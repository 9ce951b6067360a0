"""One generation engine behind one interface.

    gen = load_generator("smollm2-135m", adapter=None, backend="hf")
    gen.generate(["类型#裙*颜色#黑色"], DecodingConfig())        # -> [Generation(text, ...)]
    for piece in gen.stream("类型#裙*颜色#黑色"): print(piece, end="")

See hf.py for batching, stopping, streaming, cancellation and thread safety; bulk.py for resumable
generation over a whole file.

The names below are imported on first use (PEP 562): the CLI registers its decoding flags from
`adgen.generation.config`, which imports this package, and must not pay for torch / transformers then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adgen.generation.config import DecodingConfig, FinishReason, Generation
    from adgen.generation.hf import HFGenerator, TextStream
    from adgen.generation.loader import BACKENDS, load_generator
    from adgen.generation.text import IncrementalDecoder
    from adgen.generation.vllm_backend import VLLMGenerator, vllm_available

# public name -> the module that defines it
_EXPORTS = {
    "BACKENDS": "adgen.generation.loader",
    "DecodingConfig": "adgen.generation.config",
    "FinishReason": "adgen.generation.config",
    "Generation": "adgen.generation.config",
    "HFGenerator": "adgen.generation.hf",
    "IncrementalDecoder": "adgen.generation.text",
    "TextStream": "adgen.generation.hf",
    "VLLMGenerator": "adgen.generation.vllm_backend",
    "load_generator": "adgen.generation.loader",
    "vllm_available": "adgen.generation.vllm_backend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adgen.generation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
