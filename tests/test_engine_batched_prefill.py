"""Batched prefill (DecodeEngine(batch_prefill=True)): requests admitted in the same step are prefilled in one
padded forward per (prefix length, adapter) group; same first-token logits and prompt K/V as one request at
a time (up to fp32 rounding), same greedy texts, one forward instead of N; "auto" keeps the CPU exact path."""

from __future__ import annotations

import pytest
import torch

from adgen.generation import DecodingConfig, load_generator
from adgen.generation.engine import DecodeEngine, PrefixCache, Request
from tests.test_generation import PLAIN, PROMPTS

# six prompts of different lengths (the chat header + system prompt shared by all)
PROMPTS6 = [*PROMPTS, "类型#上衣*颜色#白色*风格#简约*衣样式#卫衣"]
# fp32: a row's logits differ from the one-at-a-time forward by GEMM-shape rounding (~1e-6 of their scale
# over these few hundred-term dot products); 1e-4 of the scale leaves room and still catches a wrong mask
# or position (those move logits by O(scale))
REL_TOL = 1e-4
SHARED = [p for p in PROMPTS6 if isinstance(p, str)]  # the five that share the system prompt


@pytest.fixture(scope="module")
def gen(tiny_llama3_dir):
    return load_generator(str(tiny_llama3_dir), dtype="fp32", device="cpu", batch_size=2)


def _engine(gen, batch_prefill, slots=6, **kw):
    return DecodeEngine(gen.model, gen.tokenizer, gen.stop_token_ids, slots=slots, batch_prefill=batch_prefill, **kw)


def _requests(gen, config, prompts=PROMPTS6):
    return [Request(gen.prompt_ids(p), config) for p in prompts]


class _Forwards:
    """Counts the model's forward calls."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1

    def close(self):
        self._handle.remove()


def _first_step(engine, requests):
    """Submit all, run one step (admission + one decode step): the first-token scores each request's
    prefill gave (by request), and the engine."""
    scores: dict[int, torch.Tensor] = {}
    real_choose, steps = engine._choose, engine.steps

    def choose(seqs, s, first_slot):
        if engine.steps == steps:  # the prefill's choice (before any decode step)
            for i, seq in enumerate(seqs):
                scores[id(seq.request)] = s[i].clone()
        return real_choose(seqs, s, first_slot)

    engine._choose = choose
    for r in requests:
        engine.submit(r)
    engine.step()
    return scores


def test_first_token_logits_and_prompt_kv_equal_one_at_a_time(gen):
    config = gen.resolve(DecodingConfig(max_new_tokens=4, **PLAIN))
    single, batched = _engine(gen, False), _engine(gen, True)
    ref_reqs, new_reqs = _requests(gen, config), _requests(gen, config)
    ref, new = _first_step(single, ref_reqs), _first_step(batched, new_reqs)
    assert len(ref) == len(new) == 6
    for a, b in zip(ref_reqs, new_reqs):
        x, y = ref[id(a)], new[id(b)]
        assert (x - y).abs().max() <= REL_TOL * x.abs().max(), (x - y).abs().max()
        assert x.argmax() == y.argmax()
    # the prompt's K/V in each request's slot
    assert single.running == batched.running == 6
    for slot in range(6):
        sa, sb = single._running[slot], batched._running[slot]
        assert sa.request.prompt_ids == sb.request.prompt_ids
        n = len(sa.request.prompt_ids)
        for layer in range(len(single._cache.keys)):
            for ka, kb in ((single._cache.keys[layer], batched._cache.keys[layer]),
                           (single._cache.values[layer], batched._cache.values[layer])):
                a, b = ka[slot, :, :n], kb[slot, :, :n]
                assert (a - b).abs().max() <= REL_TOL * a.abs().max()
        assert torch.equal(single._cache.tokens[slot, : n + 1], batched._cache.tokens[slot, : n + 1])
    assert batched.stats()["prefix_tokens_saved"] > single.stats()["prefix_tokens_saved"] > 0


@pytest.mark.parametrize("config", [DecodingConfig(max_new_tokens=14, **PLAIN), DecodingConfig(max_new_tokens=14)],
                         ids=["plain greedy", "default (char DRY + loop detection)"])
def test_greedy_texts_equal_one_at_a_time(gen, config):
    """On this tiny model and these prompts no near-tie flips (checked: every token equal)."""
    config = gen.resolve(config)
    ref = _engine(gen, False).run(_requests(gen, config))
    out = _engine(gen, True).run(_requests(gen, config))
    assert [g.token_ids for g in out] == [g.token_ids for g in ref]
    assert out == ref


def test_rows_that_end_on_their_first_token_and_slots_that_free_up(gen):
    """Different limits (some end on the prefill's token), fewer slots than requests: joins as rows leave."""
    reqs = lambda: [Request(gen.prompt_ids(p), gen.resolve(DecodingConfig(max_new_tokens=n, **PLAIN)))
                    for p, n in zip(PROMPTS6, [1, 5, 1, 8, 3, 6])]
    ref = _engine(gen, False, slots=4).run(reqs())
    out = _engine(gen, True, slots=4).run(reqs())
    assert [g.token_ids for g in out] == [g.token_ids for g in ref]
    assert [g.completion_tokens for g in out] == [1, 5, 1, 8, 3, 6]


def _prefill_forwards(gen, batch_prefill, prompts, *, warm, **kw):
    """Model forwards of one admission of `prompts` (all at once), less the step's decode forward."""
    config = gen.resolve(DecodingConfig(max_new_tokens=4, **PLAIN))
    engine = _engine(gen, batch_prefill, **kw)
    if warm:  # the shared start is cached already (a server after its first requests)
        engine.run(_requests(gen, config, PROMPTS6[:2]))
    forwards, steps = _Forwards(gen.model), engine.steps
    try:
        scores = _first_step(engine, _requests(gen, config, prompts))
    finally:
        forwards.close()
    assert engine.steps == steps + 1 and engine.running == len(prompts) == len(scores)
    return forwards.calls - 1


@pytest.mark.parametrize("prefix", ["warm", "none", "cold"])
def test_one_prefill_forward_for_the_requests_admitted_together(gen, prefix):
    kw = {"prefix_cache": PrefixCache(min_prefix=10**9)} if prefix == "none" else {}
    counts = {bp: _prefill_forwards(gen, bp, SHARED, warm=prefix == "warm", **kw) for bp in (False, True)}
    # cold: the shared start (found between prompts 1 and 2) is computed once first, then one forward for all
    assert counts == {False: 5 + (prefix == "cold"), True: 1 + (prefix == "cold")}


def test_one_forward_per_prefix_length(gen):
    """The chat-message prompt has no system prompt (no cached prefix): it is a group of its own."""
    assert _prefill_forwards(gen, True, PROMPTS6, warm=True) == 2
    assert _prefill_forwards(gen, True, PROMPTS6, warm=False, prefix_cache=PrefixCache(min_prefix=10**9)) == 1


def test_auto_keeps_one_at_a_time_on_the_cpu(gen):
    assert DecodeEngine(gen.model, gen.tokenizer, gen.stop_token_ids).batch_prefill_min == 0  # never
    assert _engine(gen, "auto").batch_prefill_min == 0 and _engine(gen, True).batch_prefill_min == 1
    assert _engine(gen, 4).batch_prefill_min == 4  # a server under load: once 4 requests wait
    for bad in ("yes", 1.5, -2):
        with pytest.raises(ValueError):
            _engine(gen, bad)
    config = gen.resolve(DecodingConfig(max_new_tokens=4, **PLAIN))
    engine = DecodeEngine(gen.model, gen.tokenizer, gen.stop_token_ids, slots=6)
    engine.run(_requests(gen, config, PROMPTS6[:2]))
    forwards = _Forwards(gen.model)
    try:
        _first_step(engine, _requests(gen, config, SHARED))
    finally:
        forwards.close()
    assert forwards.calls - 1 == 5  # one prefill forward per request, as before


def test_a_request_that_breaks_the_batched_forward_fails_alone(gen):
    """A token id outside the vocabulary breaks the group's forward: each request is then prefilled on its
    own, so the bad one alone fails and the others give what they give one at a time."""
    config = gen.resolve(DecodingConfig(max_new_tokens=6, **PLAIN))
    ref = _engine(gen, False).run(_requests(gen, config, PROMPTS6[:3]))
    good = _requests(gen, config, PROMPTS6[:3])
    bad = Request(gen.prompt_ids(PROMPTS6[3])[:-1] + [10**8], config)
    engine = _engine(gen, True)
    for r in [good[0], bad, *good[1:]]:
        engine.submit(r)
    finished = []
    while engine.busy:
        finished += engine.step()
    assert isinstance(bad.error, IndexError) and bad.result is None
    assert all(r.error is None for r in good)
    assert [r.result.token_ids for r in good] == [g.token_ids for g in ref]
    assert len(finished) == 4


def test_requests_for_different_adapters_prefill_per_adapter(tiny_llama3_dir, tiny_llama3_lora_dir,
                                                             tiny_llama3_lora_b_dir):
    """Each adapter's requests are one group (its own prefix cache, its own weights): same tokens as the
    one-at-a-time engine, for "default", a second adapter, the base model and the active one (None)."""
    g = load_generator(str(tiny_llama3_dir), adapter=str(tiny_llama3_lora_dir), dtype="fp32", device="cpu", batch_size=3)
    g.model.load_adapter(str(tiny_llama3_lora_b_dir), adapter_name="b")
    config = g.resolve(DecodingConfig(max_new_tokens=8, **PLAIN))
    adapters = ["default", "b", "__base__", "b", None, "__base__", "default", "b"]
    prompts = [SHARED[i % len(SHARED)] for i in range(len(adapters))]

    def run(batch_prefill):
        reqs = [Request(g.prompt_ids(p), config, adapter=a) for p, a in zip(prompts, adapters)]
        DecodeEngine(g.model, g.tokenizer, g.stop_token_ids, slots=8, batch_prefill=batch_prefill).run(reqs)
        return [r.result.token_ids for r in reqs]

    ref = run(False)
    assert run(True) == ref
    assert len({tuple(t) for t in ref[:3]}) == 3  # the adapters really differ


def test_a_queue_length_threshold_batches_only_under_load(gen):
    """batch_prefill=N (a server on a CPU): fewer than N waiting are prefilled one by one (exactly as alone),
    N or more in one forward."""
    assert len(SHARED) == 5
    assert _prefill_forwards(gen, 6, SHARED, warm=True) == 5  # 5 waiting < 6: one forward each
    assert _prefill_forwards(gen, 5, SHARED, warm=True) == 1  # 5 waiting >= 5: one forward for all
