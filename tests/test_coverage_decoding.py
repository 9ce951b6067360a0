"""Coverage-guaranteed decoding (adgen.generation.coverage): the attributes come from the prompt, a value not yet
named pulls its first token up, the ending waits for it up to a cap -- with the real SmolLM2 and Llama-3
tokenizers -- and the engine decodes the same as transformers' generate with it on."""

from __future__ import annotations

import pytest

from adgen.data.chat import ChatFormatter
from adgen.generation import DecodingConfig, load_generator
from adgen.generation.coverage import prompt_attributes
from adgen.generation.repetition import HOLD_PENALTY, RepeatState, token_table

COVER = DecodingConfig(coverage_bonus_per_char=0.1, coverage_bonus_max=3.0, coverage_hold_chars=20,
                       word_repeat_penalty=0.0, dry_multiplier=0.0, banned_strings=(), end_after_chars=0)
ATTRS = [("类型", "裙"), ("颜色", "黑色"), ("图案", "印花")]


@pytest.fixture(params=["smollm2", "llama3"])
def tok(request, smollm2_tokenizer, llama3_tokenizer):
    return smollm2_tokenizer if request.param == "smollm2" else llama3_tokenizer


def state_after(tok, text: str, config=COVER, attributes=ATTRS) -> RepeatState:
    stop = ChatFormatter(tok).stop_token_ids
    state = RepeatState(token_table(tok), config, stop, attributes)
    state.push(tok.encode(text, add_special_tokens=False))
    return state


def first_token(tok, text: str) -> int:
    return tok.encode(text, add_special_tokens=False)[0]


def test_the_attributes_are_the_final_user_turn_of_the_prompt(tok):
    f = ChatFormatter(tok)
    assert prompt_attributes(token_table(tok), f.prompt_ids("类型#裙*颜色#黑色")) == [("类型", "裙"), ("颜色", "黑色")]
    assert prompt_attributes(token_table(tok), f.prompt_ids([{"role": "user", "content": "写一句广告"}])) is None
    follow_up = [{"role": "user", "content": "类型#裙*颜色#黑色"}, {"role": "assistant", "content": "黑色长裙。"},
                 {"role": "user", "content": "再写短一点"}]
    assert prompt_attributes(token_table(tok), f.prompt_ids(follow_up)) is None  # an earlier turn's attributes are not this one's


def test_a_missing_values_first_token_gains_a_bonus_that_grows(tok):
    early, later = state_after(tok, "这款"), state_after(tok, "这款裙子穿着很舒服，版型")
    for value in ("黑色", "印花"):
        lead = first_token(tok, value)
        assert early.penalties()[lead] == pytest.approx(-0.1 * len(early.text))
        assert later.penalties()[lead] == pytest.approx(-min(3.0, 0.1 * len(later.text)))
    assert first_token(tok, "裙") not in later.penalties()  # 类型 is not counted by the metric: no bonus


def test_a_named_value_gets_no_bonus_and_a_started_one_is_finished(tok):
    named = state_after(tok, "这款黑色的裙子，")
    assert first_token(tok, "黑色") not in named.penalties() and first_token(tok, "印花") in named.penalties()
    started = state_after(tok, "这款黑")  # 黑 written: the token going on with 色 gets the whole bonus
    go_on = tok.encode("黑色", add_special_tokens=False)[len(tok.encode("黑", add_special_tokens=False))]
    assert started.penalties()[go_on] == pytest.approx(-3.0)


def test_inside_a_character_only_a_missing_values_own_bytes_are_helped_on(smollm2_tokenizer):
    """SmolLM2 writes most ideographs as a lead token + continuation bytes. Inside a character nothing changes,
    unless the bytes so far begin a missing value's character: 卡 (of 卡通) and 卫 share their first two bytes, and
    there the byte that finishes 卡 keeps the start's bonus, the one that finishes 卫 gets nothing (without that,
    the model finished its own 卫 and the next boundary pulled again: "卫卫卫卫" in dev record 3)."""
    tok = smollm2_tokenizer
    stop = ChatFormatter(tok).stop_token_ids
    ids = tok.encode("这款裙", add_special_tokens=False)
    state = RepeatState(token_table(tok), COVER, stop, ATTRS)
    state.push(ids[:-1])
    assert state.pending and state.penalties() == {}
    ka, wei = tok.encode("卡", add_special_tokens=False), tok.encode("卫", add_special_tokens=False)
    assert ka[0] == wei[0] and len(ka) == len(wei) == 2  # the shared lead token, then one byte each
    state = RepeatState(token_table(tok), COVER, stop, [("类型", "上衣"), ("图案", "卡通")])
    state.push(tok.encode("这款卫衣", add_special_tokens=False) + ka[:1])
    assert state.pending
    pulled = state.penalties()
    assert pulled[ka[1]] == pytest.approx(-0.1 * len("这款卫衣")) and wei[1] not in pulled


def test_a_started_value_is_not_started_again(llama3_tokenizer):
    """After 碎 (碎花 missing) the token going on with 花 gets the whole bonus, 碎 itself nothing: pulling the
    value's start again wrote "碎碎碎碎" (dev record 48)."""
    tok = llama3_tokenizer
    state = state_after(tok, "这款裙子的碎", attributes=[("类型", "裙"), ("图案", "碎花")])
    pulled = state.penalties()
    assert pulled[first_token(tok, "花")] == pytest.approx(-3.0)
    assert first_token(tok, "碎") not in pulled


def test_the_end_is_held_while_a_value_is_missing_until_the_cap(tok):
    eot = ChatFormatter(tok).stop_token_ids[0]
    assert state_after(tok, "这款黑色的裙子。").penalties()[eot] == HOLD_PENALTY  # 印花 missing, 8 < 20 chars
    assert eot not in state_after(tok, "这款黑色的印花裙子。").penalties()  # all named
    long = state_after(tok, "这款黑色的裙子，穿着很舒服，版型很好看，显得人很高。")  # past 20 characters
    assert eot not in long.penalties()
    # the length-aware ending waits too
    ending = COVER.replace(end_after_chars=4, end_bias_per_char=1.0, coverage_hold_chars=40)
    assert state_after(tok, "这款黑色的裙子。", ending).ending_bias() == 0.0
    assert state_after(tok, "这款黑色的印花裙子。", ending).ending_bias() > 0


def test_off_means_off(tok):
    off = COVER.replace(coverage_bonus_per_char=0.0, coverage_hold_chars=0)
    assert not off.covers_attributes and state_after(tok, "这款裙子穿着很舒服", off).penalties() == {}
    assert not DecodingConfig.plain().covers_attributes and not DecodingConfig.plain().controls_words


def test_engine_and_generate_decode_the_same_with_coverage_on(tiny_llama3_dir):
    """The random tiny model writes random characters: the bonus and the hold change what it writes, the same
    in the engine (rows joining at different steps) as in transformers' generate, one prompt at a time."""
    gen = load_generator(str(tiny_llama3_dir), dtype="fp32", device="cpu", batch_size=2)
    prompts = ["类型#裙*颜色#黑色*图案#印花", "类型#上衣*材质#牛仔布*衣样式#外套", [{"role": "user", "content": "你好"}]]
    strong = DecodingConfig(max_new_tokens=12, coverage_bonus_per_char=2.0, coverage_bonus_max=12.0,
                            word_repeat_penalty=3.0, word_repeat_limit=1)
    unbent = strong.replace(coverage_bonus_per_char=0.0, coverage_hold_chars=0)
    gen.continuous = False
    reference = [gen.generate([p], strong)[0] for p in prompts]
    without = [gen.generate([p], unbent)[0] for p in prompts]
    gen.continuous = True
    assert gen.uses_engine
    assert [g.token_ids for g in gen.generate(prompts, strong)] == [r.token_ids for r in reference]
    assert reference[0].token_ids != without[0].token_ids  # the bonus did change the text
    assert reference[2].token_ids == without[2].token_ids  # no attributes: nothing to cover
