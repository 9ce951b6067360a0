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
work: its own forward, given a cache object and a 4D mask. The engine executes; what to run when (queues,
budgets, adapters per request) is its driver's decision (adgen.serve's scheduler, or `run` for a known list).

The parts, one module each: the KV cache of the slots (adgen.generation.slot_cache: layout, growth, moves),
prefill and the shared-prefix cache (adgen.generation.prefill), a request and its decoding state while it runs
(adgen.generation.request_state). This module admits requests into slots, runs the decode steps and chooses
each row's next token.

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

Batched prefill (`batch_prefill`, "auto" = on when the model is on CUDA): the requests admitted in one step
are prefilled together (adgen.generation.prefill). Off on the CPU: other GEMM shapes change last bits,
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

from collections import deque
from typing import Callable, Iterator, Sequence

import torch

from adgen.generation.config import Generation
from adgen.generation.coverage import attributes_for
from adgen.generation.hf_processors import apply_shaping, row_shaping, sampling_warpers
from adgen.generation.hf_processors import token_processors as sampling_processors  # the engine's name (tests patch it)
from adgen.generation.kv_budget import kv_shape
from adgen.generation.prefill import PrefixCache, Prefiller, adapter_kwargs
from adgen.generation.prefill import cache_kwarg as _cache_kwarg  # noqa: F401  (its old name, for callers)
from adgen.generation.repetition import RepeatState, token_table
from adgen.generation.request_state import Request, RunningRequest
from adgen.generation.request_state import seeded_rng as _rng  # the engine's name for it (tests patch it here)
from adgen.generation.slot_cache import CacheTooSmall, SlotCache, cache_dtype
from adgen.train.packed_attention import PACKED_ATTENTION  # the training's attention takes 4D masks too

__all__ = ["CacheTooSmall", "DecodeEngine", "PrefixCache", "Request", "SlotCache", "cache_dtype", "supports_engine"]

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
    return kv_shape(model.config) is not None


class DecodeEngine:
    """Runs requests with continuous batching; one engine per model, driven from one thread at a time.

    Two ways to drive it: `run` / `run_each(requests)` for a known list (eval, bulk generation), or
    `submit(request)` + `step()` in a loop for requests that keep arriving (the server's scheduler).
    `capacity`: a fixed KV cache of `slots x capacity` tokens, allocated now and never grown (a GPU
    server's budget, adgen.generation.kv_budget); None: the cache grows with the longest request.
    `batch_prefill`: prefill the requests admitted in one step in one padded forward ("auto": when the
    model is on CUDA; True / False force it; an integer N: when at least N requests wait, as a server under
    load on a CPU wants; see the module docstring).
    """

    def __init__(self, model, tokenizer, stop_ids: Sequence[int], *, slots: int = 16,
                 prefix_cache: PrefixCache | None = None, capacity: int | None = None,
                 batch_prefill: bool | str | int = "auto") -> None:
        shape = kv_shape(model.config) if getattr(model, "config", None) is not None else None
        if shape is None or not supports_engine(model):
            raise ValueError("this model needs model.generate (see adgen.generation.engine.supports_engine)")
        if batch_prefill not in ("auto", True, False) and not (type(batch_prefill) is int and batch_prefill >= 2):
            raise ValueError(f"batch_prefill must be 'auto', True, False or a queue length >= 2, not {batch_prefill!r}")
        self.model = model
        # requests admitted together prefilled in one padded forward (per prefix length and adapter): on a
        # GPU one forward instead of one per request. "auto": on CUDA only -- other GEMM shapes change last
        # bits, and on the CPU the engine keeps its exact equality with one-request-at-a-time generation
        if batch_prefill == "auto":
            batch_prefill = next(model.parameters()).device.type == "cuda"
        # the fewest waiting requests prefilled together (0: never; 1: always)
        self.batch_prefill_min = int(batch_prefill) if type(batch_prefill) is int else (1 if batch_prefill else 0)
        self.tokenizer = tokenizer
        self.stop_ids = [int(i) for i in stop_ids]
        self.slots = max(1, int(slots))
        self._prefiller = Prefiller(model, prefix_cache)
        self._layers, self._kv_heads, self._head_dim = shape
        self._cache: SlotCache | None = None
        self._waiting: deque[Request] = deque()
        self._running: list[RunningRequest] = []
        self.steps = 0  # decode steps run (each one forward of the running batch)
        self.prompt_tokens = 0  # prompt tokens of the requests run
        self.max_running = 0  # the largest batch a step ran
        self.fixed_capacity = int(capacity) if capacity is not None else None
        if self.fixed_capacity is not None:
            self.reserve(self.fixed_capacity)  # claimed now: a server's memory is known from the start

    @property
    def prefix_cache(self) -> PrefixCache:
        return self._prefiller.prefix_cache

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
                    seq.request.result = seq.result()
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

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens computed (the prefix cache's share is not)."""
        return self._prefiller.tokens

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

    def _release(self, slot: int) -> None:
        running = self._running
        last = len(running) - 1
        if slot != last:
            self._cache.move(last, slot, running[last].length)  # type: ignore[union-attr]
            running[slot] = running[last]
        running.pop()

    # ---- the cache ------------------------------------------------------------------------------
    def _limit(self, request: Request) -> int:
        """Tokens the request may generate: its max_new_tokens, or what its config sizes from the tokenizer."""
        return int(request.config.for_tokenizer(self.tokenizer).max_new_tokens)  # type: ignore[arg-type]

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

    # ---- admission: waiting requests into free slots ----------------------------------------------
    def _admit_waiting(self, finished: list[Request]) -> None:
        """Waiting requests into free slots; one whose own prefill or settings fail ends alone."""
        if self.batch_prefill_min and len(self._waiting) >= self.batch_prefill_min:
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

    def _start(self, request: Request) -> torch.Tensor:
        """Room in the cache for a request about to be prefilled; its prompt ids on the device (its one copy)."""
        cache = self.reserve(self._needed(request))
        self.prompt_tokens += len(request.prompt_ids)
        return torch.tensor(request.prompt_ids, dtype=torch.long, device=cache.device)

    def _running_state(self, request: Request, device) -> RunningRequest:
        """A newly prefilled request's decoding state: repetition control, processors, seeded generator."""
        config = request.config
        table = token_table(self.tokenizer)
        return RunningRequest(
            request=request, length=len(request.prompt_ids), limit=self._limit(request), tokenizer=self.tokenizer,
            stop_ids=self.stop_ids,
            repeat=RepeatState(table, config, self.stop_ids, attributes_for(table, config, request.prompt_ids))
            if config.controls_repetition else None,
            processors=sampling_processors(config), warpers=sampling_warpers(config), rng=_rng(config, device),
        )

    def _admit(self, request: Request, slot: int) -> RunningRequest | None:
        if request.cancelled_before_start():
            return None
        prompt = self._start(request)
        logits, layer_kv = self._prefiller.prefill(request.prompt_ids, prompt, request.adapter)
        self._cache.put(slot, layer_kv)  # type: ignore[union-attr]
        self._cache.set_prompt(slot, prompt)  # type: ignore[union-attr]
        seq = self._running_state(request, logits.device)
        self._choose([seq], logits.unsqueeze(0), slot)
        return None if request.done else seq

    def _admit_batch(self, requests: list[Request], finished: list[Request]) -> None:
        """Prefill `requests` (admitted together) with one forward per (prefix length, adapter) group and
        put them into the slots after the running ones (in the order given). A request whose own part
        fails (cache, settings, callback, its prefill) ends alone."""
        plans: list[tuple[Request, torch.Tensor]] = []  # (request, its prompt on the device)
        for request in requests:
            if request.cancelled_before_start():
                finished.append(request)
                continue
            try:
                prompt = self._start(request)
                self._prefiller.plan_prefix(request.prompt_ids, prompt, request.adapter)
            except Exception as e:
                request.error = e
                finished.append(request)
                continue
            plans.append((request, prompt))
        # every prefix these prompts start is cached now (the first prompt of a run uses the one it shares with
        # the second, so all of them land in one group)
        outcomes = self._prefiller.prefill_together([(r.prompt_ids, p, r.adapter) for r, p in plans])
        seqs, scores = [], []
        for (request, prompt), outcome in zip(plans, outcomes):
            if isinstance(outcome, BaseException):  # its prefill failed, also on its own
                request.error = outcome
                finished.append(request)
                continue
            logits, layer_kv = outcome
            try:
                seq = self._running_state(request, logits.device)
            except Exception as e:
                request.error = e
                finished.append(request)
                continue
            slot = len(self._running) + len(seqs)
            self._cache.put(slot, layer_kv)  # type: ignore[union-attr]
            self._cache.set_prompt(slot, prompt)  # type: ignore[union-attr]
            seqs.append(seq)
            scores.append(logits)
        if seqs:
            self._start_running(seqs, scores, finished)

    def _start_running(self, seqs: list[RunningRequest], scores: list[torch.Tensor], finished: list[Request]) -> None:
        """The first tokens of requests prefilled together (in the slots after the running ones): those that go
        on join the running rows, kept in slots 0..B-1."""
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
        # a row that ended on its first token gives its slot to the next
        if len(self._running) - first != len(seqs):
            slot = first
            for i, seq in enumerate(seqs):
                if not seq.request.done:
                    if first + i != slot:
                        self._cache.move(first + i, slot, seq.length)  # type: ignore[union-attr]
                    slot += 1

    # ---- one decode step -----------------------------------------------------------------------
    def _step(self, running: list[RunningRequest]) -> None:
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
                         **adapter_kwargs(self.model, [s.request.adapter for s in running]),
                         **{self._prefiller.cache_kw: cache})
        self.steps += 1
        self.max_running = max(self.max_running, rows)
        logits = out.logits[:, -1].float()
        positions += 1  # in place: every row's new token is in the cache now
        for seq in running:
            seq.length += 1
        self._choose(running, logits, 0)

    def _choose(self, seqs: list[RunningRequest], scores: torch.Tensor, first_slot: int) -> None:
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
        assert cache is not None
        end = first_slot + len(seqs)
        cache.tokens[first_slot:end].scatter_(1, cache.lengths[first_slot:end].unsqueeze(1), chosen.unsqueeze(1))
        ids = chosen.tolist()  # the one device -> host copy
        for i, seq in enumerate(seqs):
            if i not in failed:
                try:
                    seq.record(ids[i])
                    continue
                except Exception as e:
                    failed[i] = e
            seq.request.error = failed[i]

    def _shape_scores(self, seqs: list[RunningRequest], scores: torch.Tensor, first_slot: int,
                      failed: dict[int, BaseException]) -> None:
        """Each row's token processors, the character-level control (all rows at once), each row's warpers:
        `model.generate`'s order (its processors, the custom ones, then the warpers)."""
        self._row_processors(seqs, scores, first_slot, failed, "processors")
        shaping = []
        for i, seq in enumerate(seqs):
            if seq.repeat is not None and seq.request.config.shapes_logits and i not in failed:
                try:
                    shaping.append(row_shaping(i, seq.repeat, scores.shape[-1]))
                except Exception as e:
                    failed[i] = e
        apply_shaping(scores, shaping)
        self._row_processors(seqs, scores, first_slot, failed, "warpers")

    def _row_processors(self, seqs: list[RunningRequest], scores: torch.Tensor, first_slot: int,
                        failed: dict[int, BaseException], kind: str) -> None:
        tokens = self._cache.tokens  # type: ignore[union-attr]
        for i, seq in enumerate(seqs):
            procs = getattr(seq, kind)
            if procs is not None and i not in failed:
                try:
                    history = tokens[first_slot + i : first_slot + i + 1, : seq.length]  # prompt + generated
                    scores[i : i + 1] = procs(history, scores[i : i + 1])
                except Exception as e:
                    failed[i] = e
