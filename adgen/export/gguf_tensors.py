"""How a Llama's tensors are laid out in a GGUF file, as llama.cpp's converter lays them out: names, the q/k
rotary permutation, Llama-3.1 rope factors, and each tensor's stored type (F32 / F16 / Q8_0) and bytes.

`plan_tensors` lists what `adgen.export.gguf.export_gguf` writes, in order, each with a loader that converts
one tensor when the writer needs it (so memory stays at the model plus one converted tensor).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from adgen.errors import AdgenError

log = logging.getLogger(__name__)

Quant = Literal["f16", "q8_0"]

# Hugging Face name (inside model.layers.N.) -> llama.cpp name (inside blk.N.)
_LAYER_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def rope_type(config) -> str:
    """The config's rope scaling type: "default", "linear", "llama3", ..."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type") or params.get("type") or "default")


def rope_params(config) -> dict:
    """rope_theta, factor, ... from either of transformers' spellings (rope_scaling, rope_parameters)."""
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.update(getattr(config, "rope_parameters", None) or {})
    return params


def rope_permute(w, n_head: int):
    """Rows of a q/k projection from HF's rotate-half order to llama.cpp's interleaved pairs, per head."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _llama3_rope_factors(config, head_dim: int):
    """Per-frequency divisors for Llama-3.1-style rope scaling (llama.cpp's rope_freqs.weight)."""
    p = rope_params(config)
    base = float(p.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / head_dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[], Any]  # -> np.ndarray (float32), already permuted


def _gguf_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_TENSORS:
        return f"blk.{parts[2]}.{_LAYER_TENSORS[parts[3]]}"
    return None


def plan_tensors(model, quant: Quant) -> list[TensorPlan]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # llama.cpp's package: only where GGUF is written

    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    plans: list[TensorPlan] = []
    unknown = []
    matrix_type = GGMLQuantizationType.Q8_0 if quant == "q8_0" else GGMLQuantizationType.F16
    block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]

    def order(hf_name: str) -> tuple:
        parts = hf_name.split(".")
        if hf_name == "model.embed_tokens.weight":
            return (0, 0, 0)
        if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
            rest = ".".join(parts[3:])
            return (1, int(parts[2]), list(_LAYER_TENSORS).index(rest) if rest in _LAYER_TENSORS else 99)
        return (2, 0, 0 if hf_name == "model.norm.weight" else 1)

    for hf_name in sorted(state, key=order):
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd.weight when output.weight is absent
        name = _gguf_name(hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        tensor = state[hf_name]
        shape = tuple(tensor.shape)
        if len(shape) == 1:
            qtype = GGMLQuantizationType.F32
        elif matrix_type == GGMLQuantizationType.Q8_0 and shape[-1] % block != 0:
            log.warning("%s: rows of %d values do not fill Q8_0 blocks of %d; writing it as F16", name, shape[-1], block)
            qtype = GGMLQuantizationType.F16
        else:
            qtype = matrix_type
        heads = n_head if name.endswith("attn_q.weight") else n_kv if name.endswith("attn_k.weight") else None

        def load(t=tensor, heads=heads):
            arr = t.detach().to("cpu").float().numpy()
            return np.ascontiguousarray(rope_permute(arr, heads) if heads else arr)

        plans.append(TensorPlan(name, shape, qtype, load))
    if unknown:
        raise AdgenError(
            f"GGUF export: the model has tensors a plain Llama has not ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}); convert the merged model with llama.cpp's convert_hf_to_gguf.py"
        )
    if rope_type(config) == "llama3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
        factors = _llama3_rope_factors(config, head_dim)
        plans.append(TensorPlan("rope_freqs.weight", factors.shape, GGMLQuantizationType.F32, lambda f=factors: f))
    return plans


def encode_tensor(arr, qtype):
    # llama.cpp's package: only where GGUF is written
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return quantize(arr, qtype)


def tensor_nbytes(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], int]:
    """(shape as the writer wants it, bytes) for a tensor of logical `shape` stored as `qtype`."""
    # llama.cpp's package: only where GGUF is written
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    n = math.prod(shape)
    if qtype == GGMLQuantizationType.F32:
        return shape, 4 * n
    if qtype == GGMLQuantizationType.F16:
        return shape, 2 * n
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, math.prod(byte_shape)
