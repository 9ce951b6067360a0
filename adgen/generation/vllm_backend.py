"""vLLM backend (optional): fast batched generation on GPUs, LoRA adapters via adapter requests.

vLLM is not a dependency of adgen; `pip install vllm` on a CUDA machine enables `--backend vllm`.
The prompt ids come from the same `ChatFormatter` as the HF backend, and the same stop ids
(every end-of-turn id) are passed as `stop_token_ids`, so both backends see identical prompts.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterator, Sequence

from adgen.errors import AdgenError, ConfigError
from adgen.generation.config import DecodingConfig, Generation
from adgen.generation.protocol import check_prompts
from adgen.generation.repetition import trim_loop
from adgen.generation.text import clean_text, cut_at_stop

log = logging.getLogger(__name__)

VLLM_MISSING = (
    "--backend vllm needs vLLM, which is not installed: `pip install vllm` (Linux + CUDA GPU), "
    "or use --backend hf (the default, works everywhere)"
)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise AdgenError(VLLM_MISSING) from None
    return vllm


class VLLMGenerator:
    """Same interface as `HFGenerator` (generate / stream / tokenizer / formatter / ...) on vLLM.

    `stream()` yields the finished text as one piece: vLLM's offline `LLM` class does not stream
    (the API server uses the HF backend for streaming).
    """

    backend = "vllm"
    uses_engine = False  # vLLM batches inside its engine; results come back per generate() call
    model = None  # the weights live inside vLLM's engine

    def __init__(
        self,
        model_path: str,
        tokenizer,
        formatter,
        *,
        adapter: str | None = None,
        model_name: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
        max_lora_rank: int = 64,
        **llm_kwargs,
    ) -> None:
        vllm = require_vllm()
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.model_name = model_name or str(model_path)
        self.adapter = str(adapter) if adapter is not None else None
        self.batch_size = batch_size  # vLLM schedules its own batches; kept for the common interface
        self.lock = threading.RLock()
        from adgen.models import dtype_name

        vllm_dtype = dtype_name(dtype) or dtype  # "auto" passes through
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype=vllm_dtype,
            enable_lora=adapter is not None,
            max_lora_rank=max_lora_rank,
            **llm_kwargs,
        )
        self._lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("adgen-adapter", 1, str(Path(adapter).resolve()))

    @property
    def device(self):
        import torch

        return torch.device("cuda")

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.formatter.stop_token_ids)

    def prompt_ids(self, prompt) -> list[int]:
        return self.formatter.prompt_ids(prompt if isinstance(prompt, str) else list(prompt))

    def resolve(self, config: DecodingConfig | None) -> DecodingConfig:
        return (config or DecodingConfig()).for_tokenizer(self.tokenizer)

    def sampling_params(self, config: DecodingConfig):
        if config.dry_multiplier > 0 or config.no_repeat_char_ngram:
            # vLLM samples inside its engine, where adgen's per-request character state cannot run.
            log.warning("character-level DRY / n-gram ban run on the hf backend only; vllm decodes without them "
                        "(loop detection still trims looping texts afterwards)")
        if config.no_repeat_ngram_size:
            raise ConfigError(
                "no_repeat_ngram_size is not supported by the vllm backend; use --backend hf, "
                "or repetition_penalty")
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=config.max_new_tokens,
            temperature=0.0 if config.greedy else config.temperature,
            top_p=1.0 if config.greedy else config.top_p,
            top_k=-1 if config.greedy or config.top_k == 0 else config.top_k,
            repetition_penalty=config.repetition_penalty,
            seed=config.seed,
            stop=list(config.stop) or None,
            stop_token_ids=self.stop_token_ids,
            skip_special_tokens=True,
        )

    def generate(self, prompts: Sequence, config: DecodingConfig | None = None) -> list[Generation]:
        prompts = check_prompts(prompts)
        config = self.resolve(config)
        if not prompts:
            return []
        encoded = [self.prompt_ids(p) for p in prompts]
        try:
            from vllm.inputs import TokensPrompt

            inputs = [TokensPrompt(prompt_token_ids=ids) for ids in encoded]
        except ImportError:  # older vLLM
            inputs = [{"prompt_token_ids": ids} for ids in encoded]
        with self.lock:
            outputs = self.llm.generate(inputs, self.sampling_params(config), lora_request=self._lora, use_tqdm=False)
        results = []
        for ids, out in zip(encoded, outputs):
            c = out.outputs[0]
            text, _ = cut_at_stop(clean_text(c.text), config.stop)
            finish = "stop" if c.finish_reason == "stop" else "length"
            if config.loop_detection and finish == "length":
                text, looped = trim_loop(text)
                finish = "loop" if looped else finish
            results.append(Generation(text, len(ids), len(c.token_ids), finish, list(c.token_ids)))
        return results

    def generate_each(self, prompts: Sequence, config: DecodingConfig | None = None) -> Iterator[tuple[int, Generation]]:
        yield from enumerate(self.generate(prompts, config))

    def stream(self, prompt, config: DecodingConfig | None = None, *, cancel: threading.Event | None = None) -> "DoneStream":
        """The whole text as one piece (vLLM's offline engine does not stream), same attributes as TextStream."""
        return DoneStream(self.generate([prompt], config)[0], cancel)


class DoneStream:
    """A finished generation dressed as a `TextStream`: one piece, then finish_reason and counts."""

    def __init__(self, generation: Generation, cancel: threading.Event | None = None) -> None:
        self._generation = generation
        self.cancel = cancel if cancel is not None else threading.Event()
        self.prompt_tokens = generation.prompt_tokens
        self.completion_tokens = generation.completion_tokens
        self.finish_reason = generation.finish_reason
        self.text = generation.text
        self._pieces = iter([generation.text] if generation.text else [])

    @property
    def generation(self) -> Generation:
        return self._generation

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self.cancel.is_set():
            raise StopIteration
        return next(self._pieces)

    def close(self) -> None:
        self.cancel.set()

    def __enter__(self) -> "DoneStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
