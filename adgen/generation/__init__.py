"""One generation engine behind one interface.

    gen = load_generator("smollm2-135m", adapter=None, backend="hf")
    gen.generate(["类型#裙*颜色#黑色"], DecodingConfig())        # -> [Generation(text, ...)]
    for piece in gen.stream("类型#裙*颜色#黑色"): print(piece, end="")

See hf.py for batching, stopping, streaming, cancellation and thread safety; bulk.py for resumable
generation over a whole file.
"""

from adgen.generation.config import DecodingConfig, FinishReason, Generation
from adgen.generation.hf import HFGenerator, TextStream
from adgen.generation.loader import BACKENDS, load_generator
from adgen.generation.text import IncrementalDecoder
from adgen.generation.vllm_backend import VLLMGenerator, vllm_available

__all__ = [
    "BACKENDS",
    "DecodingConfig",
    "FinishReason",
    "Generation",
    "HFGenerator",
    "IncrementalDecoder",
    "TextStream",
    "VLLMGenerator",
    "load_generator",
    "vllm_available",
]
