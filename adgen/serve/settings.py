"""Server options: what `adgen serve` binds to, which model it serves, and the limits it enforces.

Every limit has a safe default; none of them comes from a request. Paths here (model, adapter,
vocab, examples) are set by whoever starts the server, never by a client.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from adgen.errors import ConfigError
from adgen.generation.config import GENERATION_BATCH_SIZE

API_KEY_ENV = "ADGEN_API_KEY"


@dataclass
class Limits:
    """Caps on what one request may ask for; anything above is a 4xx, never a crash."""

    max_body_bytes: int = 1_000_000  # whole request body (413 above)
    max_prompt_chars: int = 16_000  # cheap check before tokenizing
    max_prompt_tokens: int = 2048  # rendered prompt, in the model's tokens
    max_tokens: int = 1024  # cap on max_tokens / max_completion_tokens
    default_max_tokens: int | None = None  # when a request gives none (None: sized from the tokenizer)
    max_n: int = 4  # choices per request
    max_stop: int = 4  # stop strings per request (OpenAI's own cap)
    max_queue: int = 256  # waiting requests; 429 above
    max_file_bytes: int = 100 * 1024 * 1024  # one upload to /v1/files (OpenAI: 200 MB)
    max_batch_lines: int = 50_000  # requests in one batch input file (OpenAI's cap)

    def validate(self) -> None:
        for name, value in vars(self).items():
            if value is None and name == "default_max_tokens":
                continue
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve limit {name} must be a positive integer, not {value!r}")
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens:
            raise ConfigError(
                f"default max_tokens ({self.default_max_tokens}) is above the max_tokens cap ({self.max_tokens})"
            )


@dataclass
class ServeSettings:
    model: str
    adapter: str | None = None  # the default adapter (PEFT name "default")
    adapter_name: str | None = None  # its name in /v1/models (None: "<model>+<adapter dir>")
    extra_adapters: dict[str, str] = field(default_factory=dict)  # further LoRA adapters: name -> path
    # a second, whole model served beside `model` (what a full / top-layers fine-tune started from): the compare
    # view's "before" and the API's base model id (adgen.serve.routing)
    base: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False  # allow a non-loopback bind without an API key
    cors_origins: list[str] = field(default_factory=list)  # CORS off when empty
    served_model_name: str | None = None
    device: str | None = "auto"
    dtype: str | None = "auto"
    batch_size: int = GENERATION_BATCH_SIZE  # requests decoding together (continuous batching's slots)
    continuous_batching: bool = True  # False: one job at a time (the baseline of bench/serve_load.py)
    # on a GPU: the share of its total memory the server may use (weights + KV cache + working memory);
    # the KV cache is sized from it at start (adgen.generation.kv_budget), as vLLM's setting of that name
    gpu_memory_utilization: float = 0.9
    ui: bool = True
    # the web UI's training page (runs `adgen train` processes on this machine, reads data paths on it): off for a
    # server whose UI users should only generate
    ui_training: bool = True
    vocab: str | None = None  # attribute vocabulary file for the faithfulness figures
    examples: str | None = None  # AdGen file whose contents become the UI's example products
    limits: Limits = field(default_factory=Limits)
    # uploaded files, batches and their finished rows (the Batch API); None: under the cache directory
    state_dir: str | None = None

    def validate(self) -> None:
        self.limits.validate()
        if self.base is not None and self.adapter is not None:
            # with an adapter the base model is already loaded (the adapter switched off): a second copy would
            # double the memory for the same comparison, and "the base" would name two models
            raise ConfigError("--base is for a whole fine-tuned model; with --adapter the base model is --model "
                              "itself (the adapter switched off): drop --base")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be a fraction in (0, 1], not {u!r} (e.g. 0.9)")

    def resolved_state_dir(self) -> Path:
        """Where the Batch API keeps its files: --state-dir, else $ADGEN_CACHE/serve (~/.cache/adgen/serve)."""
        if self.state_dir:
            return Path(self.state_dir)
        from adgen.models import cache_root  # (imports torch: not at the CLI's registration, which reads this module)

        return cache_root().parent / "serve"

    def resolved_api_key(self) -> str | None:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; every other name or address counts as exposed."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as public


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose the model beyond this machine without a key, unless explicitly told to."""
    if is_loopback(host) or api_key or insecure:
        return
    raise ConfigError(
        f"refusing to bind to {host} without an API key: anyone who can reach this address could use the model. "
        f"Set --api-key (or ${API_KEY_ENV}), bind to 127.0.0.1, or pass --insecure if this network is trusted"
    )
