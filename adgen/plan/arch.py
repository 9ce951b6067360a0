"""The model a recipe trains, as shapes: its architecture (no weights) and the method applied on the meta device.

`model_config(spec)` finds the architecture without downloading anything: the shipped config of
Llama-3-8B(-Instruct) for specs naming it, a local directory's config.json, a built-in alias (converted locally),
or a hub id already in the local Hugging Face cache. `model_shape(cfg)` builds the model with
`AutoModelForCausalLM.from_config` under `torch.device("meta")`, applies the recipe's method with the trainer's
own `apply_method` (PEFT works on meta tensors) and reads off the counts and shapes the memory estimate needs.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoConfig, AutoModelForCausalLM

from adgen.errors import ModelError
from adgen.models import resolve_model
from adgen.train.config import TrainConfig
from adgen.train.peft_setup import Precision, apply_method

# Meta's Llama-3-8B and -8B-Instruct share one architecture (same config.json but for the eos id).
_LLAMA3_8B = re.compile(r"(?i)(^|/)meta-llama-3-8b(-instruct)?$")
SHIPPED = {"llama3-8b-instruct": _LLAMA3_8B}


@dataclass
class LoraTarget:
    layer: int | None  # decoder layer index (None: outside the layers)
    name: str  # the module's own name: q_proj, down_proj, ...
    in_features: int
    r: int


@dataclass
class ModelShape:
    """What the estimate needs of the model: sizes, parameter counts, what trains where."""

    source: str  # where the architecture came from
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    parameters: int  # the base model's parameters (no adapter)
    trainable: int  # parameters that train (adapter / prefix / the weights themselves)
    total_with_adapter: int  # parameters + adapter parameters (PEFT's "all params")
    layer_linear_params: int  # weights of the linear layers inside the decoder layers (what NF4 quantizes)
    linear_params_outside: int  # other linear weights, the LM head excepted (bitsandbytes quantizes them too)
    embed_params: int
    head_params: int  # 0 when tied to the input embeddings
    largest_linear: int  # the largest linear weight (the dequantization buffer of a 4-bit layer)
    lora: list[LoraTarget] = field(default_factory=list)
    lowest_trained_layer: int = 0  # the backward pass stops here: layers below keep no activations
    trained_norms: bool = False  # full fine-tuning trains the norm weights too
    prefix_tokens: int = 0  # P-Tuning v2: trained key/value prefix per layer

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def grad_layers(self) -> int:
        """Decoder layers the backward pass runs through (top_layers: only those at and above the lowest trained)."""
        return max(0, self.layers - self.lowest_trained_layer)


def shipped_config_path(name: str) -> Path:
    return Path(str(resources.files("adgen") / "resources" / "models" / f"{name}.json"))


def shipped_name(spec: str) -> str | None:
    """The shipped architecture a model spec names (a hub id such as meta-llama/Meta-Llama-3-8B-Instruct)."""
    for name, pattern in SHIPPED.items():
        if pattern.search(str(spec).strip().rstrip("/")):
            return name
    return None


def model_config(spec: str, *, trust_remote_code: bool = False):
    """(transformers config, where it came from) for a model spec, offline."""
    name = shipped_name(spec)
    path = Path(str(spec)).expanduser()
    if name and not path.is_dir():
        return AutoConfig.from_pretrained(str(shipped_config_path(name))), f"shipped architecture {name}"
    resolved = resolve_model(str(spec))  # local dir as is; built-in / .gguf converted once, locally
    if resolved.kind != "hub":
        config_file = Path(resolved.path) / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{resolved.path} has no config.json: `adgen plan` needs the model's architecture")
        return AutoConfig.from_pretrained(str(resolved.path), trust_remote_code=trust_remote_code), str(config_file)
    try:  # a hub id: only what the local Hugging Face cache already holds (no download)
        return AutoConfig.from_pretrained(str(spec), local_files_only=True,
                                          trust_remote_code=trust_remote_code), f"{spec} (local HF cache)"
    except (OSError, ValueError):
        raise ModelError(
            f"no architecture for {spec!r} here: `adgen plan` works offline and knows "
            f"{', '.join(SHIPPED)} (meta-llama/Meta-Llama-3-8B-Instruct) itself; for another model set model= to a "
            "local directory holding its config.json (the weights are not needed), or download the config once "
            f"(huggingface-cli download {spec} config.json)"
        ) from None


def _short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def _meta_model(config, cfg: TrainConfig):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code,
                                                dtype=torch.bfloat16)


def _base_counts(model) -> dict:
    """Parameter counts of the bare model (before the method), by where they sit."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    head_w = getattr(head, "weight", None)
    tied = head_w is not None and embed is not None and head_w is embed.weight
    inside = outside = largest = 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or m is head:
            continue
        n = m.weight.numel()
        largest = max(largest, n)
        if _layer_index(name) is not None:
            inside += n
        else:
            outside += n
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layer_linear_params": inside, "linear_params_outside": outside, "largest_linear": largest,
        "embed_params": embed.weight.numel() if embed is not None else 0,
        "head_params": 0 if tied or head_w is None else head_w.numel(), "tied_embeddings": tied,
    }


def _method_config(cfg: TrainConfig) -> TrainConfig:
    """The recipe as the meta model can take it: PiSSA / OLoRA initialisations compute an SVD / QR of the
    weights, which meta tensors do not have; the adapter's shapes are those of a default LoRA of the same r."""
    meta_cfg = copy.deepcopy(cfg)
    meta_cfg.lora.init = "default"
    return meta_cfg


def _trained(model, cfg: TrainConfig) -> dict:
    """What the method trains: counts, LoRA targets, the lowest layer the gradient reaches."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targets, lowest = [], None
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and "default" in getattr(m, "r", {}):
            targets.append(LoraTarget(_layer_index(name), _short_name(name), int(m.in_features), int(m.r["default"])))
    for name, p in model.named_parameters():
        if p.requires_grad:
            idx = _layer_index(name)
            lowest = 0 if idx is None else (idx if lowest is None else min(lowest, idx))
    return {"trainable": trainable, "total_with_adapter": total, "lora": targets,
            "lowest_trained_layer": lowest or 0,
            "trained_norms": cfg.method == "full",
            "prefix_tokens": cfg.prefix.num_virtual_tokens if cfg.method == "prefix" else 0}


def model_shape(cfg: TrainConfig) -> ModelShape:
    """Build the recipe's model on the meta device, apply its method, and describe it."""
    config, source = model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = _meta_model(config, cfg)
    base = _base_counts(model)
    meta_cfg = _method_config(cfg)
    # Precision only steers dtypes, which meta tensors ignore; the counts are the trainer's own.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = _trained(apply_method(model, meta_cfg, Precision("bf16", "bfloat16", "bf16", "bfloat16")), cfg)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    return ModelShape(
        source=source, model_type=str(getattr(text, "model_type", "?")), layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size), intermediate=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
        heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads), vocab=int(text.vocab_size),
        **base, **trained,
    )


def config_summary(shape: ModelShape) -> dict:
    """The architecture's sizes for reports and JSON."""
    return {"model_type": shape.model_type, "layers": shape.layers, "hidden": shape.hidden,
            "intermediate": shape.intermediate, "heads": shape.heads, "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim, "vocab": shape.vocab, "source": shape.source}
