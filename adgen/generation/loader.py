"""`load_generator`: model spec (+ adapter) -> a ready generator of the chosen backend."""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig

from adgen.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormatter
from adgen.errors import AdgenError, ModelError
from adgen.generation.config import GENERATION_BATCH_SIZE
from adgen.generation.hf import HFGenerator
from adgen.generation.protocol import Generator
from adgen.generation.vllm_backend import VLLMGenerator, check_vllm_adapter, require_vllm
from adgen.models import load_model, load_tokenizer, resolve_model

BACKENDS = ("hf", "vllm")


def _generation_eos_ids(path) -> list[int]:
    """eos ids from the model's generation_config.json (Llama-3 Instruct lists 128001 and 128009)."""
    try:
        eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
    except Exception:
        return []
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def load_generator(
    model_spec: str,
    adapter: str | Path | None = None,
    backend: str = "hf",
    dtype: str | None = "auto",
    device: str | None = "auto",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    batch_size: int = GENERATION_BATCH_SIZE,
    *,
    quantization: str | None = None,
    trust_remote_code: bool = False,
    continuous: bool = True,
    **backend_kwargs,
) -> Generator:
    """Load a model (built-in alias, local dir, .gguf, hub id), optionally + a PEFT adapter.

    Returns an `HFGenerator` (backend "hf") or a `VLLMGenerator` (backend "vllm"); both expose
    `generate`, `stream`, `tokenizer`, `formatter`, `model_name`, `adapter`, `device`, `backend`.
    `system_prompt=None` renders prompts without a system turn. `continuous=False` (hf): left-padded
    `model.generate` batches instead of continuous batching (vLLM always batches continuously).
    """
    if backend not in BACKENDS:
        raise AdgenError(f"unknown backend '{backend}' (use {' or '.join(BACKENDS)})")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    if backend == "vllm":
        require_vllm()  # fail fast, before loading anything
        if adapter is not None:
            check_vllm_adapter(adapter)  # DoRA / modules_to_save refused before the tokenizer and vLLM load
    resolved = resolve_model(model_spec)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    formatter = ChatFormatter(
        tokenizer, system_prompt=system_prompt, generation_eos_ids=_generation_eos_ids(resolved.path)
    )
    name = str(model_spec)
    if backend == "vllm":
        return VLLMGenerator(
            str(resolved.path), tokenizer, formatter, adapter=adapter, model_name=name,
            dtype=dtype or "auto", batch_size=batch_size, **backend_kwargs,
        )
    if backend_kwargs:
        raise AdgenError(f"unknown option(s) for the hf backend: {', '.join(sorted(backend_kwargs))}")
    model = load_model(
        resolved, dtype=dtype, device=device, quantization=quantization,
        trust_remote_code=trust_remote_code, adapter=adapter,
    )
    return HFGenerator(model, tokenizer, formatter, batch_size=batch_size, model_name=name, adapter=adapter,
                       continuous=continuous)
