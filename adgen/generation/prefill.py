"""Prompt prefill for the decode engine: the prompt's KV and its first-token logits, with a shared-prefix cache.

Prefix cache (`PrefixCache`): the prompts of a task share their start (chat header + system prompt:
~140 of SmolLM2's ~255 prompt tokens). Its KV is computed once and copied into each request's slot;
only the rest of the prompt is prefilled. Found by comparing each prompt with the previous one (any
shared start of >= `min_prefix` tokens), so it also serves chats with a shared history. One prefix cache
per adapter: the same tokens have other keys / values under another adapter.

Batched prefill (`Prefiller.prefill_together`): the requests admitted in one step are prefilled together, one
forward per (cached prefix length, adapter) group -- typically one, as they share the system prompt. Suffixes
right-padded to the longest, positions continuing after the prefix, a 4D mask (each row sees its own prefix copy
and its own earlier tokens, never a pad), each row's logits at its own last real token. An error of that forward
prefills its requests one at a time (a request that cannot run fails alone).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Sequence

import torch
from transformers import DynamicCache

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [rows, kv_heads, n, head_dim]


class PrefixCache:
    """KV of shared prompt starts, computed once; the few most recently used are kept."""

    def __init__(self, min_prefix: int = 16, max_entries: int = 4) -> None:
        self.min_prefix = min_prefix
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[int, ...], LayerKV] = OrderedDict()
        self._previous: list[int] | None = None

    def lookup(self, prompt: Sequence[int]) -> tuple[int, LayerKV | None]:
        """(length, per-layer KV) of the longest cached prefix of `prompt` that leaves >= 1 token to run."""
        best: tuple[int, ...] | None = None
        for key in self.entries:
            if len(key) < len(prompt) and (best is None or len(key) > len(best)) and tuple(prompt[: len(key)]) == key:
                best = key
        if best is None:
            return 0, None
        self.entries.move_to_end(best)
        return len(best), self.entries[best]

    def candidate(self, prompt: Sequence[int]) -> tuple[int, ...] | None:
        """A new prefix worth caching: this prompt's shared start with the previous prompt."""
        previous, self._previous = self._previous, list(prompt)
        if previous is None:
            return None
        n, limit = 0, min(len(previous), len(prompt)) - 1
        while n < limit and previous[n] == prompt[n]:
            n += 1
        key = tuple(prompt[:n])
        return key if n >= self.min_prefix and key not in self.entries else None

    def add(self, key: tuple[int, ...], layer_kv: LayerKV) -> None:
        self.entries[key] = layer_kv
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


# A prefill's outcome for one prompt: its last position's logits [V] (fp32) and its per-layer KV, or the error
# that request failed with.
Prefilled = tuple[torch.Tensor, LayerKV]


class Prefiller:
    """Runs prompts through the model into KV (after whatever prefix is cached) for one engine."""

    def __init__(self, model, prefix_cache: PrefixCache | None = None) -> None:
        self.model = model
        self.cache_kw = cache_kwarg(model)
        self._prefix_caches: dict[str | None, PrefixCache] = {None: prefix_cache if prefix_cache is not None else PrefixCache()}
        self.tokens = 0  # prompt tokens computed (the prefix cache's share is not)

    @property
    def prefix_cache(self) -> PrefixCache:
        return self._prefix_caches[None]

    def prefix_cache_for(self, adapter: str | None) -> PrefixCache:
        cache = self._prefix_caches.get(adapter)
        if cache is None:
            cache = self._prefix_caches[adapter] = PrefixCache(self.prefix_cache.min_prefix, self.prefix_cache.max_entries)
        return cache

    def prefill(self, ids: Sequence[int], ids_t: torch.Tensor, adapter: str | None) -> Prefilled:
        """(last-position logits [V], per-layer KV [(k, v)] of the whole prompt); `ids_t`: `ids` on the device."""
        self.plan_prefix(ids, ids_t, adapter)
        n, kv = self.prefix_cache_for(adapter).lookup(ids)
        return self.forward(ids_t[n:], n, kv, adapter)

    def plan_prefix(self, ids: Sequence[int], ids_t: torch.Tensor, adapter: str | None) -> None:
        """A start this prompt shares with the previous one: computed once (after what is cached), kept for the
        next prompts (the prefix cache's part of a prefill)."""
        prefixes = self.prefix_cache_for(adapter)
        n, kv = prefixes.lookup(ids)
        key = prefixes.candidate(ids)
        if key is not None and len(key) >= n + prefixes.min_prefix:
            _, kv = self.forward(ids_t[n : len(key)], n, kv, adapter)
            prefixes.add(key, kv)

    def prefill_together(self, prompts: Sequence[tuple[Sequence[int], torch.Tensor, str | None]]
                         ) -> list[Prefilled | BaseException]:
        """Prefill several prompts ((ids, ids on the device, adapter), each already through `plan_prefix`) with
        one forward per (cached prefix length, adapter) group; each prompt's outcome, in the order given. When a
        group's forward fails, its prompts run one at a time: a prompt that cannot run fails alone."""
        lookups = [self.prefix_cache_for(adapter).lookup(ids) for ids, _, adapter in prompts]
        groups: dict[tuple[int, str | None], list[int]] = {}
        for i, ((n, _), (_, _, adapter)) in enumerate(zip(lookups, prompts)):
            groups.setdefault((n, adapter), []).append(i)
        results: list[Prefilled | BaseException | None] = [None] * len(prompts)
        for (n, adapter), members in groups.items():
            try:
                rows = self.forward_rows([prompts[i][1][n:] for i in members], n, [lookups[i][1] for i in members], adapter)
                for i, row in zip(members, rows):
                    results[i] = row
            except Exception:  # the group's forward: each of its prompts on its own
                for i in members:
                    try:
                        results[i] = self.forward(prompts[i][1][n:], n, lookups[i][1], adapter)
                    except Exception as e:
                        results[i] = e
        return results  # type: ignore[return-value]

    def forward(self, ids: torch.Tensor, start: int, prefix_kv: LayerKV | None, adapter: str | None) -> Prefilled:
        """Run `ids` ([n] on the device, positions start..) after `prefix_kv` (None: from scratch):
        (last logits, KV of all)."""
        device = ids.device
        cache = DynamicCache()
        for layer, (k, v) in enumerate(prefix_kv or ()):
            cache.update(k, v, layer)  # concatenates into new tensors: the cached prefix stays as it was
        n = ids.shape[0]
        kwargs = adapter_kwargs(self.model, [adapter])
        if start:  # an explicit mask: the new tokens see the whole prefix, then causally each other
            # (left to itself, an attention could treat q_len != kv_len as top-left-aligned causal)
            visible = torch.arange(start + n, device=device).unsqueeze(0) <= torch.arange(start, start + n, device=device).unsqueeze(1)
            kwargs["attention_mask"] = visible[None, None]
        out = self.model(input_ids=ids.unsqueeze(0),
                         position_ids=torch.arange(start, start + n, device=device).unsqueeze(0),
                         use_cache=True, logits_to_keep=1, **kwargs, **{self.cache_kw: cache})
        self.tokens += n
        return out.logits[0, -1].float(), layer_kv(out_cache(out))

    def forward_rows(self, suffixes: list[torch.Tensor], start: int, prefix_kvs: list, adapter: str | None
                     ) -> list[Prefilled]:
        """`forward` for several prompts at once: row r runs `suffixes[r]` (positions start..) after its
        own `prefix_kvs[r]` (all of length `start`; None when start is 0). The suffixes are right-padded to
        the longest; the 4D mask lets each real token see its row's prefix and its own earlier tokens, never
        a pad. [(last real position's logits [V], per-layer KV of the row's prefix + real tokens)]."""
        device = suffixes[0].device
        rows, lengths = len(suffixes), [s.shape[0] for s in suffixes]
        width = max(lengths)
        ids = torch.nn.utils.rnn.pad_sequence(suffixes, batch_first=True)  # right-padded with id 0, never seen
        cache = DynamicCache()
        if start:
            for layer in range(len(prefix_kvs[0])):
                cache.update(torch.cat([kv[layer][0] for kv in prefix_kvs]),
                             torch.cat([kv[layer][1] for kv in prefix_kvs]), layer)
        length_t = torch.tensor(lengths, dtype=torch.long, device=device)
        query = torch.arange(width, device=device)
        column = torch.arange(start + width, device=device) - start  # < 0: the prefix
        # [rows, 1, width, start + width]: prefix columns, then own real tokens up to the query's position
        visible = (column[None, None, :] <= query[None, :, None]) & (column[None, None, :] < length_t[:, None, None])
        last = sorted(set(n - 1 for n in lengths))
        out = self.model(input_ids=ids, position_ids=(start + query).unsqueeze(0).expand(rows, -1),
                         attention_mask=visible[:, None], use_cache=True,
                         logits_to_keep=torch.tensor(last, dtype=torch.long, device=device),
                         **adapter_kwargs(self.model, [adapter] * rows), **{self.cache_kw: cache})
        self.tokens += sum(lengths)
        kv = layer_kv(out_cache(out))
        logits = out.logits
        # a forward that ignores `logits_to_keep` (remote code taking **kwargs) gives every position
        column_of = (lambda n: last.index(n - 1)) if logits.shape[1] == len(last) else (lambda n: n - 1)
        return [(logits[r, column_of(n)].float(), [(k[r : r + 1, :, : start + n], v[r : r + 1, :, : start + n])
                                                    for k, v in kv])
                for r, n in enumerate(lengths)]


def adapter_kwargs(model, adapters: Sequence[str | None]) -> dict:
    """PEFT's per-row adapter choice, when some row asks for one (else the model's active adapter runs)."""
    if all(a is None for a in adapters):
        return {}
    active = getattr(model, "active_adapter", None)
    return {"adapter_names": [a if a is not None else active for a in adapters]}


def cache_kwarg(model) -> str:
    """transformers >= 5.x names the forward's cache argument `cache` (`past_key_values` before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def layer_kv(cache) -> LayerKV:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v in cache]  # older tuple-style caches
