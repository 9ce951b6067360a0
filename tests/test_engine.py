"""Continuous batching (adgen.generation.engine): same outputs as model.generate, requests join and
leave between steps, the shared prompt start is computed once, cancellation frees a slot."""

from __future__ import annotations

import threading

import pytest

from adgen.generation import DecodingConfig, load_generator
from adgen.generation.engine import DecodeEngine, PrefixCache, Request, supports_engine
from tests.test_generation import PLAIN, PROMPTS

CONFIGS = {
    "plain greedy": DecodingConfig(max_new_tokens=14, **PLAIN),
    "default (char DRY + loop detection)": DecodingConfig(max_new_tokens=14),
    "token n-gram ban + repetition penalty": DecodingConfig(max_new_tokens=14, no_repeat_ngram_size=2,
                                                            repetition_penalty=1.3, **PLAIN),
    "top_k=1 sampling": DecodingConfig(max_new_tokens=14, do_sample=True, top_k=1, temperature=0.7, seed=3),
}


@pytest.fixture(scope="module")
def gen(tiny_llama3_dir):
    return load_generator(str(tiny_llama3_dir), dtype="fp32", device="cpu", batch_size=2)


def _old_path(gen, prompts, config):
    """One prompt per model.generate call: the reference the engine must equal."""
    gen.continuous = False
    try:
        return [gen.generate([p], config)[0] for p in prompts]
    finally:
        gen.continuous = True


def test_the_tiny_llama_runs_on_the_engine(gen):
    assert supports_engine(gen.model) and gen.uses_engine


@pytest.mark.parametrize("name", list(CONFIGS))
def test_continuous_batching_equals_one_at_a_time(gen, name):
    config = CONFIGS[name]
    reference = _old_path(gen, PROMPTS, config)
    for slots in (1, 2, 5):  # 2: requests join as others leave; 5: all at once
        gen.batch_size = slots
        try:
            out = gen.generate(PROMPTS, config)
        finally:
            gen.batch_size = 2
        assert [g.token_ids for g in out] == [r.token_ids for r in reference], (name, slots)
        assert out == reference
    assert gen.last_engine_stats["prefix_tokens_saved"] > 0  # the chat header + system prompt, shared


def test_a_request_without_a_limit_gets_the_configs_own_sizing(gen):
    """max_new_tokens=None: the limit (and the cache it reserves) is what DecodingConfig sizes from the tokenizer,
    as `generate` resolves it -- not a number of the engine's own."""
    from adgen.generation.config import max_new_tokens_for

    engine = DecodeEngine(gen.model, gen.tokenizer, gen.stop_token_ids, slots=1)
    prompt = gen.prompt_ids(PROMPTS[0])
    open_ended = Request(prompt, DecodingConfig(**PLAIN))
    assert engine._needed(open_ended) == len(prompt) + max_new_tokens_for(gen.tokenizer) + 1
    assert engine._needed(open_ended) == engine._needed(Request(prompt, gen.resolve(DecodingConfig(**PLAIN))))
    assert engine._needed(Request(prompt, DecodingConfig(max_new_tokens=3, **PLAIN))) == len(prompt) + 4


def test_requests_join_when_others_leave(gen):
    """A short request leaves after 2 tokens; the waiting one starts in its slot at the next step, so
    the run takes (longest request) + (what the late one needs) steps, not a batch per pair."""
    limits = [2, 12, 12]
    reqs = [Request(gen.prompt_ids(p), gen.resolve(DecodingConfig(max_new_tokens=n, **PLAIN)))
            for p, n in zip(PROMPTS, limits)]
    engine = DecodeEngine(gen.model, gen.tokenizer, gen.stop_token_ids, slots=2)
    out = engine.run(reqs)
    assert [g.completion_tokens for g in out] == limits
    # the first token of each request comes from its prefill; request 3 joins after step 1
    assert engine.steps == 1 + 11
    singles = [_old_path(gen, [p], r.config)[0] for p, r in zip(PROMPTS, reqs)]
    assert [g.token_ids for g in out] == [s.token_ids for s in singles]


def test_prefix_cache_computes_the_shared_start_once_and_changes_nothing(gen):
    config = gen.resolve(DecodingConfig(max_new_tokens=6, **PLAIN))
    prompts = [gen.prompt_ids(p) for p in PROMPTS if isinstance(p, str)]
    cached = DecodeEngine(gen.model, gen.tokenizer, gen.stop_token_ids, slots=2)
    plain = DecodeEngine(gen.model, gen.tokenizer, gen.stop_token_ids, slots=2, prefix_cache=PrefixCache(min_prefix=10**9))
    a = cached.run([Request(p, config) for p in prompts])
    b = plain.run([Request(p, config) for p in prompts])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    shared = len(cached.prefix_cache.entries and next(iter(cached.prefix_cache.entries)))
    assert shared > 20  # the Llama-3 header + the default system prompt
    # computed: the first prompt whole, the shared start once more, then only what follows it
    assert cached.prefill_tokens == len(prompts[0]) + shared + sum(len(p) - shared for p in prompts[1:])
    assert plain.prefill_tokens == sum(len(p) for p in prompts)


def test_a_cancelled_request_leaves_within_one_step_and_the_others_go_on(gen):
    config = gen.resolve(DecodingConfig(max_new_tokens=16, **PLAIN))
    cancel = threading.Event()
    seen: list[int] = []

    def on_tokens(ids):
        seen.extend(ids)
        if len(seen) == 3:
            cancel.set()  # what a disconnecting client does

    reqs = [Request(gen.prompt_ids(PROMPTS[0]), config, cancel=cancel, on_tokens=on_tokens),
            Request(gen.prompt_ids(PROMPTS[1]), config), Request(gen.prompt_ids(PROMPTS[3]), config)]
    engine = DecodeEngine(gen.model, gen.tokenizer, gen.stop_token_ids, slots=2)
    out = engine.run(reqs)
    assert out[0].finish_reason == "cancelled" and len(seen) == 3 and out[0].completion_tokens == 3
    singles = _old_path(gen, [PROMPTS[1], PROMPTS[3]], config)
    assert [g.token_ids for g in out[1:]] == [s.token_ids for s in singles]
    assert engine.steps == 2 + 15  # the third request took the cancelled one's slot at once
    pre = Request(gen.prompt_ids(PROMPTS[0]), config)
    pre.cancel.set()
    assert engine.run([pre])[0].finish_reason == "cancelled"  # cancelled while waiting: never run


def test_models_the_engine_cannot_drive_keep_model_generate(tiny_llama3_dir):
    g = load_generator(str(tiny_llama3_dir), dtype="fp32", device="cpu", batch_size=2)
    g.model.config._attn_implementation = "flash_attention_2"  # no 4D masks there
    assert not supports_engine(g.model) and not g.uses_engine
    with pytest.raises(ValueError, match="model.generate"):
        DecodeEngine(g.model, g.tokenizer, g.stop_token_ids)


def test_generate_each_yields_every_prompt_once_as_it_finishes(gen):
    """`adgen eval` writes each record as it ends: short requests come back before long ones."""
    configs = DecodingConfig(max_new_tokens=10, **PLAIN)
    whole = gen.generate(PROMPTS, configs)
    gen.batch_size = 5
    try:
        got = list(gen.generate_each(PROMPTS, configs))
        stop = (gen.tokenizer.decode(whole[1].token_ids[2:4]),)  # prompt 1 now ends after 4 tokens
        order = [i for i, _ in gen.generate_each(PROMPTS, configs.replace(stop=stop))]
    finally:
        gen.batch_size = 2
    assert sorted(i for i, _ in got) == list(range(len(PROMPTS)))
    assert [g for _, g in sorted(got, key=lambda x: x[0])] == whole
    assert order[0] == 1 and sorted(order) == list(range(len(PROMPTS)))


def test_the_engine_under_training_s_packed_attention_equals_sdpa(tiny_llama3_dir):
    """Generation metrics during training run the engine on a model switched to adgen's packed attention;
    a prefix-cached prefill there (fewer queries than keys) must see the whole prefix."""
    from adgen.train.packed_attention import enable_packed_attention

    sdpa = load_generator(str(tiny_llama3_dir), dtype="fp32", device="cpu", batch_size=2)
    packed = load_generator(str(tiny_llama3_dir), dtype="fp32", device="cpu", batch_size=2)
    assert enable_packed_attention(packed.model) and packed.uses_engine
    config = DecodingConfig(max_new_tokens=8, **PLAIN)
    a, b = sdpa.generate(PROMPTS, config), packed.generate(PROMPTS, config)
    assert packed.last_engine_stats["prefix_tokens_saved"] > 0
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_requests_submitted_while_others_run_join_between_steps(gen):
    """The server's way to drive the engine: submit() at any time, step() in a loop. A request longer
    than any before grows the cache without disturbing the rows already running."""
    config = gen.resolve(DecodingConfig(max_new_tokens=12, **PLAIN))
    long_config = gen.resolve(DecodingConfig(max_new_tokens=300, **PLAIN))
    engine = DecodeEngine(gen.model, gen.tokenizer, gen.stop_token_ids, slots=3)
    first = Request(gen.prompt_ids(PROMPTS[0]), config)
    engine.submit(first)
    done = []
    for _ in range(4):
        done += engine.step()
    capacity = engine._cache.capacity
    late = [Request(gen.prompt_ids(PROMPTS[1]), long_config), Request(gen.prompt_ids(PROMPTS[2]), config)]
    for r in late:
        engine.submit(r)
    assert engine.waiting == 2 and engine.running == 1
    done += engine.step()
    assert engine.running == 3 and engine._cache.capacity > capacity  # both joined; the cache grew
    while engine.busy:
        done += engine.step()
    assert {id(r) for r in done} == {id(first), *(id(r) for r in late)}
    singles = _old_path(gen, [PROMPTS[0], PROMPTS[1], PROMPTS[2]], config)
    assert first.result.token_ids == singles[0].token_ids
    assert late[1].result.token_ids == singles[2].token_ids
    long_single = _old_path(gen, [PROMPTS[1]], long_config)[0]
    assert late[0].result.token_ids == long_single.token_ids


def test_requests_for_different_adapters_decode_in_one_batch(tiny_llama3_dir, tiny_llama3_lora_dir,
                                                             tiny_llama3_lora_b_dir):
    """PEFT's mixed-adapter forward: adapter "default", a second adapter and the base model in one batch,
    each output equal to that adapter (or the base) run alone."""
    g = load_generator(str(tiny_llama3_dir), adapter=str(tiny_llama3_lora_dir), dtype="fp32", device="cpu", batch_size=3)
    g.model.load_adapter(str(tiny_llama3_lora_b_dir), adapter_name="b")
    config = g.resolve(DecodingConfig(max_new_tokens=10, **PLAIN))
    adapters = ["default", "b", "__base__", "b", None, "__base__"]
    reqs = [Request(g.prompt_ids(PROMPTS[i % len(PROMPTS)]), config, adapter=a) for i, a in enumerate(adapters)]
    engine = DecodeEngine(g.model, g.tokenizer, g.stop_token_ids, slots=3)
    engine.run(reqs)
    assert engine.max_running == 3

    def alone(name, prompt):
        if name == "__base__":
            with g.model.disable_adapter():
                return _old_path(g, [prompt], config)[0]
        g.model.set_adapter(name or "default")
        try:
            return _old_path(g, [prompt], config)[0]
        finally:
            g.model.set_adapter("default")

    expected = [alone(a, PROMPTS[i % len(PROMPTS)]) for i, a in enumerate(adapters)]
    assert [r.result.token_ids for r in reqs] == [e.token_ids for e in expected]
    assert len({tuple(e.token_ids) for e in expected[:3]}) == 3  # the three really differ
