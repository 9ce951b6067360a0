"""The generation engine: batching, stopping, UTF-8 safety, streaming, cancellation, sampling, adapters."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from adgen.errors import AdgenError, ConfigError
from adgen.generation import DecodingConfig, Generation, HFGenerator, IncrementalDecoder, load_generator

EOT, EOS = 128009, 128001  # <|eot_id|>, <|end_of_text|>
HAO, KAN, DE = 53901, 52030, 9554  # 好 看 的: one token each
LONG_CHAR = "龘"  # two byte-level tokens in the Llama-3 vocabulary: 84012, 246
# the engine's own behaviour on models built to loop: repetition control and loop detection off
PLAIN = {"dry_multiplier": 0.0, "loop_detection": False}

PROMPTS = [
    "类型#裙*颜色#黑色",
    "类型#上衣*版型#宽松*版型#显瘦*图案#线条*衣样式#衬衫*衣袖型#泡泡袖*衣款式#抽绳",
    [{"role": "user", "content": "写一句广告"}],
    "类型#裤*材质#牛仔布*风格#街头*裤长#九分裤",
    "类型#裙",
]


# ---- helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_llama3_dir):
    from adgen.models import load_tokenizer

    return load_tokenizer(str(tiny_llama3_dir))


@pytest.fixture(scope="module")
def tiny_gen(tiny_llama3_dir):
    return load_generator(str(tiny_llama3_dir), dtype="fp32", device="cpu", batch_size=2)


def chain_model(model_dir, chain, end_id):
    """A tiny Llama that deterministically emits `chain` then `end_id`, then starts over.

    The layers' output projections are zeroed, so the last hidden state is the current token's
    embedding: every token embeds to direction 0 except chain[k-1], which embeds to direction k.
    lm_head maps direction 0 -> chain[0] and direction k -> chain[k] (or end_id after the last).
    It stops only because the engine stops on the model's own end-of-turn token.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert len(set(chain)) == len(chain) and len(chain) < model.config.hidden_size
    seq = list(chain) + [end_id]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        head.zero_()
        head[seq[0], 0] = 10.0
        for k, t in enumerate(chain, start=1):
            emb[t].zero_()
            emb[t, k] = 1.0
            head[seq[k], k] = 10.0
    return model.eval()


def make_gen(model, tok, formatter=None, **kw):
    from adgen.data.chat import ChatFormatter

    return HFGenerator(model, tok, formatter or ChatFormatter(tok), **kw)


class OnlyEosFormatter:
    """The classic bug: stopping only on the tokenizer's eos (128001), not on <|eot_id|>."""

    def __init__(self, tok):
        from adgen.data.chat import ChatFormatter

        self._f = ChatFormatter(tok)

    def __getattr__(self, name):
        return getattr(self._f, name)

    @property
    def stop_token_ids(self):
        return [EOS]


# ---- DecodingConfig ---------------------------------------------------------------------------
def test_decoding_config_defaults_and_validation():
    c = DecodingConfig()
    assert c.max_new_tokens is None and c.greedy and c.stop == ()  # None: sized from the tokenizer
    assert DecodingConfig(stop=["。", ""]).stop == ("。",)
    assert DecodingConfig(stop="x").stop == ("x",)
    assert DecodingConfig(do_sample=True, temperature=0).greedy  # OpenAI convention
    assert not DecodingConfig(do_sample=True, temperature=0.7).greedy
    for bad in ({"max_new_tokens": 0}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -1}, {"top_k": -1},
                {"repetition_penalty": 0}, {"no_repeat_ngram_size": -1}, {"no_repeat_ngram_size": 2.5}):
        with pytest.raises(ConfigError):
            DecodingConfig(**bad)


def test_generation_config_is_fully_ours(tiny_gen):
    g = tiny_gen.generation_config(DecodingConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=5,
                                                   repetition_penalty=1.3, max_new_tokens=7))
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.max_new_tokens) == (
        True, 0.7, 0.8, 5, 1.3, 7)
    assert sorted(g.eos_token_id) == [EOS, EOT] and g.use_cache and g.num_beams == 1
    assert tiny_gen.generation_config(DecodingConfig()).do_sample is False


# ---- prompts --------------------------------------------------------------------------------
def test_load_generator_attributes_and_prompt(tiny_gen, tiny_llama3_dir):
    g = tiny_gen
    assert g.backend == "hf" and g.adapter is None and g.model_name == str(tiny_llama3_dir)
    assert str(g.device) == "cpu" and g.tokenizer is g.formatter.tokenizer
    assert sorted(g.stop_token_ids) == [EOS, EOT]  # both Llama-3 end ids
    ids = g.prompt_ids("类型#裙")
    assert ids[0] == 128000 and ids[1] != 128000  # one BOS
    text = g.tokenizer.decode(ids)
    assert "<|start_header_id|>system" in text and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # a message list is used as is (no system prompt added)
    chat = g.tokenizer.decode(g.prompt_ids([{"role": "user", "content": "你好"}]))
    assert "system" not in chat and "你好" in chat


def test_no_system_prompt(tiny_llama3_dir):
    g = load_generator(str(tiny_llama3_dir), dtype="fp32", device="cpu", system_prompt=None)
    assert "system" not in g.tokenizer.decode(g.prompt_ids("类型#裙"))


def test_generate_rejects_a_bare_prompt(tiny_gen):
    with pytest.raises(TypeError, match="wrap a single prompt"):
        tiny_gen.generate("类型#裙", DecodingConfig(max_new_tokens=2))
    with pytest.raises(TypeError):
        tiny_gen.generate([{"role": "user", "content": "x"}], DecodingConfig(max_new_tokens=2))
    assert tiny_gen.generate([], DecodingConfig()) == []


# ---- batching -------------------------------------------------------------------------------
def test_batched_equals_one_at_a_time(tiny_gen):
    cfg = DecodingConfig(max_new_tokens=16, coverage_bonus_per_char=0, coverage_hold_chars=0,
                         word_repeat_penalty=0)  # batching, not shaping, is under test
    lengths = {len(tiny_gen.prompt_ids(p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # really different lengths: padding is exercised
    singles = [tiny_gen.generate([p], cfg)[0] for p in PROMPTS]
    for bs in (2, 5):
        tiny_gen.batch_size = bs
        try:
            batched = tiny_gen.generate(PROMPTS, cfg)
        finally:
            tiny_gen.batch_size = 2
        assert [b.token_ids for b in batched] == [s.token_ids for s in singles]
        assert [b.text for b in batched] == [s.text for s in singles]
        assert [b.prompt_tokens for b in batched] == [len(tiny_gen.prompt_ids(p)) for p in PROMPTS]
    # the random model does not stop by itself within 16 tokens: distinct, full-length outputs
    assert all(s.finish_reason == "length" and s.completion_tokens == 16 for s in singles)
    assert len({s.text for s in singles}) > 1
    # random byte tokens never leave broken characters in the text
    assert all("\ufffd" not in s.text for s in singles)


def test_batches_are_length_sorted(tiny_gen, monkeypatch):
    """Without continuous batching (models the engine cannot drive): length-sorted left-padded batches."""
    monkeypatch.setattr(tiny_gen, "continuous", False)
    widths = []
    orig = tiny_gen._generate_batch

    def spy(batch, config, cancel=None):
        widths.append([len(x) for x in batch])
        return orig(batch, config, cancel)

    monkeypatch.setattr(tiny_gen, "_generate_batch", spy)
    tiny_gen.generate(PROMPTS, DecodingConfig(max_new_tokens=1))
    flat = [w for b in widths for w in b]
    assert flat == sorted(flat, reverse=True) and [len(b) for b in widths] == [2, 2, 1]


def test_model_generation_config_does_not_leak(tiny_llama3_dir, tok):
    """A model whose generation_config says sample (Llama-3 Instruct does) still decodes greedily."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32).eval()
    gen = make_gen(model, tok)
    cfg = DecodingConfig(max_new_tokens=12)
    before = gen.generate(PROMPTS[:2], cfg)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 5.0
    model.generation_config.top_k = 0
    after = [gen.generate(PROMPTS[:2], cfg) for _ in range(2)]
    assert [g.token_ids for g in after[0]] == [g.token_ids for g in before] == [g.token_ids for g in after[1]]


# ---- stopping -------------------------------------------------------------------------------
def test_stops_at_eot_emitted_by_the_model(tiny_llama3_dir, tok):
    gen = make_gen(chain_model(tiny_llama3_dir, [HAO, KAN, DE], EOT), tok)
    out = gen.generate(["类型#裙", "类型#上衣*颜色#白色"], DecodingConfig(max_new_tokens=50))
    for g in out:
        assert g.text == "好看的" and g.finish_reason == "stop"
        assert g.token_ids == [HAO, KAN, DE, EOT] and g.completion_tokens == 4
    # the same model with the classic bug (stop on 128001 only) never stops
    buggy = make_gen(gen.model, tok, OnlyEosFormatter(tok))
    g = buggy.generate(["类型#裙"], DecodingConfig(max_new_tokens=20, **PLAIN))[0]
    assert g.finish_reason == "length" and g.completion_tokens == 20 and g.text.startswith("好看的好看的")


def test_no_repeat_ngram_size_breaks_a_loop_and_stays_greedy(tiny_llama3_dir, tok):
    """A model that would loop 好看的好看的... (stop only on eos) repeats no 3-token sequence with
    no_repeat_ngram_size=3, and the blocked decoding is still deterministic."""
    buggy = make_gen(chain_model(tiny_llama3_dir, [HAO, KAN, DE], EOT), tok, OnlyEosFormatter(tok))

    def trigrams(ids):
        return [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]

    looping = buggy.generate(["类型#裙"], DecodingConfig(max_new_tokens=12))[0]
    assert len(set(trigrams(looping.token_ids))) < len(trigrams(looping.token_ids))  # it loops
    cfg = DecodingConfig(max_new_tokens=12, no_repeat_ngram_size=3)
    blocked = buggy.generate(["类型#裙"], cfg)[0]
    assert blocked.token_ids[:3] == [HAO, KAN, DE]  # the first pass is untouched
    assert len(set(trigrams(blocked.token_ids))) == len(trigrams(blocked.token_ids))
    assert buggy.generate(["类型#裙"], cfg)[0].token_ids == blocked.token_ids
    assert "no_repeat_ngram_size=3" in cfg.describe()


def test_vllm_refuses_no_repeat_ngram_size_clearly():
    from adgen.generation.vllm_backend import VLLMGenerator

    with pytest.raises(ConfigError, match="backend hf"):
        VLLMGenerator.sampling_params(None, DecodingConfig(no_repeat_ngram_size=4))


def test_stops_at_end_of_text_too(tiny_llama3_dir, tok):
    gen = make_gen(chain_model(tiny_llama3_dir, [KAN], EOS), tok)
    g = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=50))[0]
    assert (g.text, g.finish_reason, g.completion_tokens) == ("看", "stop", 2)


def test_length_finish_when_model_never_stops(tiny_llama3_dir, tok):
    gen = make_gen(chain_model(tiny_llama3_dir, [HAO], HAO + 1), tok)  # 好 then a non-stop token, forever
    g = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=9, **PLAIN))[0]
    assert g.finish_reason == "length" and g.completion_tokens == 9 and g.text.startswith("好")


def test_rows_stop_independently_in_a_batch(tiny_gen, tok):
    """One row hits a stop string early; the other runs on. Neither is disturbed by the other."""
    cfg = DecodingConfig(max_new_tokens=12, coverage_bonus_per_char=0, coverage_hold_chars=0,
                         word_repeat_penalty=0)  # stop strings, not shaping, are under test
    full = tiny_gen.generate(PROMPTS[:2], cfg)
    stop = tok.decode(full[0].token_ids[4:6])
    assert stop.strip() and stop not in full[1].text and full[0].text.find(stop) > 0
    cfg = cfg.replace(stop=(stop,))
    batched = tiny_gen.generate(PROMPTS[:2], cfg)  # batch_size 2: one batch
    singles = [tiny_gen.generate([p], cfg)[0] for p in PROMPTS[:2]]
    assert batched == singles
    assert batched[0].text == full[0].text[: full[0].text.find(stop)] and batched[0].finish_reason == "stop"
    assert batched[0].completion_tokens == 6 and batched[0].token_ids == full[0].token_ids[:6]
    assert batched[1] == full[1] and batched[1].finish_reason == "length"


@pytest.mark.parametrize("continuous", [True, False], ids=["engine", "padded"])
def test_stop_strings(tiny_llama3_dir, tok, continuous):
    gen = make_gen(chain_model(tiny_llama3_dir, [HAO, KAN, DE], EOT), tok, OnlyEosFormatter(tok))
    gen.continuous = continuous  # the engine's own stop check, or transformers' StopStringCriteria
    cfg = DecodingConfig(max_new_tokens=40, stop=["的好"])  # spans two tokens, and the first turn's eot
    for g in gen.generate(["类型#裙", "类型#上衣*颜色#白色*风格#简约"], cfg):
        assert g.text == "好看" and g.finish_reason == "stop"
        assert g.completion_tokens == 5  # 好 看 的 <eot> 好: "的好" is complete (eot is no text)
    s = gen.stream("类型#裙", cfg)
    assert "".join(s) == "好看" and s.finish_reason == "stop" and s.completion_tokens == 5
    g = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=40, stop=["看"]))[0]
    assert (g.text, g.finish_reason, g.completion_tokens) == ("好", "stop", 2)


# ---- UTF-8 ----------------------------------------------------------------------------------
def _multi_token_text(tok):
    text = "好" + LONG_CHAR + "看显瘦" + LONG_CHAR + "的"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode(ids[: k]) for k in range(1, len(ids) + 1)]
    assert any(p.endswith("\ufffd") for p in pieces)  # really cuts characters
    return text, ids


def test_incremental_decoder_never_splits_a_character(tok):
    text, ids = _multi_token_text(tok)
    dec, pieces = IncrementalDecoder(tok), []
    for i in ids:
        pieces.append(dec.push([i]))
    pieces.append(dec.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == dec.text
    assert "" in pieces  # held back while a character was incomplete
    # a cut in the middle of a character (max_new_tokens) drops the partial bytes
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    dec = IncrementalDecoder(tok)
    streamed = "".join(dec.push([i]) for i in ids[:cut]) + dec.flush()
    assert streamed == tok.decode(ids[:cut]).rstrip("\ufffd") and "\ufffd" not in streamed


def test_generation_cut_mid_character_has_no_replacement_char(tiny_llama3_dir, tok):
    chain = tok("好" + LONG_CHAR + "看", add_special_tokens=False)["input_ids"]
    assert len(chain) == 4
    gen = make_gen(chain_model(tiny_llama3_dir, chain, EOT), tok)
    full = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=10))[0]
    assert full.text == "好" + LONG_CHAR + "看" and full.finish_reason == "stop"
    cut = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=2))[0]  # 好 + first byte of 龘
    assert cut.text == "好" and cut.finish_reason == "length" and cut.completion_tokens == 2
    s = gen.stream("类型#裙", DecodingConfig(max_new_tokens=10))
    pieces = list(s)
    assert pieces == ["好", LONG_CHAR, "看"]
    s = gen.stream("类型#裙", DecodingConfig(max_new_tokens=2))
    assert list(s) == ["好"] and s.finish_reason == "length"


# ---- streaming ------------------------------------------------------------------------------
def test_stream_equals_generate(tiny_gen):
    cfg = DecodingConfig(max_new_tokens=16)
    for p in PROMPTS[:2]:
        ref = tiny_gen.generate([p], cfg)[0]
        s = tiny_gen.stream(p, cfg)
        assert s.finish_reason is None
        pieces = list(s)
        assert len(pieces) > 3 and all(pieces)
        assert "".join(pieces) == ref.text == s.text
        assert (s.finish_reason, s.prompt_tokens, s.completion_tokens) == (
            ref.finish_reason, ref.prompt_tokens, ref.completion_tokens)
        assert s.generation == Generation(ref.text, ref.prompt_tokens, ref.completion_tokens, ref.finish_reason,
                                          ref.token_ids)


def test_stream_yields_as_tokens_are_made(tiny_llama3_dir, tok):
    gen = make_gen(chain_model(tiny_llama3_dir, [HAO, KAN, DE], EOT), tok)
    s = gen.stream("类型#裙", DecodingConfig(max_new_tokens=20))
    assert list(s) == ["好", "看", "的"] and s.finish_reason == "stop" and s.completion_tokens == 4


def _never_stopping(tiny_llama3_dir, tok):
    return make_gen(chain_model(tiny_llama3_dir, [HAO, KAN, DE], EOT), tok, OnlyEosFormatter(tok))


def test_stream_close_stops_the_model_promptly(tiny_llama3_dir, tok):
    gen = _never_stopping(tiny_llama3_dir, tok)
    s = gen.stream("类型#裙", DecodingConfig(max_new_tokens=2000))
    it = iter(s)
    got = [next(it) for _ in range(3)]
    assert got == ["好", "看", "的"]
    t = time.perf_counter()
    s.close()
    assert time.perf_counter() - t < 2.0
    assert s.finish_reason == "cancelled" and s._thread is not None and not s._thread.is_alive()
    assert s.completion_tokens < 100
    assert gen.lock.acquire(blocking=False)  # the model is free again
    gen.lock.release()
    with pytest.raises(StopIteration):
        next(it)


def test_stream_cancel_event_from_another_thread(tiny_llama3_dir, tok):
    gen = _never_stopping(tiny_llama3_dir, tok)
    cancel = threading.Event()
    s = gen.stream("类型#裙", DecodingConfig(max_new_tokens=2000, **PLAIN), cancel=cancel)
    threading.Timer(0.3, cancel.set).start()
    t = time.perf_counter()
    pieces = list(s)
    assert time.perf_counter() - t < 5.0
    assert s.finish_reason == "cancelled" and 0 < s.completion_tokens < 2000
    assert "".join(pieces).startswith("好看的")
    s._thread.join(2.0)
    assert not s._thread.is_alive()


def test_abandoned_stream_is_cancelled_when_collected(tiny_llama3_dir, tok):
    import gc

    gen = _never_stopping(tiny_llama3_dir, tok)
    s = gen.stream("类型#裙", DecodingConfig(max_new_tokens=2000))
    assert next(s) == "好"
    thread = s._thread
    del s
    gc.collect()
    thread.join(5.0)
    assert not thread.is_alive()


def test_unstarted_stream_holds_nothing(tiny_gen):
    s = tiny_gen.stream("类型#裙", DecodingConfig(max_new_tokens=5))
    assert tiny_gen.lock.acquire(blocking=False)
    tiny_gen.lock.release()
    s.close()
    assert s.finish_reason == "cancelled"


def test_concurrent_calls_do_not_interleave_on_the_model(tiny_llama3_dir, tok):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32).eval()
    gen = make_gen(model, tok, batch_size=1)
    cfg = DecodingConfig(max_new_tokens=8)
    expected = gen.generate(PROMPTS, cfg)
    active, peak, orig = [0], [0], model.generate
    guard = threading.Lock()

    def watched(*a, **k):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        try:
            return orig(*a, **k)
        finally:
            with guard:
                active[0] -= 1

    model.generate = watched
    results, streams = {}, {}

    def work(i):
        results[i] = gen.generate(PROMPTS, cfg)

    def stream_work(i):
        streams[i] = "".join(gen.stream(PROMPTS[i], cfg))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=stream_work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert peak[0] == 1
    assert all([g.text for g in r] == [g.text for g in expected] for r in results.values()) and len(results) == 3
    assert streams == {0: expected[0].text, 1: expected[1].text}


# ---- sampling -------------------------------------------------------------------------------
def test_sampling_seeded_and_reproducible(tiny_gen):
    import torch

    cfg = DecodingConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=123)
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    a = tiny_gen.generate(PROMPTS[:3], cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    b = tiny_gen.generate(PROMPTS[:3], cfg)
    c = tiny_gen.generate(PROMPTS[:3], cfg.replace(seed=124))
    greedy = tiny_gen.generate(PROMPTS[:3], DecodingConfig(max_new_tokens=8))
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.text for g in a] != [g.text for g in c]
    assert [g.text for g in a] != [g.text for g in greedy]
    # top_k=1 sampling is greedy: the filters really reach the model
    k1 = tiny_gen.generate(PROMPTS[:3], cfg.replace(top_k=1))
    assert [g.token_ids for g in k1] == [g.token_ids for g in greedy]
    # temperature 0 means greedy whatever do_sample says
    t0 = tiny_gen.generate(PROMPTS[:3], cfg.replace(temperature=0.0, seed=None))
    assert [g.token_ids for g in t0] == [g.token_ids for g in greedy]


def test_seeded_sampling_of_one_prompt_repeated_gives_different_candidates(tiny_gen):
    """-n K repeats a prompt K times in one call: each must sample its own text (prompt k: seed + k),
    and the same call again gives the same K texts."""
    cfg = DecodingConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=11)
    a = [g.token_ids for g in tiny_gen.generate([PROMPTS[0]] * 3, cfg)]
    b = [g.token_ids for g in tiny_gen.generate([PROMPTS[0]] * 3, cfg)]
    assert a == b and len({tuple(t) for t in a}) == 3


# ---- adapters and backends ------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tiny_llama3_dir, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # lora_B starts at zero: perturb it so the adapter changes outputs
    out = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(out)
    return out


def test_adapter_changes_outputs_and_matches_in_memory_peft(tiny_llama3_dir, lora_dir, tok, tiny_gen):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = DecodingConfig(max_new_tokens=8)
    prompts = PROMPTS[:3]
    g = load_generator(str(tiny_llama3_dir), adapter=str(lora_dir), dtype="fp32", device="cpu", batch_size=3)
    assert g.adapter == str(lora_dir) and type(g.model).__name__.startswith("Peft")
    with_adapter = g.generate(prompts, cfg)
    base = tiny_gen.generate(prompts, cfg)
    assert [x.text for x in with_adapter] != [x.text for x in base]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(lora_dir)).eval()
    ref = [make_gen(peft_model, tok).generate([p], cfg)[0] for p in prompts]
    assert [x.token_ids for x in with_adapter] == [x.token_ids for x in ref]


def test_bad_adapter_dir(tiny_llama3_dir, tmp_path):
    with pytest.raises(AdgenError, match="adapter_config.json"):
        load_generator(str(tiny_llama3_dir), adapter=str(tmp_path))


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_llama3_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, even where it is installed
    with pytest.raises(AdgenError, match="pip install vllm"):
        load_generator(str(tiny_llama3_dir), backend="vllm")
    with pytest.raises(AdgenError, match="unknown backend"):
        load_generator(str(tiny_llama3_dir), backend="tgi")


def test_vllm_backend_against_a_fake_vllm(tiny_llama3_dir, lora_dir, monkeypatch):
    """The vLLM code path (prompt ids, stop ids, sampling params, LoRA request), with a stand-in vllm."""
    import types

    calls = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def generate(self, inputs, params, lora_request=None, use_tqdm=True):
            calls.update(inputs=inputs, params=params.kw, lora=lora_request)
            out = types.SimpleNamespace(text="好看\ufffd", token_ids=[1, 2, 3], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out]) for _ in inputs]

    class LoRARequest:
        def __init__(self, *, lora_name, lora_int_id, lora_path):  # keywords only: vLLM's current signature
            self.name, self.int_id, self.path = lora_name, lora_int_id, lora_path

    mods = {name: types.ModuleType(name) for name in ("vllm", "vllm.lora", "vllm.lora.request", "vllm.inputs")}
    mods["vllm"].LLM, mods["vllm"].SamplingParams = LLM, SamplingParams
    mods["vllm.lora.request"].LoRARequest = LoRARequest
    mods["vllm.inputs"].TokensPrompt = dict
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)

    g = load_generator(str(tiny_llama3_dir), adapter=str(lora_dir), backend="vllm")
    assert g.backend == "vllm" and calls["llm"]["enable_lora"] and calls["llm"]["model"] == str(tiny_llama3_dir)
    out = g.generate(["类型#裙"], DecodingConfig(max_new_tokens=7, stop=["。"]))
    assert calls["inputs"] == [{"prompt_token_ids": g.prompt_ids("类型#裙")}]
    p = calls["params"]
    assert (p["max_tokens"], p["temperature"], p["stop"], sorted(p["stop_token_ids"])) == (7, 0.0, ["。"], [EOS, EOT])
    assert calls["lora"].path == str(lora_dir.resolve())
    assert out == [Generation("好看", out[0].prompt_tokens, 3, "stop", [1, 2, 3])]
    g.generate(["类型#裙"], DecodingConfig(do_sample=True, temperature=0.9, top_p=0.7, top_k=0, seed=5))
    assert (calls["params"]["temperature"], calls["params"]["top_p"], calls["params"]["top_k"],
            calls["params"]["seed"]) == (0.9, 0.7, -1, 5)
    s = g.stream("类型#裙", DecodingConfig())
    assert list(s) == ["好看"] and s.finish_reason == "stop" and s.completion_tokens == 3
    from adgen.generation.protocol import Generator

    assert isinstance(g, Generator) and not g.uses_engine and g.model is None
    assert [(i, x.text) for i, x in g.generate_each(["类型#裙", "类型#裤"], DecodingConfig())] == [(0, "好看"), (1, "好看")]


def test_the_engines_and_the_test_fakes_follow_one_generator_protocol(tiny_llama3_dir, llama3_tokenizer):
    """Evaluation, bulk generation and serving read these attributes directly: every engine has all of them."""
    import torch
    from transformers import AutoModelForCausalLM

    from adgen.generation.protocol import EngineGenerator, Generator
    from test_eval import StubGenerator
    from test_serve_unit import FakeGenerator, FakeServedGenerator

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    hf = make_gen(model, llama3_tokenizer)
    assert isinstance(hf, Generator) and hf.uses_engine and hf.backend == "hf"
    assert isinstance(hf, EngineGenerator) and hf.decode_engine(3).slots == 3  # what the server drives
    assert hf.resolve(None).max_new_tokens >= 192  # sized from the tokenizer
    assert hf.prompt_ids("类型#裙") == hf.formatter.prompt_ids("类型#裙") and hf.stop_token_ids[0] == EOT
    for fake in (StubGenerator({}), FakeGenerator(), FakeServedGenerator()):
        assert isinstance(fake, Generator), type(fake).__name__
        assert not fake.uses_engine and not isinstance(fake, EngineGenerator)  # no engine: none asked of it

    class Incomplete:  # an engine without `uses_engine` / `resolve` / ... is not one
        def generate(self, prompts, config=None):
            return []

    assert not isinstance(Incomplete(), Generator)


# ---- the real model -------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_batched_streamed_and_stopping(smollm2_dir):
    """The real model (ChatML, stops on <|im_end|>): batched == one at a time, stream == generate."""
    g = load_generator(str(smollm2_dir), dtype="fp32", device="cpu", batch_size=2, system_prompt=None)
    im_end = g.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in g.stop_token_ids
    prompts = ["类型#裙*颜色#黑色*风格#简约*图案#线条", [{"role": "user", "content": "Say hi."}]]
    cfg = DecodingConfig(max_new_tokens=32)
    batched = g.generate(prompts, cfg)
    singles = [g.generate([p], cfg)[0] for p in prompts]
    assert [b.token_ids for b in batched] == [s.token_ids for s in singles]
    short = singles[1]
    assert short.finish_reason == "stop" and short.token_ids[-1] == im_end and short.text.strip()
    s = g.stream(prompts[1], cfg)
    assert "".join(s) == short.text and s.completion_tokens == short.completion_tokens


def test_candidates_need_sampling_everywhere_they_are_asked_for():
    """-n K with greedy decoding would make K identical candidates: refused with the fix, by the one check
    the CLI, bulk generation and the Ray catalog share."""
    from adgen.errors import ConfigError
    from adgen.generation.config import DecodingConfig

    with pytest.raises(ConfigError, match="--do-sample"):
        DecodingConfig().check_candidates(2)
    with pytest.raises(ConfigError, match=">= 1"):
        DecodingConfig(do_sample=True).check_candidates(0)
    DecodingConfig(do_sample=True, temperature=0.9).check_candidates(4)  # sampling: allowed
    DecodingConfig().check_candidates(1)
