"""Coverage-guaranteed decoding: the copy names every input attribute value before it ends.

The decoder knows a request's attributes (`prompt_attributes`: the AdGen attribute string of the prompt's final
user turn, parsed from the prompt's text -- every backend and the API get them the same way, with nothing passed
alongside the prompt). "Named" is the coverage metric's notion (`adgen.metrics.faithfulness.coverage_values` /
`missing_values`: the value is a substring of the lower-cased text; 类型 is left out), imported, not copied.

Per request (`CoverageState`), at a character boundary (with the one exception below):

- **bonus**: the tokens that start writing a value still missing (a token that is a prefix of it, a lead byte of
  its first character included, or that writes all of it and more) gain
  `coverage_bonus_per_char` logits per character written so far, up to `coverage_bonus_max` (the whole of it
  where a new sentence starts, the place a value fits best): early on the model names values where it would
  anyway; the longer one stays missing, the more it is pulled in.
  Where the text already ends with the start of a missing value ("黑" of 黑色), the token that goes on with it
  gets the full bonus, and the value's start is not pulled again (that wrote "碎碎碎" for 碎花): a value once
  started is finished rather than bent into a near miss. The one decision inside a character: where the bytes
  so far begin a pulled value's next character (a byte-level tokenizer's shared lead bytes), the tokens that go
  on with it keep the same bonus (`pending_bonuses`), so the value is written and not its neighbour.
- **hold**: while a value is missing, the end-of-turn tokens lose `repetition.HOLD_PENALTY` (10) logits (and
  repetition.py's ending bonus waits) until the text is `coverage_hold_chars` characters long; past that it may
  end anyway. Not a ban: a model all but certain the copy is over still ends.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from adgen.data.attributes import parse_attributes
from adgen.generation.config import DecodingConfig
from adgen.metrics.faithfulness import coverage_values, missing_values
from adgen.metrics.predictions import extract_attribute_string

if TYPE_CHECKING:
    from adgen.generation.repetition import TokenTable

Attributes = list[tuple[str, str]]

# What may follow the final user turn's attribute string in a rendered prompt once special tokens are dropped:
# the assistant's role header ("assistant", ChatML / Llama-3) or nothing (a base model's plain format).
# After these a new sentence starts (repetition.SENTENCE_ENDS; not imported: repetition imports this module).
SENTENCE_STARTS_AFTER = frozenset("。！？")
_AFTER_LAST_TURN = re.compile(r"\s*(?:[A-Za-z_]{1,16}\s*)?")


def prompt_attributes(table: "TokenTable", prompt_ids: Sequence[int]) -> Attributes | None:
    """The attributes of a prompt whose final user turn is an AdGen attribute string ("类型#裙*颜色#黑色"),
    else None (a chat about something else: nothing to cover). Read from the prompt's text, so the engine, the
    padded and streamed paths and the API's chat / adcopy requests all get them without another argument."""
    # the text of the prompt with each special token (turn markers) as a line break: Llama-3's decoded text would
    # run the value into the next role's name ("黑色assistant")
    parts, data = [], b""
    for i in prompt_ids:
        piece = table.bytes[i] if 0 <= i < table.vocab_size else b""
        if piece:
            data += piece
        else:
            parts.append(data.decode("utf-8", errors="ignore"))
            data = b""
    text = "\n".join([*parts, data.decode("utf-8", errors="ignore")])
    found = extract_attribute_string(text)
    if not found:
        return None
    # only the final turn: an attribute string in an earlier turn (few-shot, a follow-up request) is not this one
    if not _AFTER_LAST_TURN.fullmatch(text[text.rindex(found) + len(found):]):
        return None
    return parse_attributes(found)


def attributes_for(table: "TokenTable", config: DecodingConfig, prompt_ids: Sequence[int]) -> Attributes | None:
    """`prompt_attributes` where the config uses them (coverage, word repetition), else None (no decode)."""
    if not (config.covers_attributes or config.controls_words):
        return None
    return prompt_attributes(table, prompt_ids)


class CoverageState:
    """One request's attribute values still to name, and what that does to the next token's logits."""

    def __init__(self, table: "TokenTable", config: DecodingConfig, attributes: Attributes | None) -> None:
        self.table = table
        self.config = config
        self.values = coverage_values(attributes or [])
        self.missing = list(self.values)
        self._checked = 0  # text length at the last check

    def update(self, text: str) -> None:
        """Drop the values `text` names now (only a longer text can name more)."""
        if self.missing and len(text) != self._checked:
            self.missing = missing_values(self.missing, text)
            self._checked = len(text)

    def holds_end(self, text: str) -> bool:
        """Whether the end of the text is held back: a value is missing and the text is short of the cap."""
        return bool(self.missing) and len(text) < self.config.coverage_hold_chars

    def bonuses(self, text: str) -> dict[int, float]:
        """{token id: logit bonus} for the tokens that start (or go on with) a missing value."""
        out: dict[int, float] = {}
        for value, k, bonus in self._pulls(text):
            _raise(out, self._writing(value, k), bonus)
        return out

    def pending_bonuses(self, text: str, pending: bytes) -> dict[int, float]:
        """Inside a character whose first bytes (`pending`) begin writing on with a missing value, the tokens that
        go on with that value's bytes get the same bonus as its start had. A byte-level tokenizer (SmolLM2) writes
        most ideographs as 2-3 byte tokens, and the lead bytes the bonus chose are shared (卡 of 卡通 and 卫 share
        two): left alone the model finishes its own favourite there, and the next boundary pulls again ("卫卫卫卫")."""
        out: dict[int, float] = {}
        for value, k, bonus in self._pulls(text):
            rest = value[k:].encode("utf-8")
            if len(rest) > len(pending) and rest.startswith(pending):
                _raise(out, self.table.continuing(rest[len(pending):]), bonus)
        return out

    def _pulls(self, text: str) -> list[tuple[str, int, float]]:
        """(missing value, characters of it the text already ends with, bonus) for each value pulled in now."""
        config = self.config
        if not self.missing or config.coverage_bonus_per_char <= 0:
            return []
        self.update(text)
        # a new sentence is where a value fits best: there the bonus is whole
        grown = (config.coverage_bonus_max if text and text[-1] in SENTENCE_STARTS_AFTER
                 else min(config.coverage_bonus_max, config.coverage_bonus_per_char * len(text)))
        lowered = text.lower()
        pulls = []
        for value in self.missing:
            k = _started(lowered, value)
            if k:  # the text ends with the value's start: go on with it (starting it again would stutter: "碎碎")
                pulls.append((value, k, config.coverage_bonus_max))
            elif grown > 0:
                pulls.append((value, 0, grown))
        return pulls

    def _writing(self, value: str, k: int) -> list[int]:
        """Tokens that write on with `value` after `value[:k]` (a lead byte of its next character included, not
        a token that would write another word: "黑白" is no start of 黑色)."""
        ids = self.table.writing_on(value, k)
        # the metric compares lower-cased text: "V领" names the value "v领" too
        upper = value[:k] + value[k].upper() + value[k + 1:]
        return ids + self.table.writing_on(upper, k) if upper != value else ids


def _started(lowered: str, value: str) -> int:
    """How many of `value`'s first characters (fewer than all) the lower-cased text ends with (0: none)."""
    for k in range(len(value) - 1, 0, -1):
        if lowered.endswith(value[:k]):
            return k
    return 0


def _raise(out: dict[int, float], ids: Sequence[int], bonus: float) -> None:
    for tok in ids:
        if bonus > out.get(tok, 0.0):
            out[tok] = bonus
