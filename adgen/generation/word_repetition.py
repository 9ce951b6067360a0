"""Word-level repetition control: a content word already used `word_repeat_limit` times costs a penalty.

Character DRY (adgen.generation.repetition) stops exact repeats of 3+ characters, not one word reused with small
variations: "精致的衬衫，精致的泡泡袖，精致的抽绳". Here the completion is cut into words with jieba (the
field's ROUGE tokenizer) and each content word counted: two or more characters with an ideograph, not a
function word (`FUNCTION_WORDS`), not part of an input attribute value (the copy must repeat those).

A word used `limit` times or more costs where it would *start*, never half-way: at a character boundary the
tokens that begin writing it (its first character, a lead byte of it, or the whole word at once) lose
`penalty * (uses - limit + 1)` logits, so the model picks another word from the outset. A word once begun is
finished: blocking its second character writes garbage ("增加" -> "增添" -> "增增"), measured on dev records 1-16
(docs/DECODING_QUALITY.md). The price: other words that share the first character (精美 beside 精致) pay too.
Decisions at character boundaries only.

Counting is incremental: jieba never joins words across punctuation, so the clauses before the last punctuation
mark are counted once and only the current clause is cut again when a character is added.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from adgen.generation.config import DecodingConfig
from adgen.metrics.faithfulness import is_matchable
from adgen.metrics.text_stats import is_cjk

if TYPE_CHECKING:
    from adgen.generation.repetition import TokenTable

# Words copy reuses by grammar, not by choice: counted never.
FUNCTION_WORDS = frozenset(
    "一个 一种 一款 一下 一些 一样 一起 可以 非常 十分 更加 更是 还是 还有 就是 也是 不仅 而且 并且 以及 同时 所以 "
    "因为 如果 但是 不会 不是 没有 这样 这个 这款 这种 那么 我们 你的 我的 自己 让人 让你 使得 带来 给人 起来 之间 "
    "之一 已经 能够 特别 十足 很多 整个 为了 作为 对于 其中 通过".split())
# A clause ends here: jieba never joins words across these, so the text before one is counted for good.
CLAUSE_BREAKS = frozenset("，。！？；、,.!?;:：\n ")


@functools.lru_cache(maxsize=1)
def _jieba():
    """jieba, imported on first use (0.5 s, and its dictionary ~1 s: not at CLI start-up), its logging quiet."""
    import jieba

    jieba.setLogLevel(logging.CRITICAL)
    return jieba


def is_content_word(word: str) -> bool:
    return len(word) >= 2 and word not in FUNCTION_WORDS and any(map(is_cjk, word))


class WordCounts:
    """The content words of a growing text, counted: `update(text)` after each character."""

    def __init__(self, exempt: Sequence[str] = ()) -> None:
        # input values, lower-cased: a word inside one (黑 of 黑色 is no word; 衬衫 of 衬衫) or holding a
        # matchable one (黑色的 holds 黑色) is the copy's duty to name, never penalised
        self.exempt = tuple(v.lower() for v in exempt)
        self.settled = Counter()  # words of the clauses before `settled_upto`
        self.settled_upto = 0
        self.current = Counter()  # words of the clause being written
        self._seen = -1

    def update(self, text: str) -> None:
        if len(text) == self._seen:
            return
        self._seen = len(text)
        cut = max((i + 1 for i in range(len(text) - 1, self.settled_upto - 1, -1) if text[i] in CLAUSE_BREAKS),
                  default=self.settled_upto)
        if cut > self.settled_upto:
            self.settled.update(self._words(text[self.settled_upto:cut]))
            self.settled_upto = cut
        self.current = Counter(self._words(text[self.settled_upto:]))

    def _words(self, text: str) -> list[str]:
        return [w for w in _jieba().lcut(text) if is_content_word(w) and not self._is_exempt(w)] if text else []

    def _is_exempt(self, word: str) -> bool:
        w = word.lower()
        return any(w in v or (is_matchable(v) and v in w) for v in self.exempt)

    def overused(self, limit: int) -> dict[str, int]:
        """{word: uses} for the words used `limit` times or more."""
        total = self.settled + self.current
        return {w: n for w, n in total.items() if n >= limit}


def word_penalties(counts: WordCounts, text: str, table: "TokenTable", config: DecodingConfig) -> dict[int, float]:
    """{token id: penalty} for the tokens that would start an overused content word after `text`."""
    if config.word_repeat_penalty <= 0:
        return {}
    counts.update(text)
    out: dict[int, float] = {}
    for word, uses in counts.overused(config.word_repeat_limit).items():
        penalty = config.word_repeat_penalty * (uses - config.word_repeat_limit + 1)
        for tok in table.writing_on(word, 0):
            if penalty > out.get(tok, 0.0):
                out[tok] = penalty
    return out
