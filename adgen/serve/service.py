"""What the API and the web UI share: the loaded model (and the `--base` model), its names, prompt building and checks.

`ServeState.load(settings)` loads the generator(s) once; `ServeState(generator, settings)` wraps one
that is already loaded (tests, notebooks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adgen.errors import ConfigError, ModelError
from adgen.generation.config import DecodingConfig, DecodingFieldError
from adgen.generation.decoding_fields import field_named
from adgen.serve.decoding_schema import DecodingRequest
from adgen.serve.jobs import RawPrompt, encode_prompt
from adgen.serve.live_adapters import ForwardGate, can_load_adapters, load_adapter_live
from adgen.serve.routing import ModelRouter, first_of_two_utilization
from adgen.serve.scheduler import Scheduler
from adgen.serve.security import ApiError
from adgen.serve.settings import Limits, ServeSettings

log = logging.getLogger(__name__)

STYLE_HINT = "文案风格：{style}。"
LENGTH_HINT = "篇幅约{length}字。"


def display_name(spec: str | None) -> str | None:
    """A model/adapter name that is safe to show: the last path component, never a full path."""
    if spec is None:
        return None
    s = str(spec).rstrip("/\\")
    p = Path(s)
    if p.exists() or s.startswith((".", "/", "~")):
        return p.name or s
    return s  # built-in alias or hub id


def served_name(settings: ServeSettings) -> str:
    """The served model's name: --served-model-name, else its directory's or alias's name."""
    return settings.served_model_name or display_name(settings.model) or "model"


def base_model_id(settings: ServeSettings) -> str:
    """The `--base` model's id in /v1/models and the `model` field; never the served model's."""
    base_id = display_name(settings.base) or "base"
    if base_id == served_name(settings):
        raise ConfigError(f"--model and --base are both named '{base_id}' on this server: pass --served-model-name "
                          f"to tell them apart")
    return base_id


class ServeState:
    def __init__(self, generator, settings: ServeSettings, *, base_generator=None, vocab=None,
                 examples: list[str] | None = None) -> None:
        """`base_generator`: the `--base` model, served beside `generator` under its own id (adgen.serve.routing)."""
        settings.validate()
        self.generator = generator
        self.base_generator = base_generator
        self.settings = settings
        self.limits: Limits = settings.limits
        self.started = time.time()
        from adgen.serve.metrics import ServeMetrics

        self.metrics = ServeMetrics()
        self.model_name = served_name(settings)
        self.base_id = base_model_id(settings) if base_generator is not None else self.model_name
        self.adapter_name = settings.adapter_name or display_name(settings.adapter)
        base = self.model_name
        self.model_id = (settings.adapter_name or f"{base}+{self.adapter_name}") if self.adapter_name else base
        self.extra_adapters = list(settings.extra_adapters)  # further LoRA adapters, served by name
        # adapters loaded while serving (the training page's result) wait for the running forward to end
        self.adapter_gate = ForwardGate(generator.model) if can_load_adapters(generator) else None
        self.training = None  # the web UI's training runs (adgen.serve.training_jobs.TrainingJobs; server.build)
        self.scheduler = self._schedulers(generator, base_generator)
        self.metrics.watch(self.scheduler)
        self._vocab = vocab
        self.examples = examples if examples is not None else load_examples(settings.examples)

    def _schedulers(self, generator, base_generator) -> ModelRouter:
        """One scheduler per model; with a base model on the same GPU the two KV caches share the budget."""
        settings = self.settings

        def scheduler(gen, utilization: float) -> Scheduler:
            return Scheduler(gen, max_queue=settings.limits.max_queue, max_batch=settings.batch_size,
                             continuous=settings.continuous_batching, metrics=self.metrics, limits=settings.limits,
                             gpu_memory_utilization=utilization)

        utilization = settings.gpu_memory_utilization
        if base_generator is None:
            return ModelRouter(scheduler(generator, utilization))
        tuned = scheduler(generator, first_of_two_utilization(utilization, generator.device))
        try:
            return ModelRouter(tuned, scheduler(base_generator, utilization))
        except BaseException:  # e.g. no room left for the base model's KV cache: stop the first worker too
            tuned.close()
            raise

    @classmethod
    def load(cls, settings: ServeSettings) -> "ServeState":
        from adgen.generation import load_generator

        settings.validate()  # refused settings load nothing
        if settings.base is not None:
            base_model_id(settings)  # a name clash too

        def load(spec: str, adapter: str | None = None):
            return load_generator(spec, adapter=adapter, backend="hf", dtype=settings.dtype, device=settings.device,
                                  batch_size=settings.batch_size)

        generator = load(settings.model, settings.adapter)
        for name, path in settings.extra_adapters.items():
            load_named_adapter(generator, name, path)
        base_generator = load(settings.base) if settings.base is not None else None
        state = cls(generator, settings, base_generator=base_generator)
        _ = state.vocab  # load it now: a bad --vocab file is a startup error, not a failed request
        return state

    def close(self) -> None:
        if self.training is not None:
            self.training.close()  # a running training checkpoints and stops
        self.scheduler.close()

    # ---- names --------------------------------------------------------------------------------
    @property
    def has_adapter(self) -> bool:
        return self.adapter_name is not None

    @property
    def has_base_model(self) -> bool:
        """A second, whole model (`--base`) answers for the base id, rather than the adapter switched off."""
        return self.base_generator is not None

    @property
    def can_compare(self) -> bool:
        return self.has_base_model or self.scheduler.tuned.can_disable_adapter

    def add_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter at `path` as `name` from now on (loaded between two forwards; running requests
        go on)."""
        load_adapter_live(self.generator, self.adapter_gate, name, path)
        self.extra_adapters.append(name)

    def tuned_ids(self) -> list[str]:
        """The ids a request may name for the served model with an adapter on (the default one first)."""
        return [self.model_id, *self.extra_adapters]

    def model_ids(self) -> list[str]:
        return self.tuned_ids() + ([self.base_id] if self.can_compare else [])

    def use_adapter_for(self, model: str | None) -> bool | str:
        """The `model` field picks the default adapter (the served id: True), a further adapter (its name)
        or none (the base id: False). Never a path."""
        if model is None or model == self.model_id:
            return True
        if model in self.extra_adapters:
            return model
        if self.can_compare and model == self.base_id:
            return False
        raise ApiError(
            404,
            f"the model '{model}' does not exist on this server; available: {', '.join(self.model_ids())}",
            param="model",
            code="model_not_found",
        )

    def id_for(self, use_adapter: bool | str) -> str:
        """The model id of what `use_adapter_for` chose."""
        if isinstance(use_adapter, str):
            return use_adapter
        return self.model_id if use_adapter else self.base_id

    def adapter_of(self, model_id: str) -> str | None:
        if model_id == self.model_id:
            return self.adapter_name
        return model_id if model_id in self.extra_adapters else None

    def health(self) -> dict[str, Any]:
        gen = self.generator
        try:
            device = str(gen.device)
        except Exception:
            device = "unknown"
        health = {
            "status": "ok",
            "model": self.model_name,
            "adapter": self.adapter_name,
            "model_id": self.model_id,
            "device": device,
            "backend": gen.backend,
            "uptime_s": round(time.time() - self.started, 3),
            **self.scheduler.stats(),
        }
        if self.scheduler.base is not None:  # the --base model's own queue and counters
            health["base_model"] = {"model_id": self.base_id, **self.scheduler.base.stats()}
        return health

    # ---- prompts ------------------------------------------------------------------------------
    def adcopy_messages(self, content: str, style: str | None = None, length: int | None = None) -> list[dict]:
        """The training-time prompt (system + attributes), with optional style / length hints
        appended to the system turn so the user turn stays exactly what the model was tuned on."""
        messages = self.generator.formatter.messages(content)
        hints = ""
        if style and style.strip():
            hints += STYLE_HINT.format(style=style.strip())
        if length:
            hints += LENGTH_HINT.format(length=int(length))
        if hints:
            if messages and messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": messages[0]["content"] + hints}
            else:
                messages.insert(0, {"role": "system", "content": hints})
        return messages

    def check_prompt(self, prompt: list[dict] | RawPrompt, param: str = "messages") -> int:
        """Prompt length in tokens (chat messages, or raw text); 400 above the caps (characters first: cheap,
        before tokenizing)."""
        chars = len(prompt.text) if isinstance(prompt, RawPrompt) else sum(len(m.get("content") or "") for m in prompt)
        _check_length(chars, self.limits.max_prompt_chars, "characters", param)
        try:
            n = len(encode_prompt(self.generator, prompt))
        except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
            raise ApiError(400, f"the chat template cannot render these messages: {e}", param=param) from None
        _check_length(n, self.limits.max_prompt_tokens, "tokens", param)
        return n

    @property
    def default_max_tokens(self) -> int:
        """max_tokens of a request that names none: the server's setting, else sized from the tokenizer."""
        if self.limits.default_max_tokens is not None:
            return self.limits.default_max_tokens
        return min(self.generator.resolve(DecodingConfig()).max_new_tokens, self.limits.max_tokens)

    def decoding_config(self, req: DecodingRequest, n: int = 1) -> DecodingConfig:
        """A DecodingConfig from the request's decoding fields, within the server's caps; a value that
        `DecodingConfig.validate()` refuses is a 400 naming the request's field."""
        lim = self.limits
        max_tokens = req.requested_max_tokens()
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens > lim.max_tokens:
            raise ApiError(
                400, f"{param} is {max_tokens}; this server allows at most {lim.max_tokens}", param=param,
                code="max_tokens_too_large",
            )
        if n > lim.max_n:
            raise ApiError(400, f"n is {n}; this server allows at most {lim.max_n}", param="n", code="n_too_large")
        if len(req.stop_list()) > lim.max_stop:
            raise ApiError(400, f"at most {lim.max_stop} stop strings are allowed", param="stop")
        values = req.decoding_values()
        values.setdefault("max_new_tokens", self.default_max_tokens)
        try:
            return DecodingConfig(**values)
        except DecodingFieldError as e:
            raise ApiError(400, str(e), param=field_named(e.field).api_name, code="invalid_value") from None

    # ---- attributes and figures ---------------------------------------------------------------
    @staticmethod
    def content_of(attributes: Any) -> tuple[str, list[tuple[str, str]]]:
        """AdGen content string and pairs from a mapping, a list of [key, value] pairs or a string."""
        from adgen.data.attributes import format_attributes, parse_attributes

        try:
            if isinstance(attributes, str):
                pairs = parse_attributes(attributes)
            elif isinstance(attributes, Mapping):
                if not attributes or any(isinstance(v, list) and not v for v in attributes.values()):
                    raise ValueError("every attribute needs at least one value")
                pairs = parse_attributes(format_attributes(attributes))
            else:
                pairs = parse_attributes(format_attributes([(k, v) for k, v in attributes]))
        except ValueError as e:
            raise ApiError(400, f"invalid attributes: {e}", param="attributes", code="invalid_value") from None
        return format_attributes(pairs), pairs

    @property
    def vocab(self):
        if self._vocab is None:
            from adgen.metrics import AttributeVocab

            self._vocab = AttributeVocab.load(self.settings.vocab) if self.settings.vocab else AttributeVocab.default()
        return self._vocab

    def figures(self, pairs: list[tuple[str, str]], text: str) -> dict[str, Any]:
        """Faithfulness (coverage, contradictions, hallucinated values) and surface statistics."""
        from adgen.metrics import faithfulness, text_stats

        out = dict(faithfulness(pairs, text, self.vocab))
        stats = text_stats(text)
        for key in ("chinese_share", "repetition_rate", "length_chars"):
            if key in stats:
                out[key] = stats[key]
        return out


def _check_length(n: int, limit: int, unit: str, param: str) -> None:
    if n > limit:
        raise ApiError(400, f"the prompt is {n} {unit} long; this server accepts at most {limit}", param=param,
                       code="context_length_exceeded")


def load_named_adapter(generator, name: str, path: str) -> None:
    """Load a further LoRA adapter next to the default one (`--adapter NAME=PATH`)."""
    model = generator.model
    if not hasattr(model, "load_adapter") or generator.adapter is None:
        raise ConfigError("further adapters need a first (default) one: --adapter PATH --adapter NAME=PATH")
    if name in ("default", "__base__") or name in getattr(model, "peft_config", {}):
        raise ConfigError(f"adapter name '{name}' is taken: pick another (--adapter NAME=PATH)")
    if not (Path(path) / "adapter_config.json").is_file():
        raise ModelError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    model.load_adapter(str(path), adapter_name=name)
    model.set_adapter("default")  # requests without a name keep the first adapter


def load_examples(path: str | None, limit: int = 12) -> list[str]:
    """Example products for the UI: the built-in AdGen dev contents, or the first ones of a file."""
    if path is None:
        from adgen.serve.examples import EXAMPLE_CONTENTS

        return list(EXAMPLE_CONTENTS)
    from adgen.data.records import read_records

    data = read_records(path, on_error="skip", require_summary=False)
    seen: dict[str, None] = {}
    for rec in data.records:
        seen.setdefault(rec.content, None)
        if len(seen) >= limit:
            break
    return list(seen)
