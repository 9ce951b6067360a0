"""The decode engine's KV cache: preallocated K/V for a fixed number of request slots.

KV layout (`SlotCache`): per layer one [slots, kv_heads, capacity, head_dim] tensor. Running requests
occupy slots 0..B-1 (a request that leaves is replaced by the last one, so the batch is always a
prefix of the slots and the cache a view, never a gather); request b's tokens sit at columns
0..len_b-1 and its new token is written at column len_b. The decode mask lets row b see columns
<= len_b. Nothing is copied per step except the new column -- `model.generate`'s dynamic cache
concatenates the whole cache every step.

Beside K/V the cache keeps, on the same device, each slot's token ids and length, so a decode step reads
its input ids and positions from the device and appends the chosen ids in place: nothing about the running
rows goes host -> device per step. A budgeted cache (`DecodeEngine(capacity=)`, adgen.generation.kv_budget)
is allocated once and never grown; a request it cannot hold fails with `CacheTooSmall`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from adgen.errors import AdgenError


class CacheTooSmall(AdgenError):
    """A request needs more KV cache per slot than a fixed-size (budgeted) cache holds."""


class SlotCache:
    """Preallocated K/V for `slots` requests of up to `capacity` tokens (see the module docstring).

    Beside K/V it keeps, on the same device, each slot's token ids (`tokens`: the prompt, then every
    token chosen, the next one to feed at column `lengths[slot]`) and its length (`lengths`: tokens in
    the KV cache). A decode step reads its input ids and positions from them and appends the chosen
    ids in place: nothing about the running rows goes host -> device per step.
    The model calls `update(k, v, layer_idx)` during a decode step with one new token per running row.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.tokens = torch.zeros((slots, capacity), dtype=torch.long, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.columns = torch.arange(capacity, device=device)  # for the masks, made once
        self.rows = torch.arange(slots, device=device)
        self.capacity = capacity
        self.width = 0  # columns the step's attention looks at (max length + 1)
        self.is_compileable = False

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.tokens))

    def put(self, slot: int, layer_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int = 0) -> None:
        """Write a prefilled sequence ([1, kv_heads, n, head_dim] per layer) at columns start..start+n-1."""
        for layer, (k, v) in enumerate(layer_kv):
            n = k.shape[-2]
            self.keys[layer][slot, :, start : start + n] = k[0]
            self.values[layer][slot, :, start : start + n] = v[0]

    def set_prompt(self, slot: int, prompt: torch.Tensor) -> None:
        """A new request's prompt ids ([n], on this device) into `slot`, its length n."""
        n = prompt.shape[0]
        self.tokens[slot, :n] = prompt
        self.lengths[slot] = n

    def grown(self, capacity: int) -> "SlotCache":
        """A larger cache holding this one's contents (a request longer than any before joined)."""
        k0 = self.keys[0]
        bigger = SlotCache(len(self.keys), k0.shape[0], k0.shape[1], k0.shape[3], capacity, k0.dtype, k0.device)
        for layer in range(len(self.keys)):
            bigger.keys[layer][:, :, : self.capacity] = self.keys[layer]
            bigger.values[layer][:, :, : self.capacity] = self.values[layer]
        bigger.tokens[:, : self.capacity] = self.tokens
        bigger.lengths.copy_(self.lengths)
        return bigger

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot `src`'s request into slot `dst`: its `length` cached tokens and the token it feeds next."""
        for layer in range(len(self.keys)):
            self.keys[layer][dst, :, :length] = self.keys[layer][src, :, :length]
            self.values[layer][dst, :, :length] = self.values[layer][src, :, :length]
        self.tokens[dst, : length + 1] = self.tokens[src, : length + 1]
        self.lengths[dst] = self.lengths[src]

    # what the model calls
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rows = key_states.shape[0]
        index, positions = self.rows[:rows], self.lengths[:rows]
        self.keys[layer_idx][index, :, positions] = key_states[:, :, 0]
        self.values[layer_idx][index, :, positions] = value_states[:, :, 0]
        return self.keys[layer_idx][:rows, :, : self.width], self.values[layer_idx][:rows, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def __len__(self) -> int:
        return len(self.keys)


def cache_dtype(model) -> torch.dtype:
    """The KV cache's dtype: the model's floating-point parameters' (fp32 for an all-integer model)."""
    param = next(model.parameters())
    return param.dtype if param.is_floating_point() else torch.float32
