"""Turning generated token ids into clean text: incremental UTF-8-safe decoding and stop strings.

Byte-level BPE tokenizers (Llama-3, GPT-2 style) split rare characters (many CJK characters, emoji)
into several byte tokens. Decoding a prefix that ends inside such a character gives U+FFFD. The
`IncrementalDecoder` holds text back while its decoded tail ends in U+FFFD and releases it once the
character is complete; at the end of generation a still-incomplete character is dropped. So no piece
and no final text ever carries half a character.

Byte tokens that never form a character (an invalid sequence inside the text, which untrained or
confused models produce) are dropped too, instead of showing up as U+FFFD: no text or piece we return
contains U+FFFD. (A model that means to write U+FFFD itself loses it; deliberate.)
"""

from __future__ import annotations

from typing import Sequence

from adgen.generation.config import Generation
from adgen.generation.repetition import trim_loop

REPLACEMENT = "\ufffd"


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def clean_text(text: str) -> str:
    """Drop U+FFFD: a character cut at the end (max_new_tokens hit inside a multi-byte character),
    or byte tokens that never formed a character (untrained / confused models emit those)."""
    return text.replace(REPLACEMENT, "")


class IncrementalDecoder:
    """Decode a growing list of token ids into text pieces, never splitting a character.

    The "prefix window" technique (as in vLLM / TGI): decode ids[prefix_offset:] and
    ids[prefix_offset:read_offset], emit the difference when it does not end in U+FFFD. Decoding a
    window that starts one chunk back keeps tokenizers that strip a leading space (SentencePiece)
    right, and the cost per token stays constant.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything emitted so far

    def push(self, ids: Sequence[int]) -> str:
        """Add tokens; return the newly completed text ("" while a character is incomplete)."""
        self.ids.extend(int(i) for i in ids)
        prefix_text = decode(self.tokenizer, self.ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.tokenizer, self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            piece = clean_text(new_text[len(prefix_text) :])
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """End of generation: return the rest, without an incomplete trailing character."""
        prefix_text = decode(self.tokenizer, self.ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.tokenizer, self.ids[self.prefix_offset :])
        piece = clean_text(new_text[len(prefix_text) :]) if len(new_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += piece
        return piece


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the first occurrence of any stop string in text[start:] (absolute), or -1."""
    best = -1
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string.

    A stream must hold that much back: the next token may complete the stop string.
    """
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    if not stops:
        return text, False
    i = find_stop(text, stops)
    return (text[:i], True) if i != -1 else (text, False)


def stop_window(stops: Sequence[str]) -> int:
    """Newest tokens to decode to see a stop string complete: a token carries at least one byte, so a stop
    string of B bytes spans at most B + 1 tokens."""
    return max(len(s.encode("utf-8")) for s in stops) + 2


def finished_generation(tokenizer, prompt_tokens: int, generated: Sequence[int], stop_ids, stops: Sequence[str],
                        *, stop_hit: bool, looped: bool, cancelled: bool = False):
    """The `Generation` for a completion's token ids (both decoding paths end here).

    Text up to the first stop id, cleaned and cut at a stop string; a loop's repeats trimmed. After a
    stop-string hit or a loop, a trailing stop id is padding, not the model's end of turn, so it is not
    counted. finish_reason: "stop" (end of turn or stop string), "loop", "cancelled", else "length".
    """
    stops_ids = set(stop_ids)
    gen = list(generated)
    n = next((j for j, t in enumerate(gen) if t in stops_ids), len(gen))
    emitted_eos = n < len(gen) and not stop_hit and not looped
    text, cut = cut_at_stop(clean_text(decode(tokenizer, gen[:n])), stops)
    finish = "stop" if emitted_eos or cut else "length"
    if looped and not cut:
        text, _ = trim_loop(text)
        finish = "loop"
    if cancelled and finish == "length":
        finish = "cancelled"
    token_ids = gen[: n + 1] if emitted_eos else gen[:n]
    return Generation(text, prompt_tokens, len(token_ids), finish, token_ids)

