"""How many requests' KV cache fit on the GPU: the serving engine's budget, and `adgen plan`'s arithmetic.

The decode engine keeps K and V of every running request in one preallocated cache of
`slots x capacity` tokens (adgen.generation.slot_cache.SlotCache). On a GPU that cache is sized once, at
start, from the memory left beside the weights (`torch.cuda.mem_get_info`), the way vLLM's
`--gpu-memory-utilization` does: the server may use that fraction of the card's *total* memory; what
is already used (weights, CUDA context, other processes) and a step's working memory are taken off,
and the rest holds as many slots of `max_len` tokens as fit (at most `max_slots`). Requests beyond the
slots wait in the queue; the cache never grows, so it never runs out of memory mid-request.

Pure arithmetic here (no torch import at module level), so a planning command imports it without
the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
# allocator fragmentation, cuBLAS / SDPA workspaces, the odd temporary: kept free beside the estimate
SLACK_BYTES = 512 * 1024**2
TOKEN_ID_BYTES = 8  # the engine keeps each slot's token ids on the device too (int64)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _element_size(dtype) -> int:
    """Bytes per element of a torch dtype (or of its name: "bfloat16", "float32", ...)."""
    if isinstance(dtype, str):
        import torch  # only for a dtype given by name: this module stays importable without torch (module docstring)

        dtype = getattr(torch, dtype.replace("torch.", ""))
    return int(dtype.itemsize)


def kv_shape(config) -> tuple[int, int, int] | None:
    """(layers, kv_heads, head_dim) of a transformers model config; None when it does not say."""
    c = _text_config(config)
    layers = getattr(c, "num_hidden_layers", None)
    heads = getattr(c, "num_attention_heads", None)
    hidden = getattr(c, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return int(layers), int(kv), int(head_dim)


def kv_bytes_per_token(config, dtype) -> int:
    """K and V of one token over all layers: 2 x layers x kv_heads x head_dim x bytes per element.

    Llama-3-8B in bf16: 2 x 32 x 8 x 128 x 2 = 131072 (128 KiB)."""
    shape = kv_shape(config)
    if shape is None:
        raise ValueError("the model config names no num_hidden_layers / num_attention_heads / hidden_size")
    return kv_bytes(*shape, _element_size(dtype))


def kv_bytes(layers: int, kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """The one formula (the engine's cache and `adgen plan` both use it): K and V x layers x kv heads x head dim."""
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * int(element_bytes)


def plan_kv_cache(free_bytes: int, bytes_per_token: int, max_len: int, max_slots: int) -> tuple[int, int]:
    """(slots, capacity): how many requests of up to `max_len` tokens fit in `free_bytes` (at most
    `max_slots`), each slot holding `capacity` = `max_len` tokens. slots == 0: not even one fits.

    Every slot gets the whole `max_len`: a request may use all of it (prompt + max_tokens), and a slot
    with less room would leave such a request waiting for ever."""
    if bytes_per_token <= 0 or max_len <= 0 or max_slots <= 0:
        raise ValueError("bytes_per_token, max_len and max_slots must be positive")
    fit = max(0, int(free_bytes)) // (bytes_per_token * max_len)
    return int(min(max_slots, fit)), int(max_len)


def step_workspace_bytes(config, dtype, max_prompt_tokens: int, slots: int) -> int:
    """A conservative estimate of what one engine step needs beside weights and the KV cache.

    - a prefill of the longest prompt: hidden states, q/k/v, the MLP's gate/up/intermediate, the
      attention scores (when SDPA falls back to its math kernel with a mask), and the prompt's own KV
      twice (the prefill's cache, then its copy into a slot or the prefix cache);
    - a decode step's logits over the vocabulary for every slot: the model's, their float32 copy and
      the probabilities;
    - `SLACK_BYTES` for the allocator and the kernels' workspaces."""
    c = _text_config(config)
    elem = _element_size(dtype)
    hidden = int(getattr(c, "hidden_size", 0) or 0)
    inter = int(getattr(c, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(c, "num_attention_heads", 0) or 1)
    vocab = int(getattr(c, "vocab_size", 0) or 0)
    n = int(max_prompt_tokens)
    activations = n * (4 * hidden + 3 * inter) * elem + heads * n * n * 4
    prompt_kv = 2 * n * kv_bytes_per_token(config, dtype)
    logits = int(slots) * vocab * (elem + 4 + 4)
    return activations + prompt_kv + logits + SLACK_BYTES


@dataclass(frozen=True)
class KVPlan:
    """The serving cache chosen at start: `slots` requests of up to `capacity` tokens each."""

    slots: int
    capacity: int
    bytes_per_token: int
    budget_bytes: int  # what the cache may take (after weights, other use and a step's working memory)
    utilization: float

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.capacity * self.bytes_per_token

    def describe(self) -> str:
        return (f"KV cache {self.slots} slots x {self.capacity} tokens = {self.slots * self.capacity} tokens, "
                f"{self.cache_bytes / GIB:.2f} GiB (budget {self.budget_bytes / GIB:.2f} GiB under "
                f"--gpu-memory-utilization {self.utilization:g})")


def plan_for_gpu(config, dtype, *, free_bytes: int, total_bytes: int, utilization: float, max_prompt_tokens: int,
                 max_len: int, max_slots: int) -> KVPlan:
    """The serving plan from a card's free / total memory (what `torch.cuda.mem_get_info` says after the
    weights are loaded): `utilization` x total is the server's share; what is in use already and a step's
    working memory come off it; the rest is the KV cache's."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], not {utilization}")
    used = int(total_bytes) - int(free_bytes)
    workspace = step_workspace_bytes(config, dtype, max_prompt_tokens, max_slots)
    budget = max(0, int(total_bytes * utilization) - used - workspace)
    per_token = kv_bytes_per_token(config, dtype) + TOKEN_ID_BYTES
    slots, capacity = plan_kv_cache(budget, per_token, max_len, max_slots)
    return KVPlan(slots, capacity, per_token, budget, float(utilization))
