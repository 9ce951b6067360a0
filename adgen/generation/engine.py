"""Continuous batching over a preallocated KV cache, with a shared-prefix cache.

`DecodeEngine.run(requests)` keeps up to `slots` requests decoding together: each decode step runs the
model once for every running request (one new token each), a request that ends leaves at once and a
waiting one takes its slot before the next step. A `generate()` call whose outputs have different
lengths therefore never spends steps on rows that already ended (left-padded `model.generate` batches
do, until their longest row ends).

Why our own loop and not transformers' continuous batching (`generate_batch` / `ContinuousBatchingManager`):
that manager takes one generation config for all requests and no per-request logits processors, and
the character-level repetition control keeps state per request (`RepeatState`); requests here also
differ in sampling settings, stop strings and limits. The loop stays small because the model does the
work: its own forward, given a cache object and a 4D mask.

KV layout (`SlotCache`): per layer one [slots, kv_heads, capacity, head_dim] tensor. Running requests
occupy slots 0..B-1 (a request that leaves is replaced by the last one, so the batch is always a
prefix of the slots and the cache a view, never a gather); request b's tokens sit at columns
0..len_b-1 and its new token is written at column len_b. The decode mask lets row b see columns
<= len_b. Nothing is copied per step except the new column -- `model.generate`'s dynamic cache
concatenates the whole cache every step.

Prefix cache (`PrefixCache`): the prompts of a task share their start (chat header + system prompt:
~140 of SmolLM2's ~255 prompt tokens). Its KV is computed once and copied into each request's slot;
only the rest of the prompt is prefilled. Found by comparing each prompt with the previous one (any
shared start of >= `min_prefix` tokens), so it also serves chats with a shared history.

Greedy outputs equal one-request-at-a-time decoding up to float rounding: a row's logits come from
matmuls over a batch whose size changes as requests come and go, and greedy decoding can amplify a
last-bit difference into a different token (measured share in BENCHMARKS.md).

Supported: decoder-only models with full attention in every layer and an attention implementation
that takes a 4D mask (sdpa, eager, adgen's packed attention). Others keep `model.generate`
(`supports_engine`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from adgen.generation.config import DecodingConfig, Generation
from adgen.generation.repetition import RepeatState, token_table
from adgen.generation.text import decode, find_stop, finished_generation, stop_window
from adgen.train.packed_attention import PACKED_ATTENTION  # the training's attention takes 4D masks too

MASK_ATTENTIONS = ("sdpa", "eager", PACKED_ATTENTION)


def supports_engine(model) -> bool:
    """Whether `DecodeEngine` can drive this model (else: `model.generate`)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in MASK_ATTENTIONS:
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    if getattr(getattr(model, "peft_config", {}).get("default", None), "peft_type", None) is not None:
        kind = str(model.peft_config["default"].peft_type)
        if "PREFIX" in kind or "PROMPT" in kind:  # virtual tokens live in the cache: keep model.generate
            return False
    return _kv_shape(model) is not None


def _kv_shape(model) -> tuple[int, int, int] | None:
    """(layers, kv_heads, head_dim) from the model config."""
    c = model.config
    c = getattr(c, "text_config", None) or c
    layers = getattr(c, "num_hidden_layers", None)
    heads = getattr(c, "num_attention_heads", None)
    hidden = getattr(c, "hidden_size", None)
    if not (layers and heads and hidden):
        return None
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return int(layers), int(kv), int(head_dim)


# ---- the KV cache ---------------------------------------------------------------------------------
class SlotCache:
    """Preallocated K/V for `slots` requests of up to `capacity` tokens (see the module docstring).

    The model calls `update(k, v, layer_idx)` during a decode step with one new token per running
    row; `positions` (set by the engine before the forward) says where each row's token goes.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.positions: torch.Tensor | None = None  # [B] long: the column of each running row's new token
        self.width = 0  # columns the step's attention looks at (max position + 1)
        self.is_compileable = False

    def put(self, slot: int, layer_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int = 0) -> None:
        """Write a prefilled sequence ([1, kv_heads, n, head_dim] per layer) at columns start..start+n-1."""
        for layer, (k, v) in enumerate(layer_kv):
            n = k.shape[-2]
            self.keys[layer][slot, :, start : start + n] = k[0]
            self.values[layer][slot, :, start : start + n] = v[0]

    def grown(self, capacity: int) -> "SlotCache":
        """A larger cache holding this one's contents (a request longer than any before joined)."""
        k0 = self.keys[0]
        bigger = SlotCache(len(self.keys), k0.shape[0], k0.shape[1], k0.shape[3], capacity, k0.dtype, k0.device)
        for layer in range(len(self.keys)):
            bigger.keys[layer][:, :, : self.capacity] = self.keys[layer]
            bigger.values[layer][:, :, : self.capacity] = self.values[layer]
        return bigger

    def move(self, src: int, dst: int, length: int) -> None:
        for layer in range(len(self.keys)):
            self.keys[layer][dst, :, :length] = self.keys[layer][src, :, :length]
            self.values[layer][dst, :, :length] = self.values[layer][src, :, :length]

    # what the model calls
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rows = key_states.shape[0]
        index = torch.arange(rows, device=key_states.device)
        self.keys[layer_idx][index, :, self.positions] = key_states[:, :, 0]
        self.values[layer_idx][index, :, self.positions] = value_states[:, :, 0]
        return self.keys[layer_idx][:rows, :, : self.width], self.values[layer_idx][:rows, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def __len__(self) -> int:
        return len(self.keys)


class PrefixCache:
    """KV of shared prompt starts, computed once; the few most recently used are kept."""

    def __init__(self, min_prefix: int = 16, max_entries: int = 4) -> None:
        self.min_prefix = min_prefix
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._previous: list[int] | None = None

    def lookup(self, prompt: Sequence[int]) -> tuple[int, list | None]:
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

    def add(self, key: tuple[int, ...], layer_kv: list) -> None:
        self.entries[key] = layer_kv
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


# ---- requests ---------------------------------------------------------------------------------
@dataclass(eq=False)
class Request:
    """One prompt to complete. `on_tokens(ids)` (optional) is called with each step's new token ids.

    `adapter`: for a PEFT model with LoRA adapters, the adapter this request runs with ("__base__" = none);
    None = the model's active adapter. Requests for different adapters decode in one batch (PEFT's
    mixed-adapter forward). `cancel`: set it from any thread; the request leaves before the next step.
    """

    prompt_ids: list[int]
    config: DecodingConfig
    cancel: threading.Event = field(default_factory=threading.Event)
    on_tokens: Callable[[list[int]], None] | None = None
    adapter: str | None = None
    result: Generation | None = None


@dataclass(eq=False)
class _Running:
    request: Request
    length: int  # tokens in the cache
    next_token: int  # the token the next step feeds (already part of `generated`)
    generated: list[int]
    repeat: RepeatState | None
    processors: object  # transformers LogitsProcessorList for this request's settings (or None)
    rng: torch.Generator | None
    stop_hit: bool = False


class DecodeEngine:
    """Runs requests with continuous batching; one engine per model, driven from one thread at a time.

    Two ways to drive it: `run` / `run_each(requests)` for a known list (eval, bulk generation), or
    `submit(request)` + `step()` in a loop for requests that keep arriving (the server's scheduler).
    """

    def __init__(self, model, tokenizer, stop_ids: Sequence[int], *, slots: int = 16,
                 prefix_cache: PrefixCache | None = None) -> None:
        shape = _kv_shape(model)
        if shape is None or not supports_engine(model):
            raise ValueError("this model needs model.generate (see adgen.generation.engine.supports_engine)")
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = [int(i) for i in stop_ids]
        self.slots = max(1, int(slots))
        # one prefix cache per adapter: the same tokens have other keys / values under another adapter
        self._prefix_caches: dict[str | None, PrefixCache] = {None: prefix_cache if prefix_cache is not None else PrefixCache()}
        self._layers, self._kv_heads, self._head_dim = shape
        self._cache: SlotCache | None = None
        self._cache_kw = _cache_kwarg(model)
        self._waiting: deque[Request] = deque()
        self._running: list[_Running] = []
        self.steps = 0  # decode steps run (each one forward of the running batch)
        self.prefill_tokens = 0  # prompt tokens computed (the prefix cache's share is not)
        self.prompt_tokens = 0  # prompt tokens of the requests run
        self.max_running = 0  # the largest batch a step ran

    @property
    def prefix_cache(self) -> PrefixCache:
        return self._prefix_caches[None]

    # ---- a known list of requests ---------------------------------------------------------------
    def run(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> list[Generation]:
        """Complete every request; results in the order given (also on `request.result`)."""
        for _ in self.run_each(requests):
            if progress is not None:
                progress(1)
        return [r.result for r in requests]  # type: ignore[misc]

    def run_each(self, requests: Sequence[Request]) -> Iterator[Request]:
        """Complete every request, yielding each as it finishes (admitted in the order given)."""
        self.reserve(max((self._needed(r) for r in requests), default=0))
        for request in requests:
            self.submit(request)
        while self.busy:
            yield from self.step()

    # ---- requests that keep arriving --------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; it takes a slot at a coming `step()` (in the order submitted)."""
        self._waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def step(self) -> list[Request]:
        """Admit waiting requests into free slots, run one decode step, return the requests that ended.

        Cancelled requests leave first (a cancelled request costs no further forward)."""
        finished: list[Request] = []
        # inference mode per call, never across calls (thread-local state the caller would inherit)
        with torch.inference_mode():
            for slot in range(len(self._running) - 1, -1, -1):
                seq = self._running[slot]
                if seq.request.cancel.is_set() and seq.request.result is None:
                    seq.request.result = self._result(seq)
                    self._release(slot)
                    finished.append(seq.request)
            while self._waiting and len(self._running) < self.slots:
                request = self._waiting.popleft()
                seq = self._admit(request, len(self._running))
                if seq is None:  # cancelled before it started, or ended on its first token
                    finished.append(request)
                else:
                    self._running.append(seq)
            if self._running:
                self._step(self._running)
                for slot in range(len(self._running) - 1, -1, -1):
                    if self._running[slot].request.result is not None:
                        request = self._running[slot].request
                        self._release(slot)
                        finished.append(request)
        return finished

    def abort(self) -> list[Request]:
        """Drop every request (after an error in a step): each is returned, its result unset."""
        dropped = [seq.request for seq in self._running] + list(self._waiting)
        self._running.clear()
        self._waiting.clear()
        return dropped

    def stats(self) -> dict:
        """What the runs so far cost: decode steps, prompt tokens, and those the prefix cache saved."""
        return {"decode_steps": self.steps, "prompt_tokens": self.prompt_tokens,
                "prefill_tokens": self.prefill_tokens, "prefix_tokens_saved": self.prompt_tokens - self.prefill_tokens,
                "max_batch": self.max_running}

    # ---- admission: prefill one request into a slot ------------------------------------------
    def _limit(self, request: Request) -> int:
        return int(request.config.max_new_tokens or 256)

    def _needed(self, request: Request) -> int:
        return len(request.prompt_ids) + self._limit(request) + 1

    def reserve(self, capacity: int) -> SlotCache:
        """A cache of at least `capacity` tokens per slot (grown in place of the old one, contents kept)."""
        with torch.inference_mode():
            if self._cache is None:
                param = next(self.model.parameters())
                dtype = param.dtype if param.is_floating_point() else torch.float32
                self._cache = SlotCache(self._layers, self.slots, self._kv_heads, self._head_dim, max(capacity, 1),
                                        dtype, param.device)
            elif self._cache.capacity < capacity:
                # grow by whole blocks so a stream of slightly longer requests does not copy every time
                self._cache = self._cache.grown(-(-capacity // 256) * 256)
        return self._cache

    def _prefix_cache_for(self, adapter: str | None) -> PrefixCache:
        cache = self._prefix_caches.get(adapter)
        if cache is None:
            cache = self._prefix_caches[adapter] = PrefixCache(self.prefix_cache.min_prefix, self.prefix_cache.max_entries)
        return cache

    def _prefill(self, ids: Sequence[int], adapter: str | None):
        """(last-position logits [V], per-layer KV [(k, v)] of the whole prompt)."""
        prefixes = self._prefix_cache_for(adapter)
        n, kv = prefixes.lookup(ids)
        key = prefixes.candidate(ids)
        if key is not None and len(key) >= n + prefixes.min_prefix:
            # a start shared with the previous prompt: computed once (after what is cached), kept for the next
            _, kv = self._forward(key[n:], n, kv, adapter)
            prefixes.add(key, kv)
            n = len(key)
        return self._forward(ids[n:], n, kv, adapter)

    def _forward(self, ids: Sequence[int], start: int, prefix_kv, adapter: str | None):
        """Run `ids` (positions start..) after `prefix_kv` (None: from scratch): (last logits, KV of all)."""
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        cache = DynamicCache()
        for layer, (k, v) in enumerate(prefix_kv or ()):
            cache.update(k, v, layer)  # concatenates into new tensors: the cached prefix stays as it was
        n = len(ids)
        kwargs = self._adapter_kwargs([adapter])
        if start:  # an explicit mask: the new tokens see the whole prefix, then causally each other
            # (left to itself, an attention could treat q_len != kv_len as top-left-aligned causal)
            visible = torch.arange(start + n, device=device).unsqueeze(0) <= torch.arange(start, start + n, device=device).unsqueeze(1)
            kwargs["attention_mask"] = visible[None, None]
        out = self.model(input_ids=torch.tensor([list(ids)], device=device),
                         position_ids=torch.arange(start, start + n, device=device).unsqueeze(0),
                         use_cache=True, logits_to_keep=1, **kwargs, **{self._cache_kw: cache})
        self.prefill_tokens += n
        return out.logits[0, -1].float(), _layer_kv(_out_cache(out))

    def _adapter_kwargs(self, adapters: Sequence[str | None]) -> dict:
        """PEFT's per-row adapter choice, when some row asks for one (else the model's active adapter runs)."""
        if all(a is None for a in adapters):
            return {}
        active = getattr(self.model, "active_adapter", None)
        return {"adapter_names": [a if a is not None else active for a in adapters]}

    def _admit(self, request: Request, slot: int) -> _Running | None:
        if request.cancel.is_set():
            request.result = Generation("", len(request.prompt_ids), 0, "cancelled", [])
            return None
        cache = self.reserve(self._needed(request))
        self.prompt_tokens += len(request.prompt_ids)
        logits, layer_kv = self._prefill(request.prompt_ids, request.adapter)
        cache.put(slot, layer_kv)
        config = request.config
        seq = _Running(
            request=request, length=len(request.prompt_ids), next_token=-1, generated=[],
            repeat=RepeatState(token_table(self.tokenizer), config, self.stop_ids) if config.controls_repetition else None,
            processors=_hf_processors(config), rng=_rng(config),
        )
        self._choose(seq, logits.unsqueeze(0))
        return None if request.result is not None else seq

    # ---- one decode step -----------------------------------------------------------------------
    def _step(self, running: list[_Running]) -> None:
        cache = self._cache
        assert cache is not None
        device = cache.keys[0].device
        lengths = torch.tensor([s.length for s in running], device=device)
        cache.positions = lengths
        cache.width = int(lengths.max()) + 1
        # row b sees columns 0..len_b (its cached tokens and the one it is adding)
        mask = torch.arange(cache.width, device=device).unsqueeze(0) <= lengths.unsqueeze(1)
        tokens = torch.tensor([[max(s.next_token, 0)] for s in running], device=device)
        out = self.model(input_ids=tokens, position_ids=lengths.unsqueeze(1), attention_mask=mask[:, None, None, :],
                         use_cache=True, **self._adapter_kwargs([s.request.adapter for s in running]),
                         **{self._cache_kw: cache})
        self.steps += 1
        self.max_running = max(self.max_running, len(running))
        logits = out.logits[:, -1].float()
        for row, seq in enumerate(running):
            seq.length += 1
            if seq.request.result is None:
                self._choose(seq, logits[row : row + 1])

    def _choose(self, seq: _Running, scores: torch.Tensor) -> None:
        """Pick the next token from one row's logits [1, V], record it, finish the request if it ends."""
        request, config = seq.request, seq.request.config
        if seq.repeat is not None and config.shapes_logits:
            from adgen.generation.hf_processors import apply_penalties

            apply_penalties(scores, [(0, seq.repeat)])
        if seq.processors is not None:
            ids = torch.tensor([list(request.prompt_ids) + seq.generated], device=scores.device)
            scores = seq.processors(ids, scores)
        if config.greedy:
            token = int(scores.argmax(dim=-1))
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=seq.rng))
        seq.generated.append(token)
        seq.next_token = token
        if request.on_tokens is not None:
            request.on_tokens([token])
        if seq.repeat is not None:
            seq.repeat.push([token])
        if config.stop and token not in self.stop_ids:
            tail = seq.generated[-stop_window(config.stop):]
            seq.stop_hit = find_stop(decode(self.tokenizer, tail), config.stop) != -1
        done = (token in self.stop_ids or seq.stop_hit or (seq.repeat is not None and seq.repeat.looped)
                or len(seq.generated) >= self._limit(request) or request.cancel.is_set())
        if done:
            request.result = self._result(seq)

    def _result(self, seq: _Running) -> Generation:
        request = seq.request
        return finished_generation(
            self.tokenizer, len(request.prompt_ids), seq.generated, self.stop_ids, request.config.stop,
            stop_hit=seq.stop_hit, looped=seq.repeat is not None and seq.repeat.looped,
            cancelled=request.cancel.is_set(),
        )

    def _release(self, slot: int) -> None:
        running = self._running
        last = len(running) - 1
        if slot != last:
            self._cache.move(last, slot, running[last].length)  # type: ignore[union-attr]
            running[slot] = running[last]
        running.pop()


def _cache_kwarg(model) -> str:
    """transformers >= 5.x names the forward's cache argument `cache` (`past_key_values` before)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v in cache]  # older tuple-style caches


def _rng(config: DecodingConfig) -> torch.Generator | None:
    if config.greedy or config.seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(int(config.seed))
    return g


def _hf_processors(config: DecodingConfig):
    """transformers' processors for the settings that need the token ids or shape sampling."""
    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = []
    if config.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if not config.greedy:
        if config.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            procs.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            procs.append(TopPLogitsWarper(config.top_p))
    return LogitsProcessorList(procs) if procs else None
