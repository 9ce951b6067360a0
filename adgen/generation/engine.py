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

Host <-> device traffic per decode step (what a GPU waits on): the input ids, positions and mask come
from tensors that stay on the device (`SlotCache.tokens` / `lengths`, updated in place); the repetition
control's penalties of all rows go over in one copy; one argmax over the batch, and one `.tolist()` of the
chosen ids is the step's only device -> host read, whatever the batch size. Per row only what is that
row's own: transformers' processors (repetition_penalty, top-k/p; `no_repeat_ngram_size` reads its ids
on the host), a seeded sample (the request's generator, on the logits' device). The decode mask is
[B, 1, 1, W]: transformers' SDPA packs the query heads onto the KV heads for it (no per-head K/V copy).

Errors: what belongs to one request (its prefill, settings, processors, sampling, stop check, callback)
fails that request alone (`Request.error`), the others go on; an error of the shared decode forward
fails the rows of that step. A budgeted engine (`capacity`, adgen.generation.kv_budget) allocates its
cache once and never grows it.

Prefix cache (`PrefixCache`): the prompts of a task share their start (chat header + system prompt:
~140 of SmolLM2's ~255 prompt tokens). Its KV is computed once and copied into each request's slot;
only the rest of the prompt is prefilled. Found by comparing each prompt with the previous one (any
shared start of >= `min_prefix` tokens), so it also serves chats with a shared history.

Batched prefill (`batch_prefill`, "auto" = on when the model is on CUDA): the requests admitted in one step
are prefilled together, one forward per (cached prefix length, adapter) group -- typically one, as they share
the system prompt. Suffixes right-padded to the longest, positions continuing after the prefix, a 4D mask
(each row sees its own prefix copy and its own earlier tokens, never a pad), each row's logits at its own
last real token, each row's real K/V written into its slot. An error of that forward prefills its requests
one at a time (a request that cannot run fails alone). Off on the CPU: other GEMM shapes change last bits,
and the CPU path keeps its exact equality with `model.generate` (tests/test_engine_batched_prefill.py bounds
the difference when forced on).

Greedy outputs equal one-request-at-a-time decoding up to float rounding: a row's logits come from
matmuls over a batch whose size changes as requests come and go, and greedy decoding can amplify a
last-bit difference into a different token (measured share in docs/BENCHMARK_NOTES.md section 6).

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

from adgen.errors import AdgenError
from adgen.generation.config import DecodingConfig, Generation
from adgen.generation.hf_processors import apply_shaping, row_shaping, sampling_processors
from adgen.generation.kv_budget import kv_shape
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
    return kv_shape(model.config)


# ---- the KV cache ---------------------------------------------------------------------------------
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
    `error`: set when the request failed on its own (its prefill, its logits processing or sampling, its
    stop check, its `on_tokens`): it left the batch with `result` None and the other requests went on.
    """

    prompt_ids: list[int]
    config: DecodingConfig
    cancel: threading.Event = field(default_factory=threading.Event)
    on_tokens: Callable[[list[int]], None] | None = None
    adapter: str | None = None
    result: Generation | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class CacheTooSmall(AdgenError):
    """A request needs more KV cache per slot than a fixed-size (budgeted) cache holds."""


@dataclass(eq=False)
class _Running:
    request: Request
    length: int  # tokens in the cache (= the column of the token the next step feeds)
    generated: list[int]
    repeat: RepeatState | None
    processors: object  # transformers LogitsProcessorList for this request's settings (or None)
    rng: torch.Generator | None
    stop_hit: bool = False


class DecodeEngine:
    """Runs requests with continuous batching; one engine per model, driven from one thread at a time.

    Two ways to drive it: `run` / `run_each(requests)` for a known list (eval, bulk generation), or
    `submit(request)` + `step()` in a loop for requests that keep arriving (the server's scheduler).
    `capacity`: a fixed KV cache of `slots x capacity` tokens, allocated now and never grown (a GPU
    server's budget, adgen.generation.kv_budget); None: the cache grows with the longest request.
    `batch_prefill`: prefill the requests admitted in one step in one padded forward ("auto": when the
    model is on CUDA; True / False force it; see the module docstring).
    """

    def __init__(self, model, tokenizer, stop_ids: Sequence[int], *, slots: int = 16,
                 prefix_cache: PrefixCache | None = None, capacity: int | None = None,
                 batch_prefill: bool | str = "auto") -> None:
        shape = _kv_shape(model)
        if shape is None or not supports_engine(model):
            raise ValueError("this model needs model.generate (see adgen.generation.engine.supports_engine)")
        if batch_prefill not in ("auto", True, False):
            raise ValueError(f"batch_prefill must be 'auto', True or False, not {batch_prefill!r}")
        self.model = model
        # requests admitted together prefilled in one padded forward (per prefix length and adapter): on a
        # GPU one forward instead of one per request. "auto": on CUDA only -- other GEMM shapes change last
        # bits, and on the CPU the engine keeps its exact equality with one-request-at-a-time generation
        self.batch_prefill = (next(model.parameters()).device.type == "cuda") if batch_prefill == "auto" else batch_prefill
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
        self.fixed_capacity = int(capacity) if capacity is not None else None
        if self.fixed_capacity is not None:
            self.reserve(self.fixed_capacity)  # claimed now: a server's memory is known from the start

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
        """Complete every request, yielding each as it finishes (admitted in the order given).

        A request that fails raises its error here (the run stops: the caller asked for all of them)."""
        if self.fixed_capacity is None:
            self.reserve(max((self._needed(r) for r in requests), default=0))
        for request in requests:
            self.submit(request)
        while self.busy:
            for request in self.step():
                if request.error is not None:
                    self.abort()
                    raise request.error
                yield request

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
        """Admit waiting requests into free slots, run one decode step, return the requests that ended
        (with a `result`, or with an `error` that was theirs alone).

        Cancelled requests leave first (a cancelled request costs no further forward). An error of the
        decode step's shared forward fails every row of that step (each gets it as its `error`)."""
        finished: list[Request] = []
        # inference mode per call, never across calls (thread-local state the caller would inherit)
        with torch.inference_mode():
            for slot in range(len(self._running) - 1, -1, -1):
                seq = self._running[slot]
                if seq.request.cancel.is_set() and not seq.request.done:
                    seq.request.result = self._result(seq)
            self._leave(finished)
            self._admit_waiting(finished)
            if self._running:
                try:
                    self._step(self._running)
                except Exception as e:  # the shared forward (or a batched op): every row of the step fails
                    for seq in self._running:
                        if not seq.request.done:
                            seq.request.error = e
                self._leave(finished)
        return finished

    def abort(self) -> list[Request]:
        """Drop every running request (after an error the engine did not handle): each is returned, its
        result unset. Waiting requests stay queued: they run at the next step."""
        dropped = [seq.request for seq in self._running]
        self._running.clear()
        return dropped

    def stats(self) -> dict:
        """What the runs so far cost: decode steps, prompt tokens, and those the prefix cache saved."""
        return {"decode_steps": self.steps, "prompt_tokens": self.prompt_tokens,
                "prefill_tokens": self.prefill_tokens, "prefix_tokens_saved": self.prompt_tokens - self.prefill_tokens,
                "max_batch": self.max_running}

    def cache_info(self) -> dict:
        """The KV cache now: slots, tokens per slot, bytes on the device, and whether its size is fixed."""
        cache = self._cache
        return {"slots": self.slots, "tokens_per_slot": cache.capacity if cache is not None else 0,
                "bytes": cache.nbytes if cache is not None else 0, "fixed": self.fixed_capacity is not None}

    def _leave(self, finished: list[Request]) -> None:
        for slot in range(len(self._running) - 1, -1, -1):
            if self._running[slot].request.done:
                finished.append(self._running[slot].request)
                self._release(slot)

    # ---- admission: prefill one request into a slot ------------------------------------------
    def _limit(self, request: Request) -> int:
        return int(request.config.max_new_tokens or 256)

    def _needed(self, request: Request) -> int:
        return len(request.prompt_ids) + self._limit(request) + 1

    def reserve(self, capacity: int) -> SlotCache:
        """A cache of at least `capacity` tokens per slot (grown in place of the old one, contents kept).
        A fixed-size cache never grows: a request that needs more raises `CacheTooSmall`."""
        with torch.inference_mode():
            if self._cache is None:
                param = next(self.model.parameters())
                self._cache = SlotCache(self._layers, self.slots, self._kv_heads, self._head_dim, max(capacity, 1),
                                        cache_dtype(self.model), param.device)
            elif self._cache.capacity < capacity:
                if self.fixed_capacity is not None:
                    raise CacheTooSmall(
                        f"this request needs {capacity} tokens of KV cache (prompt + max_tokens + 1) but each slot "
                        f"holds {self._cache.capacity}: ask for fewer max_tokens or a shorter prompt (the server's "
                        f"--max-prompt-tokens and --max-tokens-limit size the slots)")
                # grow by whole blocks so a stream of slightly longer requests does not copy every time
                self._cache = self._cache.grown(-(-capacity // 256) * 256)
        return self._cache

    def _prefix_cache_for(self, adapter: str | None) -> PrefixCache:
        cache = self._prefix_caches.get(adapter)
        if cache is None:
            cache = self._prefix_caches[adapter] = PrefixCache(self.prefix_cache.min_prefix, self.prefix_cache.max_entries)
        return cache

    def _prefill(self, ids: Sequence[int], ids_t: torch.Tensor, adapter: str | None):
        """(last-position logits [V], per-layer KV [(k, v)] of the whole prompt); `ids_t`: `ids` on the device."""
        self._plan_prefix(ids, ids_t, adapter)
        n, kv = self._prefix_cache_for(adapter).lookup(ids)
        return self._forward(ids_t[n:], n, kv, adapter)

    def _forward(self, ids: torch.Tensor, start: int, prefix_kv, adapter: str | None):
        """Run `ids` ([n] on the device, positions start..) after `prefix_kv` (None: from scratch):
        (last logits, KV of all)."""
        from transformers import DynamicCache

        device = ids.device
        cache = DynamicCache()
        for layer, (k, v) in enumerate(prefix_kv or ()):
            cache.update(k, v, layer)  # concatenates into new tensors: the cached prefix stays as it was
        n = ids.shape[0]
        kwargs = self._adapter_kwargs([adapter])
        if start:  # an explicit mask: the new tokens see the whole prefix, then causally each other
            # (left to itself, an attention could treat q_len != kv_len as top-left-aligned causal)
            visible = torch.arange(start + n, device=device).unsqueeze(0) <= torch.arange(start, start + n, device=device).unsqueeze(1)
            kwargs["attention_mask"] = visible[None, None]
        out = self.model(input_ids=ids.unsqueeze(0),
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

    def _admit_waiting(self, finished: list[Request]) -> None:
        """Waiting requests into free slots; one whose own prefill or settings fail ends alone."""
        if self.batch_prefill:
            while self._waiting and len(self._running) < self.slots:
                # a request that ends on its first token frees its slot for the next waiting one: loop
                batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.slots - len(self._running)))]
                self._admit_batch(batch, finished)
            return
        while self._waiting and len(self._running) < self.slots:
            request = self._waiting.popleft()
            try:
                seq = self._admit(request, len(self._running))
            except Exception as e:
                request.error = e
                seq = None
            if seq is None:  # cancelled before it started, ended on its first token, or failed
                finished.append(request)
            else:
                self._running.append(seq)

    def _running_state(self, request: Request, device) -> _Running:
        """A newly prefilled request's decoding state: repetition control, processors, seeded generator."""
        config = request.config
        return _Running(
            request=request, length=len(request.prompt_ids), generated=[],
            repeat=RepeatState(token_table(self.tokenizer), config, self.stop_ids) if config.controls_repetition else None,
            processors=sampling_processors(config), rng=_rng(config, device),
        )

    @staticmethod
    def _cancelled_before_start(request: Request) -> bool:
        if request.cancel.is_set():
            request.result = Generation("", len(request.prompt_ids), 0, "cancelled", [])
            return True
        return False

    def _admit(self, request: Request, slot: int) -> _Running | None:
        if self._cancelled_before_start(request):
            return None
        cache = self.reserve(self._needed(request))
        self.prompt_tokens += len(request.prompt_ids)
        prompt = torch.tensor(request.prompt_ids, dtype=torch.long, device=cache.device)  # the request's one copy
        logits, layer_kv = self._prefill(request.prompt_ids, prompt, request.adapter)
        cache.put(slot, layer_kv)
        cache.set_prompt(slot, prompt)
        seq = self._running_state(request, logits.device)
        self._choose([seq], logits.unsqueeze(0), slot)
        return None if request.done else seq

    # ---- admission of several requests: one padded prefill forward ------------------------------
    def _admit_batch(self, requests: list[Request], finished: list[Request]) -> None:
        """Prefill `requests` (admitted together) with one forward per (prefix length, adapter) group and
        put them into the slots after the running ones (in the order given). A request whose own part
        fails (cache, settings, callback) ends alone; an error of a group's forward makes each of its
        requests prefill on its own (so a request that cannot run fails alone, as one at a time)."""
        plans = []  # [request, prompt on the device, prefix length, prefix kv]
        for request in requests:
            if self._cancelled_before_start(request):
                finished.append(request)
                continue
            try:
                cache = self.reserve(self._needed(request))
                self.prompt_tokens += len(request.prompt_ids)
                prompt = torch.tensor(request.prompt_ids, dtype=torch.long, device=cache.device)
                self._plan_prefix(request.prompt_ids, prompt, request.adapter)
            except Exception as e:
                request.error = e
                finished.append(request)
                continue
            plans.append([request, prompt, 0, None])
        # second pass: every prefix these prompts start is cached now (the first prompt of a run uses the
        # one it shares with the second, so all of them land in one group)
        groups: dict[tuple[int, str | None], list[int]] = {}
        for i, plan in enumerate(plans):
            request = plan[0]
            plan[2], plan[3] = self._prefix_cache_for(request.adapter).lookup(request.prompt_ids)
            groups.setdefault((plan[2], request.adapter), []).append(i)
        results: dict[int, tuple[torch.Tensor, list]] = {}  # plan index -> (logits [V], per-layer kv)
        for (n, adapter), members in groups.items():
            try:
                rows = self._forward_rows([plans[i][1][n:] for i in members], n, [plans[i][3] for i in members], adapter)
                results.update(zip(members, rows))
            except Exception:  # the group's forward: each of its requests on its own
                for i in members:
                    request, prompt, m, kv = plans[i]
                    try:
                        results[i] = self._forward(prompt[m:], m, kv, request.adapter)
                    except Exception as e:
                        request.error = e
        seqs, scores = [], []
        for i, (request, prompt, _, _) in enumerate(plans):
            if i not in results:
                finished.append(request)
                continue
            logits, layer_kv = results[i]
            try:
                seq = self._running_state(request, logits.device)
            except Exception as e:
                request.error = e
                finished.append(request)
                continue
            slot = len(self._running) + len(seqs)
            self._cache.put(slot, layer_kv)
            self._cache.set_prompt(slot, prompt)
            seqs.append(seq)
            scores.append(logits)
        if not seqs:
            return
        first = len(self._running)
        try:
            self._choose(seqs, torch.stack(scores), first)
        except Exception as e:  # a batched op of the first-token choice: these requests fail
            for seq in seqs:
                if not seq.request.done:
                    seq.request.error = e
        for seq in seqs:
            if seq.request.done:
                finished.append(seq.request)
            else:
                self._running.append(seq)
        # the running rows stay slots 0..B-1: a row that ended on its first token gives its slot to the next
        kept = len(self._running) - first
        if kept != len(seqs):
            slot = first
            for i, seq in enumerate(seqs):
                if not seq.request.done:
                    if first + i != slot:
                        self._cache.move(first + i, slot, seq.length)
                    slot += 1

    def _plan_prefix(self, ids: Sequence[int], ids_t: torch.Tensor, adapter: str | None) -> None:
        """A start this prompt shares with the previous one: computed once (after what is cached), kept for the
        next prompts (the prefix cache's part of a prefill)."""
        prefixes = self._prefix_cache_for(adapter)
        n, kv = prefixes.lookup(ids)
        key = prefixes.candidate(ids)
        if key is not None and len(key) >= n + prefixes.min_prefix:
            _, kv = self._forward(ids_t[n : len(key)], n, kv, adapter)
            prefixes.add(key, kv)

    def _forward_rows(self, suffixes: list[torch.Tensor], start: int, prefix_kvs: list, adapter: str | None):
        """`_forward` for several prompts at once: row r runs `suffixes[r]` (positions start..) after its
        own `prefix_kvs[r]` (all of length `start`; None when start is 0). The suffixes are right-padded to
        the longest; the 4D mask lets each real token see its row's prefix and its own earlier tokens, never
        a pad. [(last real position's logits [V], per-layer KV of the row's prefix + real tokens)]."""
        from transformers import DynamicCache

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
                         **self._adapter_kwargs([adapter] * rows), **{self._cache_kw: cache})
        self.prefill_tokens += sum(lengths)
        layer_kv = _layer_kv(_out_cache(out))
        logits = out.logits
        # a forward that ignores `logits_to_keep` (remote code taking **kwargs) gives every position
        column_of = (lambda n: last.index(n - 1)) if logits.shape[1] == len(last) else (lambda n: n - 1)
        return [(logits[r, column_of(n)].float(), [(k[r : r + 1, :, : start + n], v[r : r + 1, :, : start + n])
                                                        for k, v in layer_kv])
                for r, n in enumerate(lengths)]

    # ---- one decode step -----------------------------------------------------------------------
    def _step(self, running: list[_Running]) -> None:
        cache = self._cache
        assert cache is not None
        rows = len(running)
        cache.width = max(s.length for s in running) + 1  # from the host's own counts: no device read
        positions = cache.lengths[:rows]
        # row b sees columns 0..len_b (its cached tokens and the one it is adding)
        mask = cache.columns[: cache.width].unsqueeze(0) <= positions.unsqueeze(1)
        tokens = cache.tokens[:rows].gather(1, positions.unsqueeze(1))  # each row's pending token
        out = self.model(input_ids=tokens, position_ids=positions.unsqueeze(1),
                         attention_mask=mask[:, None, None, :], use_cache=True,
                         **self._adapter_kwargs([s.request.adapter for s in running]), **{self._cache_kw: cache})
        self.steps += 1
        self.max_running = max(self.max_running, rows)
        logits = out.logits[:, -1].float()
        positions += 1  # in place: every row's new token is in the cache now
        for seq in running:
            seq.length += 1
        self._choose(running, logits, 0)

    def _choose(self, seqs: list[_Running], scores: torch.Tensor, first_slot: int) -> None:
        """Pick the next token of every row (scores [n, V]; row i is `seqs[i]`, in cache slot first_slot + i),
        write them into the cache's token rows, and finish the requests that end.

        Batched: the repetition penalties in a few tensor ops, one argmax over the batch, and one
        device -> host copy of the chosen ids per call. Per row only what is the row's own: transformers'
        processors (its settings), a seeded sample (its generator), the host-side bookkeeping. An error in
        those fails that row's request alone."""
        failed: dict[int, BaseException] = {}
        self._shape_scores(seqs, scores, first_slot, failed)
        chosen = scores.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            if i not in failed and not seq.request.config.greedy:
                try:
                    probs = torch.softmax(scores[i : i + 1], dim=-1)
                    chosen[i : i + 1] = torch.multinomial(probs, 1, generator=seq.rng)[0]
                except Exception as e:
                    failed[i] = e
        cache = self._cache
        end = first_slot + len(seqs)
        cache.tokens[first_slot:end].scatter_(1, cache.lengths[first_slot:end].unsqueeze(1), chosen.unsqueeze(1))
        ids = chosen.tolist()  # the one device -> host copy
        for i, seq in enumerate(seqs):
            if i not in failed:
                try:
                    self._record(seq, ids[i])
                    continue
                except Exception as e:
                    failed[i] = e
            seq.request.error = failed[i]

    def _shape_scores(self, seqs: list[_Running], scores: torch.Tensor, first_slot: int,
                      failed: dict[int, BaseException]) -> None:
        """The character-level repetition control (all rows at once), then each row's own processors."""
        shaping = []
        for i, seq in enumerate(seqs):
            if seq.repeat is not None and seq.request.config.shapes_logits:
                try:
                    shaping.append(row_shaping(i, seq.repeat, scores.shape[-1]))
                except Exception as e:
                    failed[i] = e
        apply_shaping(scores, shaping)
        tokens = self._cache.tokens
        for i, seq in enumerate(seqs):
            if seq.processors is not None and i not in failed:
                try:
                    history = tokens[first_slot + i : first_slot + i + 1, : seq.length]  # prompt + generated
                    scores[i : i + 1] = seq.processors(history, scores[i : i + 1])
                except Exception as e:
                    failed[i] = e

    def _record(self, seq: _Running, token: int) -> None:
        """The host's part of a chosen token: the request's text state, its callback, whether it ends."""
        request, config = seq.request, seq.request.config
        seq.generated.append(token)
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


def cache_dtype(model) -> torch.dtype:
    """The KV cache's dtype: the model's floating-point parameters' (fp32 for an all-integer model)."""
    param = next(model.parameters())
    return param.dtype if param.is_floating_point() else torch.float32


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


def _rng(config: DecodingConfig, device) -> torch.Generator | None:
    """A seeded request's own generator, on the device its logits are on (torch.multinomial refuses a CPU
    generator for CUDA probabilities). On the CPU the same seed gives the same draws as before."""
    if config.greedy or config.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(config.seed))
    return g
