"""vLLM backend (optional): fast batched generation on GPUs, LoRA adapters via adapter requests.

vLLM is not a dependency of adgen; `pip install 'adgen[vllm]'` (a vLLM built on adgen's torch) on a CUDA machine
enables `--backend vllm`.
The prompt ids come from the same `ChatFormatter` as the HF backend, and the same stop ids
(every end-of-turn id) are passed as `stop_token_ids`, so both backends see identical prompts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path
from typing import Iterator, Sequence

from adgen.errors import AdgenError, ConfigError
from adgen.generation.config import GENERATION_BATCH_SIZE, PLAIN_FIELDS, DecodingConfig, Generation
from adgen.generation.decoding_fields import field_named
from adgen.generation.protocol import check_prompts
from adgen.generation.repetition import trim_loop
from adgen.generation.text import clean_text, cut_at_stop

log = logging.getLogger(__name__)

# vLLM pins one torch release per version: 0.27.x to 0.30.x are built on torch==2.13.0, the torch adgen installs
# (pyproject's `vllm` extra); other releases replace or break it.
VLLM_TORCH = "torch==2.13.0 (vLLM 0.27 to 0.30)"
VLLM_MISSING = (
    "--backend vllm needs vLLM, which is not installed: `pip install 'adgen[vllm]'` (Linux + CUDA GPU; plain "
    f"`pip install vllm` takes the newest release, which may replace adgen's torch: pick one built on {VLLM_TORCH}), "
    "or use --backend hf (the default, works everywhere)"
)
# max_lora_rank values vLLM accepts (its LoRAConfig), for releases that do not export them as MaxLoRARanks.
FALLBACK_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        if e.name == "vllm":
            raise AdgenError(VLLM_MISSING) from None
        # Installed but broken: almost always a vLLM built for another torch (undefined symbols, a missing module).
        import torch

        raise AdgenError(
            f"vLLM is installed but does not import ({type(e).__name__}: {str(e).splitlines()[0][:200]}): it needs "
            f"the torch it was built for, and here is torch {torch.__version__}; install a vLLM built on "
            f"{VLLM_TORCH}: `pip install 'adgen[vllm]'`, or use --backend hf"
        ) from None
    return vllm


def _adapter_config(adapter: str | Path) -> dict:
    path = Path(adapter) / "adapter_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None


def check_vllm_adapter(adapter: str | Path) -> int:
    """The adapter's largest LoRA rank, after refusing what vLLM cannot serve (before vLLM starts: minutes).

    vLLM applies plain LoRA only: DoRA's magnitude vectors and `modules_to_save` (fully trained copies of,
    e.g., lm_head / embed_tokens) are not loaded, so the model would silently not be the one that was trained."""
    cfg = _adapter_config(adapter)
    merge = (f"merge it into its base with `adgen export --adapter {adapter} -o MERGED` and run vLLM on MERGED "
             "(--model MERGED, no --adapter), or use --backend hf")
    if cfg.get("use_dora"):
        raise ConfigError(f"{adapter}: a DoRA adapter (use_dora: true), which vLLM cannot apply: {merge}")
    if cfg.get("modules_to_save"):
        raise ConfigError(f"{adapter}: the adapter trains whole modules (modules_to_save: "
                          f"{', '.join(map(str, cfg['modules_to_save']))}), which vLLM's LoRA cannot load: {merge}")
    ranks = [cfg.get("r") or 8, *(cfg.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


def allowed_lora_ranks() -> tuple[int, ...]:
    """The max_lora_rank values the installed vLLM accepts (its MaxLoRARanks), else the known list."""
    try:
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks

        ranks = tuple(sorted(int(r) for r in get_args(MaxLoRARanks)))
        if ranks:
            return ranks
    except Exception:  # older vLLM (no vllm.config.lora) or another layout: the known list
        pass
    return FALLBACK_LORA_RANKS


def lora_rank_limit(rank: int, allowed: Sequence[int] | None = None) -> int:
    """The smallest allowed max_lora_rank >= the adapter's rank (vLLM sizes its LoRA buffers by it)."""
    allowed = sorted(allowed or allowed_lora_ranks())
    for value in allowed:
        if value >= rank:
            return value
    raise ConfigError(f"the adapter's LoRA rank r={rank} is above the largest rank vLLM serves ({allowed[-1]}): "
                      "merge it with `adgen export` and serve the merged model, or use --backend hf")


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
        batch_size: int = GENERATION_BATCH_SIZE,
        max_lora_rank: int | None = None,
        **llm_kwargs,
    ) -> None:
        vllm = require_vllm()
        if adapter is not None:
            rank = check_vllm_adapter(adapter)
            max_lora_rank = lora_rank_limit(max(rank, max_lora_rank or 0))
            llm_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.model_name = model_name or str(model_path)
        self.adapter = str(adapter) if adapter is not None else None
        self.batch_size = batch_size  # vLLM schedules its own batches; kept for the common interface
        self.lock = threading.RLock()
        self.llm = vllm.LLM(model=str(model_path), dtype=vllm_dtype(dtype), **llm_kwargs)
        self._lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            # Keywords: LoRARequest's fields after these three changed across releases.
            self._lora = LoRARequest(lora_name="adgen-adapter", lora_int_id=1,
                                     lora_path=str(Path(adapter).resolve()))

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
        """vLLM's SamplingParams for `config`, field by field as VLLM_PARAMS says; a refused field is an
        error, a VLLM_WITHOUT one that is on is a warning."""
        refused = [name for name in VLLM_REFUSED if getattr(config, name) != field_named(name).default]
        if refused:
            raise ConfigError(f"{', '.join(refused)} is not supported by the vllm backend; use --backend hf, or "
                              f"{', '.join(VLLM_REFUSED[name] for name in refused)}")
        dropped = [name for name in VLLM_WITHOUT if name in PLAIN_FIELDS and getattr(config, name) != PLAIN_FIELDS[name]]
        if dropped:
            # vLLM samples inside its engine, where adgen's per-request character state cannot run.
            log.warning("%s run on the hf backend only; vllm decodes without them (loop detection still trims "
                        "looping texts afterwards)", ", ".join(dropped))
        from vllm import SamplingParams

        params = {param: _vllm_value(config, name) for name, param in VLLM_PARAMS.items()}
        return SamplingParams(**params, stop_token_ids=self.stop_token_ids, skip_special_tokens=True)

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


# How each DecodingConfig field reaches vLLM (tests/test_decoding_fields.py checks that each is named once).
# Its SamplingParams keyword (the value from `_vllm_value`):
VLLM_PARAMS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop"}
# Applied around vLLM: do_sample (greedy = temperature 0, no top-p / top-k), loop_detection (a text that ran to
# the limit is checked for a loop and trimmed afterwards).
VLLM_AROUND = ("do_sample", "loop_detection")
# Character-level shaping, which needs adgen's per-request state inside sampling: hf backend only, vllm decodes
# without it (a warning says so when one is on).
VLLM_WITHOUT = ("dry_multiplier", "dry_base", "dry_allowed_length", "dry_sequence_breakers", "no_repeat_char_ngram",
                "end_after_chars", "end_bias_per_char", "banned_strings", "coverage_bonus_per_char", "coverage_bonus_max",
                "coverage_hold_chars", "word_repeat_penalty", "word_repeat_limit")
# Refused when set (no vLLM equivalent): the field -> what to use instead.
VLLM_REFUSED = {"no_repeat_ngram_size": "repetition_penalty"}


# Greedy decoding in vLLM's terms: DecodingConfig's sampling settings are then ignored.
VLLM_GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": -1}


def _vllm_value(config: DecodingConfig, name: str):
    if config.greedy and field_named(name).spec.sampling:
        return VLLM_GREEDY[name]
    value = getattr(config, name)
    if name == "top_k":
        return -1 if value == 0 else value  # vLLM's "off"
    if name == "stop":
        return list(value) or None
    return value


def vllm_dtype(dtype: str | None) -> str:
    """vLLM's dtype name. "auto" is resolved here, not by vLLM: vLLM's own auto takes fp16 on GPUs without native
    bf16 (V100, T4), and adgen never picks fp16 unless asked (bf16 where native, fp32 elsewhere)."""
    from adgen.models import dtype_name, select_dtype

    if dtype in (None, "auto"):
        return str(select_dtype("auto")).removeprefix("torch.")
    name = dtype_name(dtype)
    if name is None:
        raise ConfigError(f"unknown dtype '{dtype}' (use auto, bf16, fp32, or fp16)")
    return name


class DoneStream(contextlib.AbstractContextManager):
    """A finished generation dressed as a `TextStream`: one piece, then finish_reason and counts
    (`with` closes it, as a TextStream)."""

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

    def __exit__(self, *exc) -> None:
        self.close()
