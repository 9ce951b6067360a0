"""Word-level repetition control (adgen.generation.word_repetition): a content word used `word_repeat_limit`
times costs a penalty where it would be written again; input values and function words never do."""

from __future__ import annotations

from collections import Counter

import pytest

from adgen.data.chat import ChatFormatter
from adgen.generation import DecodingConfig
from adgen.generation.repetition import RepeatState, token_table
from adgen.generation.word_repetition import WordCounts, is_content_word

WORDS = DecodingConfig(word_repeat_penalty=1.5, word_repeat_limit=2, coverage_bonus_per_char=0.0,
                       coverage_hold_chars=0, dry_multiplier=0.0, banned_strings=(), end_after_chars=0)
LISTING = "精致的衬衫，精致的泡泡袖，精致的抽绳，精"


@pytest.fixture(params=["smollm2", "llama3"])
def tok(request, smollm2_tokenizer, llama3_tokenizer):
    return smollm2_tokenizer if request.param == "smollm2" else llama3_tokenizer


def state_after(tok, text, config=WORDS, attributes=(("类型", "上衣"), ("衣样式", "衬衫"))):
    state = RepeatState(token_table(tok), config, ChatFormatter(tok).stop_token_ids, list(attributes))
    state.push(tok.encode(text, add_special_tokens=False))
    return state


def tokens_writing(tok, text: str, after: str) -> int:
    """The first token that writes `text` right after `after` (as the model would write it)."""
    head = tok.encode(after, add_special_tokens=False)
    return tok.encode(after + text, add_special_tokens=False)[len(head)]


def test_counting_char_by_char_equals_counting_the_whole_text():
    text = "精致的衬衫，精致的泡泡袖。舒适的面料，穿着舒适又精致！"
    step = WordCounts()
    for n in range(1, len(text) + 1):
        step.update(text[:n])
    whole = WordCounts()
    whole.update(text)
    assert step.settled + step.current == whole.settled + whole.current
    assert (step.settled + step.current)["精致"] == 3 and (step.settled + step.current)["舒适"] == 2


def test_a_content_word_used_k_times_is_penalised_where_it_would_start(tok):
    jing = tokens_writing(tok, "精", "，")
    state = state_after(tok, LISTING[:-1])  # 精致 used 3 times, limit 2: 1.5 * (3 - 2 + 1)
    assert state.penalties()[jing] == pytest.approx(3.0)
    assert jing not in state_after(tok, "精致的衬衫，").penalties()  # used once: free
    # a word once begun is finished: after 精 nothing of 精致 is penalised
    assert tokens_writing(tok, "致", "精") not in state_after(tok, LISTING).penalties()


def test_input_values_and_function_words_are_never_penalised(tok):
    text = "这款衬衫非常好看，这款衬衫非常舒适，这款衬衫非常百搭，"
    pen = state_after(tok, text).penalties()
    assert tokens_writing(tok, "衬", "，") not in pen  # 衬衫 is an input value: the copy must name it
    assert tokens_writing(tok, "非", "，") not in pen  # 非常 is a function word
    assert not is_content_word("非常") and not is_content_word("的") and is_content_word("精致")
    off = state_after(tok, LISTING, WORDS.replace(word_repeat_penalty=0.0))
    assert off.penalties() == {}


def test_the_penalty_never_bends_a_character(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode(LISTING[:-1] + "精", add_special_tokens=False)
    state = RepeatState(token_table(tok), WORDS, ChatFormatter(tok).stop_token_ids, [])
    state.push(ids[:-1])  # in the middle of 精 (lead token + continuation byte)
    assert state.pending and state.penalties() == {}


def test_counts_are_words_not_characters():
    counts = WordCounts(exempt=["黑色"])
    counts.update("黑色的裙子，黑色的外套，黑色的鞋子，裙子好看")
    total = counts.settled + counts.current
    assert "黑色" not in total and total == Counter({"裙子": 2, "外套": 1, "鞋子": 1, "好看": 1})
