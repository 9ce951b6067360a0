"""Surface statistics of one generated text: language drift, looping, diversity, length.

All are computed on characters, which is what matters for Chinese and needs no tokenizer:

- `length_chars`: `len(text)`, every character counted (punctuation and spaces too).
- `chinese_share`: CJK ideographs / letters, where letters are the characters with
  `str.isalpha()` (ideographs, Latin, any script; not digits, punctuation, spaces, emoji).
  1.0 = all Chinese, ~0 = the model drifted to English. `None` when the text has no letter.
- `repetition_rate`: 1 - distinct / total over the character 4-grams of the text with whitespace
  removed. 0.0 = no 4-gram occurs twice; looping generation ("气质的气质，气质的气质，...") tends
  to 1. 0.0 for texts shorter than 4 characters (nothing can repeat).
- `distinct-1`, `distinct-2`: distinct / total character 1-grams and 2-grams of the same
  whitespace-free text (per example, Li et al. 2016 on characters). `None` for a text with no
  n-gram of that size.

`None` marks "undefined for this text"; means skip it (see `adgen.metrics.scoring.aggregate`).
"""

from __future__ import annotations

REPETITION_N = 4


def is_cjk(ch: str) -> bool:
    # CJK Unified Ideographs, Extension A, and the compatibility block: what Chinese copy is made of.
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF


def _squeeze(text: str) -> str:
    """The text without whitespace: a line break or a space is layout, not repetition."""
    return "".join(text.split())


def char_ngrams(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(len(text) - n + 1)]


def chinese_share(text: str) -> float | None:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    return sum(map(is_cjk, letters)) / len(letters)


def repetition_rate(text: str, n: int = REPETITION_N) -> float:
    grams = char_ngrams(_squeeze(text), n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(text: str, n: int) -> float | None:
    grams = char_ngrams(_squeeze(text), n)
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def text_stats(text: str) -> dict[str, float | int | None]:
    return {
        "chinese_share": chinese_share(text),
        "repetition_rate": repetition_rate(text),
        "distinct-1": distinct_n(text, 1),
        "distinct-2": distinct_n(text, 2),
        "length_chars": len(text),
    }
