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


# ---- the ending: room to end, then an end at a sentence end --------------------------------------
COMMA, PERIOD = 3922, 1811  # "，" "。" in the Llama-3 vocabulary
ENDING_ONLY = dict(dry_multiplier=0.0, loop_detection=False, end_after_chars=8, end_bias_per_char=1.0,
                   word_repeat_penalty=0.0, coverage_bonus_per_char=0.0, coverage_hold_chars=0)


def test_ending_bias_grows_past_the_length_and_waits_for_whole_characters(tok):
    table = token_table(tok)
    assert table.ending_ids() == ([COMMA], PERIOD) or (COMMA in table.ending_ids()[0] and table.ending_ids()[1] == PERIOD)
    state = RepeatState(table, DecodingConfig(**ENDING_ONLY), stop_ids=[EOT])
    state.push([HAO] * 6)
    assert state.ending_bias() == 0.0  # 6 characters: still room
    state.push([HAO, HAO])
    assert state.ending_bias() == pytest.approx(1.0)  # the 8th character: one step of the ramp
    lead, _cont = tok.encode(LONG_CHAR, add_special_tokens=False)
    state.push([lead])
    assert state.ending_bias() == 0.0  # inside a character: nothing is touched
    off = RepeatState(table, DecodingConfig(**{**ENDING_ONLY, "end_after_chars": 0}), stop_ids=[EOT])
    off.push([HAO] * 40)
    assert off.ending_bias() == 0.0


def test_ending_moves_a_clause_end_to_a_sentence_end_then_ends_there(tiny_llama3_dir, tok):
    """A model that lists forever ("好看的，好看的，…", no sentence end, no end-of-turn): plain decoding runs to
    the limit; with the ending on, a clause end becomes "。" and the model's own end-of-turn token follows a
    sentence end once the bonus beats the model's margin: never inside a sentence, no other character changed."""
    import torch

    lister = chain_model(tiny_llama3_dir, [HAO, KAN, DE], COMMA)  # 好 看 的 ， then again
    with torch.no_grad():
        lister.lm_head.weight.mul_(1 / 8)  # the final norm scales hidden 64 by 8: a margin of 10 logits, as real models have
    for continuous in (True, False):
        gen = make_gen(lister, tok, continuous=continuous)
        plain = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=60, **{**ENDING_ONLY, "end_after_chars": 0}))[0]
        assert plain.finish_reason == "length" and "。" not in plain.text
        ended = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=60, **ENDING_ONLY))[0]
        assert ended.finish_reason == "stop" and ended.token_ids[-1] == EOT  # the end-of-turn id, not <|end_of_text|>
        assert ended.text.endswith("好看的。") and len(ended.text) < len(plain.text)
        # before the 8th character nothing changes; after it, every clause end is a sentence end
        assert ended.text.startswith("好看的，好看的，好看的。") and "，" not in ended.text[11:]
        assert plain.text.startswith(ended.text.replace("。", "，"))  # no other character changed
        # 11 characters, then a comma would come -> "。"; end-of-turn after "。" once the bonus passes 10
        assert ended.text == "好看的，好看的，好看的。好看的。好看的。"
        stream = gen.stream("类型#裙", DecodingConfig(max_new_tokens=60, **ENDING_ONLY))
        assert "".join(stream) == ended.text and stream.finish_reason == "stop"


def test_ending_fields_are_validated():
    for bad in (dict(end_after_chars=-1), dict(end_after_chars=1.5), dict(end_bias_per_char=-0.1)):
        with pytest.raises(ConfigError):
            DecodingConfig(**bad)
    assert "ending after 120 chars" in DecodingConfig().describe()
    assert not DecodingConfig(end_after_chars=0).ends_copy and DecodingConfig().shapes_logits


# ---- banned text: "<UNK>", the placeholder in 31% of AdGen's train references ------------------------
def test_banned_text_is_never_started_nor_continued(tok):
    table = token_table(tok)
    state = RepeatState(table, DecodingConfig(dry_multiplier=0.0, end_after_chars=0, loop_detection=False),
                        stop_ids=[EOT])
    unk = tok.encode("<UNK>", add_special_tokens=False)
    first = state.penalties()  # before the first token too
    assert first[unk[0]] == float("inf") and HAO not in first
    state.push(tok.encode("好<", add_special_tokens=False))  # "<" came another way (e.g. merged with a character)
    assert state.text.endswith("<")
    rest = tok.encode("UNK>", add_special_tokens=False)
    assert state.penalties()[rest[0]] == float("inf")  # ... it cannot go on to "<UNK>"
    off = RepeatState(table, DecodingConfig(banned_strings=(), dry_multiplier=0.0, end_after_chars=0), stop_ids=[EOT])
    assert off.penalties() == {}


def test_a_model_that_writes_the_placeholder_never_does_with_the_default_decoding(tiny_llama3_dir, tok):
    unk = tok.encode("<UNK>", add_special_tokens=False)
    writer = chain_model(tiny_llama3_dir, [HAO, *unk, KAN], EOT)  # 好<UNK>看 then the end of its turn
    gen = make_gen(writer, tok)
    plain = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=20, banned_strings=()))[0]
    assert plain.text == "好<UNK>看" and plain.finish_reason == "stop"
    clean = gen.generate(["类型#裙"], DecodingConfig(max_new_tokens=20))[0]
    assert "<UNK>" not in clean.text and clean.text.startswith("好")
    with pytest.raises(ConfigError):
        DecodingConfig(banned_strings=("",))
    assert "never writes <UNK>" in DecodingConfig().describe()
