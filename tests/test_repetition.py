"""Character-level repetition control: DRY on characters, the character n-gram ban, loop detection,
never bending a character, and the engine / stream / API wiring."""

from __future__ import annotations

import pytest

from adgen.errors import ConfigError
from adgen.generation import DecodingConfig
from adgen.generation.repetition import (
    RepeatState,
    dangerous_chars,
    loop_cut,
    repeated_suffix_len,
    suffix_matches,
    token_table,
    trim_loop,
)

from test_generation import DE, EOT, HAO, KAN, LONG_CHAR, OnlyEosFormatter, chain_model, make_gen

DRY = DecodingConfig(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, loop_detection=False)


# ---- text analysis ------------------------------------------------------------------------------
def _suffix_matches_naive(text):
    n = len(text)
    out = [n] if n else []
    for k in range(1, n):
        a, b, m = text, text[: n - k], 0
        while m < len(b) and a[-1 - m] == b[-1 - m]:
            m += 1
        out.append(m)
    return out


@pytest.mark.parametrize("text", ["", "a", "abab", "穿着舒适自然，穿着舒适自然，", "aaaa", "abcabcab", "的的一的的"])
def test_suffix_matches_equal_the_naive_definition(text):
    assert suffix_matches(text) == _suffix_matches_naive(text)


def test_dry_penalises_the_character_that_extends_a_repeat():
    # "舒适自然" was written; the text again ends in "舒适": "自" would extend a 2-character repeat
    pen = dangerous_chars("舒适自然，很舒适", DRY)
    assert set(pen) == {"自"} and pen["自"] == pytest.approx(0.8)
    # one character longer repeat -> base times more
    assert dangerous_chars("舒适自然，很舒适自", DRY)["然"] == pytest.approx(0.8 * 1.75)
    # below allowed_length nothing is penalised
    assert dangerous_chars("舒适自然，很舒", DRY) == {}


def test_sequence_breakers_stop_the_match():
    text = "舒适\n自然舒适"
    assert "自" not in dangerous_chars(text, DRY)  # the earlier "舒适" is followed by a breaker
    assert dangerous_chars("ab\nxyab", DecodingConfig(dry_multiplier=1.0, dry_allowed_length=2, dry_sequence_breakers=("\n",))) == {}


def test_char_ngram_ban_is_infinite_and_only_from_n_minus_1():
    rules = DecodingConfig(dry_multiplier=0, no_repeat_char_ngram=4, loop_detection=False)
    assert dangerous_chars("舒适自然，舒适", rules) == {}  # 舒适自 would be a repeated 3-gram only
    assert dangerous_chars("舒适自然，舒适自", rules) == {"然": float("inf")}


def test_loop_detection_cuts_the_repeats_and_keeps_one_unit():
    text = "这款连衣裙穿着舒适自然，穿着舒适自然，穿着舒适自然，"
    cut = loop_cut(text)
    assert cut is not None and text[:cut] == "这款连衣裙穿着舒适自然，"
    assert trim_loop("色色色色色色色色色色色色") == ("色", True)
    # a repeated word or two is not a loop
    assert loop_cut("这款连衣裙很好看，那款连衣裙也很好看，都是好看的连衣裙。") is None
    assert trim_loop("短短短") == ("短短短", False)


def test_repeated_suffix_covers_what_a_loop_trims():
    """The stream holds back the repeated suffix; whatever prefix was released is kept by the trim."""
    for text in ("很舒适自然，穿着舒适自然，穿着舒适自然，穿着舒适自然，", "好的色色色色色色色色色色色色色色"):
        stop_at = next(end for end in range(1, len(text) + 1) if loop_cut(text[:end]) is not None)
        cut = loop_cut(text[:stop_at])  # where generation stops and what it keeps
        for end in range(1, stop_at + 1):
            released = end - repeated_suffix_len(text[:end])
            assert released <= cut


def strict_utf8(raw: bytes) -> str:
    import codecs

    return codecs.getincrementaldecoder("utf-8")("strict").decode(raw, final=False)


# ---- token level: never bend a character ----------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_llama3_dir):
    from adgen.models import load_tokenizer

    return load_tokenizer(str(tiny_llama3_dir))


def test_token_table_maps_llama3_bytes(tok):
    table = token_table(tok)
    assert table is token_table(tok)  # cached
    ids = tok.encode(LONG_CHAR, add_special_tokens=False)
    assert len(ids) == 2 and b"".join(table.bytes[i] for i in ids) == LONG_CHAR.encode("utf-8")
    assert ids[0] in table.heading_for(LONG_CHAR)  # the lead-byte token heads for the character
    assert ids[1] not in table.heading_for(LONG_CHAR)  # a continuation byte is never judged
    assert HAO in table.heading_for("好") and table.bytes[EOT] == b""


def test_state_penalises_only_at_character_boundaries(tok):
    table = token_table(tok)
    lead, cont = tok.encode(LONG_CHAR, add_special_tokens=False)
    state = RepeatState(table, DecodingConfig(dry_multiplier=0, no_repeat_char_ngram=2, loop_detection=False), stop_ids=[EOT])
    state.push([lead, cont, lead, cont])  # 龘龘
    assert state.text == LONG_CHAR * 2
    assert state.penalties()[lead] == float("inf")  # a third 龘 would repeat the 2-gram: its lead byte is banned
    state.push([lead])  # mid-character: nothing is touched, so the model completes what it started
    assert state.pending and state.penalties() == {}
    state.push([cont, EOT, HAO])
    assert state.text == LONG_CHAR * 3 and state.finished  # text ends at the end-of-turn token


def test_processor_never_writes_half_a_character(tiny_llama3_dir, tok):
    """A model that loops on a two-token character: the control breaks the loop at whole characters
    (the ids decode as strict UTF-8, no U+FFFD), where token n-gram blocking cuts characters in half."""
    lead, cont = tok.encode(LONG_CHAR, add_special_tokens=False)
    looping = make_gen(chain_model(tiny_llama3_dir, [lead, cont, HAO], EOT), tok, OnlyEosFormatter(tok))
    for cfg in (DecodingConfig(max_new_tokens=40, loop_detection=False),
                DecodingConfig(max_new_tokens=40, no_repeat_char_ngram=3, loop_detection=False)):
        g = looping.generate(["类型#裙"], cfg)[0]
        raw = b"".join(token_table(tok).bytes[i] for i in g.token_ids)
        strict_utf8(raw)  # raises on a half character (one cut by the token limit at the very end is fine)
        assert "\ufffd" not in g.text and g.text.startswith(LONG_CHAR + "好")
    assert cfg.no_repeat_char_ngram == 3 and trim_loop(g.text)[1] is False  # the ban broke the loop
    blocked = looping.generate(["类型#裙"], DecodingConfig(max_new_tokens=40, no_repeat_ngram_size=2, dry_multiplier=0,
                                                         loop_detection=False))[0]
    raw = b"".join(token_table(tok).bytes[i] for i in blocked.token_ids)
    with pytest.raises(UnicodeDecodeError):
        strict_utf8(raw)  # token blocking bends the character: the contrast this control exists for


def test_dry_breaks_a_greedy_loop_and_loop_detection_stops_one(tiny_llama3_dir, tok):
    model = chain_model(tiny_llama3_dir, [HAO, KAN, DE], EOT)
    looping = make_gen(model, tok, OnlyEosFormatter(tok))  # stops only on 128001: 好看的好看的...
    plain = looping.generate(["类型#裙"], DecodingConfig(max_new_tokens=30, dry_multiplier=0, loop_detection=False))[0]
    assert plain.finish_reason == "length" and plain.text == "好看的" * 7 + "好看"  # (<|eot_id|> is not text)

    detected = looping.generate(["类型#裙"], DecodingConfig(max_new_tokens=30, dry_multiplier=0))[0]
    assert detected.finish_reason == "loop" and detected.text == "好看的"
    assert detected.completion_tokens < 30  # it stopped early, it did not run to the limit

    dry = looping.generate(["类型#裙"], DecodingConfig(max_new_tokens=30, loop_detection=False))[0]
    assert dry.text.startswith("好看的好看的") and dry.text != plain.text  # DRY steps out of the loop
    # the penalty grows by dry_base per repeated character: this model's margin (10 logits) is beaten
    # once the repeat is 8 characters past allowed_length, so no run of the loop gets longer than that
    assert "好看的" * 6 not in dry.text and "!" in dry.text
    # deterministic
    assert looping.generate(["类型#裙"], DecodingConfig(max_new_tokens=30, loop_detection=False))[0].token_ids == dry.token_ids


def test_rows_of_a_batch_keep_their_own_state(tiny_llama3_dir, tok):
    """One looping row and one that ends: the loop is cut in its row only, the other is untouched."""
    model = chain_model(tiny_llama3_dir, [HAO, KAN, DE], EOT)
    looping = make_gen(model, tok, OnlyEosFormatter(tok), batch_size=2)
    prompts = ["类型#裙", "类型#上衣*版型#宽松*版型#显瘦*图案#线条*衣样式#衬衫"]  # different lengths: left padding
    cfg = DecodingConfig(max_new_tokens=30, dry_multiplier=0)
    batched = looping.generate(prompts, cfg)
    alone = [looping.generate([p], cfg)[0] for p in prompts]
    assert [(g.text, g.finish_reason) for g in batched] == [(g.text, g.finish_reason) for g in alone]
    ends = make_gen(model, tok)  # stops on <|eot_id|>
    assert ends.generate(prompts, cfg)[0].finish_reason == "stop"


def test_stream_equals_generate_with_a_loop(tiny_llama3_dir, tok):
    looping = make_gen(chain_model(tiny_llama3_dir, [HAO, KAN, DE], EOT), tok, OnlyEosFormatter(tok))
    for cfg in (DecodingConfig(max_new_tokens=30, dry_multiplier=0), DecodingConfig(max_new_tokens=30)):
        g = looping.generate(["类型#裙"], cfg)[0]
        stream = looping.stream("类型#裙", cfg)
        pieces = list(stream)
        assert "".join(pieces) == g.text and stream.finish_reason == g.finish_reason


def test_decoding_config_validates_the_new_fields():
    d = DecodingConfig()
    assert d.dry_multiplier > 0 and d.loop_detection and d.max_new_tokens is None  # on by default
    for bad in (dict(dry_multiplier=-1), dict(dry_base=0.5), dict(dry_allowed_length=0), dict(no_repeat_char_ngram=1),
                dict(dry_sequence_breakers=["ab"]), dict(loop_detection="yes")):
        with pytest.raises(ConfigError):
            DecodingConfig(**bad)
    assert "char DRY" in d.describe() and "loop detection" in d.describe() and "auto" in d.describe()


def test_max_new_tokens_is_sized_from_the_tokenizer(tok, smollm2_tokenizer):
    llama = DecodingConfig().for_tokenizer(tok).max_new_tokens
    smol = DecodingConfig().for_tokenizer(smollm2_tokenizer).max_new_tokens
    # SmolLM2 spends ~2x the tokens of Llama-3 on Chinese: it needs about twice the room
    assert 192 <= llama <= 288 and 1.6 * llama <= smol <= 2.4 * llama
    assert DecodingConfig(max_new_tokens=50).for_tokenizer(tok).max_new_tokens == 50
