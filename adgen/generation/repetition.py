"""Repetition control on *characters*: a DRY-style penalty, a hard ban of repeated character n-grams,
and loop detection -- for every backend and every batch layout.

Why characters: byte-level tokenizers spend one to three tokens on a Chinese character (SmolLM2 ~1.9,
mostly a two-byte lead token + one continuation byte), so token n-grams are the wrong unit: blocking a
token n-gram often forces another continuation byte in the middle of a character and writes a
near-miss character ("设计" -> "设论"). Here every decision is taken on the decoded text:

- **DRY** (the sampler of llama.cpp / text-generation-webui, on characters): let the completion so far
  be `s`; a candidate whose first character `x` would extend a sequence already seen in `s` -- the
  longest suffix of `s` that also ends right before an earlier `x`, `L` characters long -- loses
  `multiplier * base ** (L - allowed_length)` from its logit when `L >= allowed_length`. Matching stops
  at sequence breakers (a newline by default).
- **Character n-gram ban** (`no_repeat_char_ngram=N`): a candidate whose first character would
  complete an N-character sequence that already occurs in `s` gets -inf.
- **Never bends a character.** Decisions are taken only at character boundaries. A token that starts a
  character (a lead-byte token) is judged by the character(s) it heads for: it takes the penalty of the
  dangerous character it is a prefix of. In the middle of a character nothing is changed, so the model
  always completes the character it chose. (The price: a lead-byte token shared by other characters
  takes their share of the penalty too.)
- **Loop detection**: the completion ends in a unit of P characters repeated (3 times for short units,
  twice for units of 8 or more, and at least `LOOP_MIN_CHARS` characters in all): generation stops,
  `finish_reason` is "loop" and the repeated tail is trimmed (the text keeps the unit once).

- **Ending** (`end_after_chars`, `end_bias_per_char`): past the length of real copy, a clause end ("，")
  becomes a sentence end ("。" takes the comma's probability) and, right after a sentence end, the
  end-of-turn token gets a bonus that grows per character. A 135M model in "list mode" ("穿着舒适的X，
  穿着舒适的Y，...") has no sentence end to stop at; DRY keeps it from looping but not from listing to the
  token limit. The bonus never ends inside a sentence or a character.

Only the completion is matched, never the prompt: the copy must repeat the attribute words it was given.
The state is per request (`RepeatState`), fed with that request's own tokens, so a batch whose rows
started at different steps (continuous batching) works the same as a left-padded batch.
Pure Python here; the transformers adapters are in `adgen.generation.hf_processors`.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Sequence

from adgen.generation.config import DecodingConfig
from adgen.generation.coverage import Attributes, CoverageState
from adgen.generation.word_repetition import WordCounts, word_penalties

# Loop detection: a unit of P characters repeated REPEATS(P) times at the end of the completion, and at
# least LOOP_MIN_CHARS characters of repeated text in all. Units longer than LOOP_MAX_PERIOD are not looked for.
LOOP_MIN_CHARS = 12
LOOP_MAX_PERIOD = 64


# Ending: where a clause ends, the sentence end that may replace it, and what ends a sentence.
CLAUSE_END = "，"
SENTENCE_END = "。"
SENTENCE_ENDS = frozenset("。！？")  # Chinese copy only: English text is never cut short
END_BIAS_CAP = 30.0  # logits: beyond this the bonus decides anyway
# Coverage's hold on the ending (adgen.generation.coverage): the end-of-turn ids lose this much. Not a ban: a model
# all but certain the copy is over (a margin past 10 logits) still ends rather than write text it has no word for.
HOLD_PENALTY = 10.0


def loop_repeats(period: int) -> int:
    return 3 if period < 8 else 2


# ---- text analysis (pure functions on strings) ------------------------------------------------------
def suffix_matches(text: str) -> list[int]:
    """z[k] = length of the longest common suffix of `text` and `text[:len(text) - k]` (z[0] = len).

    The Z-function of the reversed text, O(n): one pass answers both "which earlier positions does the
    current tail repeat, and for how long" (DRY) and "is the tail periodic" (loop detection).
    """
    rev = text[::-1]
    n = len(rev)
    z = [0] * n
    if n:
        z[0] = n
    left = right = 0
    for i in range(1, n):
        if i < right:
            z[i] = min(right - i, z[i - left])
        while i + z[i] < n and rev[z[i]] == rev[i + z[i]]:
            z[i] += 1
        if i + z[i] > right:
            left, right = i, i + z[i]
    return z


def loop_cut(text: str, z: list[int] | None = None) -> int | None:
    """Where to cut a looping completion (keep `text[:cut]`: the repeated unit once), or None.

    A loop: the text ends in a unit of P characters repeated `loop_repeats(P)` times, covering at least
    LOOP_MIN_CHARS characters. The smallest such P wins.
    """
    n = len(text)
    if n < LOOP_MIN_CHARS:
        return None
    z = suffix_matches(text) if z is None else z
    for period in range(1, min(LOOP_MAX_PERIOD, n // 2) + 1):
        span = period + z[period]  # length of the tail that has period P
        if span >= max(LOOP_MIN_CHARS, loop_repeats(period) * period):
            return n - z[period]
    return None


def repeated_suffix_len(text: str, z: list[int] | None = None) -> int:
    """Length of the longest suffix of `text` that also occurs earlier in it (overlaps allowed).

    A stream holds this much back: if the text turns out to loop, the trimmed tail lies inside it, so
    what was already sent is never taken back (stream == generate).
    """
    z = suffix_matches(text) if z is None else z
    return max(z[1:], default=0)


def trim_loop(text: str) -> tuple[str, bool]:
    """(text without its looping tail, whether it looped) -- for backends that detect after the fact."""
    cut = loop_cut(text)
    return (text, False) if cut is None else (text[:cut], True)


def dangerous_chars(text: str, config: DecodingConfig, z: list[int] | None = None) -> dict[str, float]:
    """Next characters that would extend a repeat: {char: logit penalty} (inf = banned)."""
    n = len(text)
    if n == 0 or not config.shapes_logits:
        return {}
    z = suffix_matches(text) if z is None else z
    breakers = set(config.dry_sequence_breakers)
    # the current tail may not reach back over a breaker
    tail_cap = n
    for i in range(n - 1, -1, -1):
        if text[i] in breakers:
            tail_cap = n - 1 - i
            break
    ban_from = config.no_repeat_char_ngram - 1 if config.no_repeat_char_ngram > 0 else None
    dry_from = config.dry_allowed_length if config.dry_multiplier > 0 else None
    out: dict[str, float] = {}
    last_breaker = -1  # index of the last breaker before position j
    for j in range(1, n):
        if text[j - 1] in breakers:
            last_breaker = j - 1
        x = text[j]
        if x in breakers:
            continue
        length = min(z[n - j], tail_cap, j - 1 - last_breaker)
        if length <= 0:
            continue
        if ban_from is not None and length >= ban_from:
            penalty = float("inf")
        elif dry_from is not None and length >= dry_from:
            exponent = min(length - dry_from, 64)
            penalty = config.dry_multiplier * config.dry_base ** exponent
        else:
            continue
        if penalty > out.get(x, 0.0):
            out[x] = penalty
    return out


# ---- token bytes ----------------------------------------------------------------------------------
def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level BPE alphabet: the printable stand-in character of each byte -> the byte.

    Written out here (a fixed, public mapping) because transformers 5 no longer exports its helper.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _first_char(data: bytes) -> str | None:
    """The first complete UTF-8 character of `data`, or None when `data` starts inside or before one."""
    for k in range(1, min(4, len(data)) + 1):
        try:
            return data[:k].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


class TokenTable:
    """Each token's bytes, and the tokens that head for a given character at a character boundary.

    Built once per tokenizer (~1 s for Llama-3's 128k tokens) and cached. Byte-level BPE tokens
    (Llama-3, SmolLM2, Qwen, GPT-2) map through the byte alphabet; SentencePiece tokens through
    `<0xNN>` byte pieces and "▁" = space; special tokens have no bytes (never judged).
    """

    def __init__(self, tokenizer) -> None:
        vocab_size = len(tokenizer)
        pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
        alphabet = _byte_level_alphabet()
        byte_level = self._is_byte_level(tokenizer, alphabet)
        self.vocab_size = vocab_size
        self.bytes: list[bytes] = []
        for i, piece in enumerate(pieces):
            if piece is None or i in special:
                self.bytes.append(b"")
            elif byte_level and all(c in alphabet for c in piece):
                self.bytes.append(bytes(alphabet[c] for c in piece))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                self.bytes.append(bytes([int(piece[3:5], 16)]))
            else:
                self.bytes.append(piece.replace("\u2581", " ").encode("utf-8"))
        # starting at a character boundary: tokens by their first character, and lead-byte tokens
        # (a proper prefix of a character) by their bytes
        self.by_first_char: dict[str, list[int]] = {}
        self.by_lead_bytes: dict[bytes, list[int]] = {}
        # starting inside a character (a continuation byte first, a few hundred tokens): by that first byte
        self.by_inside_byte: dict[int, list[int]] = {}
        for i, data in enumerate(self.bytes):
            if not data:
                continue
            if (data[0] & 0xC0) == 0x80:
                self.by_inside_byte.setdefault(data[0], []).append(i)
                continue
            first = _first_char(data)
            if first is not None:
                self.by_first_char.setdefault(first, []).append(i)
            elif len(data) < 4:
                self.by_lead_bytes.setdefault(data, []).append(i)

    @staticmethod
    def _is_byte_level(tokenizer, alphabet) -> bool:
        try:
            ids = tokenizer.encode("的 a", add_special_tokens=False)
            pieces = tokenizer.convert_ids_to_tokens(ids)
            data = b"".join(bytes(alphabet[c] for c in p) for p in pieces)
            return data == "的 a".encode("utf-8")
        except (KeyError, TypeError):
            return False

    def exact(self, text: str) -> int | None:
        """The one token whose bytes are exactly `text`, or None."""
        data = text.encode("utf-8")
        for i in self.by_first_char.get(text[:1], ()):
            if self.bytes[i] == data:
                return i
        return None

    def ending_ids(self) -> tuple[list[int], int | None]:
        """(tokens that start with a clause-end comma, the sentence-end token "。") -- cached."""
        cached = getattr(self, "_ending_ids", None)
        if cached is None:
            commas = list(self.by_first_char.get(CLAUSE_END, ()))
            cached = self._ending_ids = (commas, self.exact(SENTENCE_END))
        return cached

    def writing(self, banned: str, k: int) -> list[int]:
        """Tokens that, after `banned[:k]`, continue writing `banned` (a prefix of the rest, or all of it and more)."""
        cache = self.__dict__.setdefault("_writing", {})
        ids = cache.get((banned, k))
        if ids is None:
            rest = banned[k:].encode("utf-8")
            ids = cache[(banned, k)] = [i for i, data in enumerate(self.bytes)
                                        if data and (rest.startswith(data) or data.startswith(rest))]
        return ids

    def completing(self, word: str, k: int) -> list[int]:
        """Tokens that, after `word[:k]`, would complete `word`: they write all of the rest, or write into its
        last character (after a lead byte nothing can stop the character). A proper prefix made of whole
        characters is not among them: the next character boundary decides again."""
        cache = self.__dict__.setdefault("_completing", {})
        ids = cache.get((word, k))
        if ids is None:
            rest = word[k:].encode("utf-8")
            before_last = len(rest) - len(word[-1].encode("utf-8"))
            first = word[k]
            candidates = list(self.by_first_char.get(first, ()))
            lead = first.encode("utf-8")
            for n in range(1, len(lead)):
                candidates.extend(self.by_lead_bytes.get(lead[:n], ()))
            ids = cache[(word, k)] = [i for i in candidates if (data := self.bytes[i]).startswith(rest)
                                      or (rest.startswith(data) and len(data) > before_last)]
        return ids

    def writing_on(self, word: str, k: int) -> list[int]:
        """Tokens that, at a character boundary after `word[:k]`, write on with `word`: a prefix of the rest (a
        lead byte of its next character included) or all of it and more -- not another word that shares its next
        character ("黑白" does not write on with 黑色). Like `writing`, from the next character's tokens only."""
        cache = self.__dict__.setdefault("_writing_on", {})
        ids = cache.get((word, k))
        if ids is None:
            rest = word[k:].encode("utf-8")
            ids = cache[(word, k)] = [i for i in self.heading_for(word[k])
                                      if rest.startswith(data := self.bytes[i]) or data.startswith(rest)]
        return ids

    def continuing(self, rest: bytes) -> list[int]:
        """Tokens that, inside a character, write on with the bytes `rest` (a prefix of them, or all and more)."""
        return [i for i in self.by_inside_byte.get(rest[0], ())
                if rest.startswith(data := self.bytes[i]) or data.startswith(rest)]

    def heading_for(self, char: str) -> list[int]:
        """Tokens that, at a character boundary, write `char` first or start writing it."""
        ids = list(self.by_first_char.get(char, ()))
        data = char.encode("utf-8")
        for k in range(1, len(data)):
            ids.extend(self.by_lead_bytes.get(data[:k], ()))
        return ids


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def token_table(tokenizer) -> TokenTable:
    with _TABLES_LOCK:
        table = _TABLES.get(tokenizer)
        if table is None:
            table = TokenTable(tokenizer)
            _TABLES[tokenizer] = table
        return table


# ---- per-request state ----------------------------------------------------------------------------
class RepeatState:
    """One request's completion as characters, fed token by token.

    `push(ids)` adds generated tokens (stop / special tokens end the request's text); `penalties()`
    gives {token id: logit penalty} for the next step (empty in the middle of a character);
    `looped` says whether the completion ends in a loop (`trim_loop` cuts it).
    """

    def __init__(self, table: TokenTable, config: DecodingConfig, stop_ids: Sequence[int] = (),
                 attributes: Attributes | None = None) -> None:
        self.table = table
        self.config = config
        self.stop_ids = set(int(i) for i in stop_ids)
        # the ending bonus goes to the end-of-turn token (listed first by ChatFormatter.stop_token_ids)
        self.end_id = int(stop_ids[0]) if len(stop_ids) else None
        self.text = ""
        self.pending = b""  # bytes of a character not yet complete
        self.finished = False
        self.looped = False
        self._z: list[int] | None = None
        # the request's input attributes (adgen.generation.coverage.prompt_attributes): values to name, words
        # the copy may repeat
        self.coverage = CoverageState(table, config, attributes)
        self.words = WordCounts([v for _, v in attributes or ()])

    def push(self, ids: Sequence[int]) -> None:
        for tok in ids:
            tok = int(tok)
            if self.finished:
                return
            if tok in self.stop_ids:
                self.finished = True
                return
            data = self.table.bytes[tok] if 0 <= tok < self.table.vocab_size else b""
            if not data:
                continue
            self.pending += data
            text, self.pending = _complete_chars(self.pending)
            if text:
                self.text += text
                self._z = None
                if self.config.loop_detection and not self.looped:
                    if loop_cut(self.text, self._matches()) is not None:
                        self.looped = self.finished = True

    def _matches(self) -> list[int]:
        if self._z is None:
            self._z = suffix_matches(self.text)
        return self._z

    def ending_bias(self) -> float:
        """The ending bonus for the next token (0 before `end_after_chars`, inside a character, or when done)."""
        config = self.config
        if self.finished or self.pending or not config.ends_copy:
            return 0.0
        past = len(self.text) - config.end_after_chars + 1
        if past <= 0 or self.holds_end:
            return 0.0
        return min(END_BIAS_CAP, past * config.end_bias_per_char)

    @property
    def holds_end(self) -> bool:
        """The text may not end yet: an input attribute value is not named and the text is short of the cap."""
        self.coverage.update(self.text)
        return self.coverage.holds_end(self.text)

    @property
    def at_sentence_end(self) -> bool:
        return bool(self.text) and self.text[-1] in SENTENCE_ENDS

    def penalties(self) -> dict[int, float]:
        if self.finished or not self.config.shapes_logits:
            return {}
        if self.pending:  # inside a character: only a missing value the bytes so far began is helped on
            return {tok: -bonus for tok, bonus in self.coverage.pending_bonuses(self.text, self.pending).items()}
        out: dict[int, float] = {}
        markup, words = _banned_index(self.config.banned_strings)
        for banned in markup:  # markup ("<UNK>"): never start, nor go on with, it
            for k in range(len(banned)):
                if k == 0 or self.text.endswith(banned[:k]):
                    out.update(dict.fromkeys(self.table.writing(banned, k), float("inf")))
        # words (最佳, 国家级, a brand): may be started (最新, 国家标准), never completed
        out.update(words.start_ban(self.table))
        for j in range(1, min(words.longest, len(self.text)) + 1):
            for word, k in words.by_prefix.get(self.text[-j:], ()):
                out.update(dict.fromkeys(self.table.completing(word, k), float("inf")))
        if self.holds_end:
            out.update(dict.fromkeys(self.stop_ids, HOLD_PENALTY))
        if self.text:
            for char, penalty in dangerous_chars(self.text, self.config, self._matches()).items():
                for tok in self.table.heading_for(char):
                    if penalty > out.get(tok, 0.0):
                        out[tok] = penalty
            for tok, penalty in word_penalties(self.words, self.text, self.table, self.config).items():
                if penalty > out.get(tok, 0.0):
                    out[tok] = penalty
        # the bonus adds to what a token loses (DRY on a value's start), never lifts a ban
        for tok, bonus in self.coverage.bonuses(self.text).items():
            if out.get(tok, 0.0) != float("inf"):
                out[tok] = out.get(tok, 0.0) - bonus
        return out


class _Words:
    def __init__(self, words: tuple[str, ...]) -> None:
        self.starters = words
        self.by_prefix: dict[str, list[tuple[str, int]]] = {}  # a proper prefix -> [(word, its length)]
        for w in words:
            for k in range(1, len(w)):
                self.by_prefix.setdefault(w[:k], []).append((w, k))
        self.longest = max((len(w) - 1 for w in words), default=0)
        self._start: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def start_ban(self, table: TokenTable) -> dict[int, float]:
        """{token: inf} for the tokens that would write a whole word at once (the same at every boundary)."""
        ban = self._start.get(table)
        if ban is None:
            ban = self._start[table] = {i: float("inf") for w in self.starters for i in table.completing(w, 0)}
        return ban


@functools.lru_cache(maxsize=64)
def _banned_index(banned: tuple[str, ...]) -> tuple[tuple[str, ...], _Words]:
    """(markup: banned strings whose first character is not a letter, ideograph or digit -- never started;
    words: the rest -- banned only where they would be completed), with the words indexed by prefix."""
    markup = tuple(b for b in banned if not b[0].isalnum())
    return markup, _Words(tuple(b for b in banned if b[0].isalnum()))


def _complete_chars(data: bytes) -> tuple[str, bytes]:
    """(the complete characters at the start of `data`, the incomplete rest). Invalid bytes are dropped,
    as the text decoder drops them (no U+FFFD in any text)."""
    text = data.decode("utf-8", errors="ignore") if data else ""
    # keep an incomplete character at the end (a valid prefix of a multi-byte sequence) pending
    for k in range(1, min(3, len(data)) + 1):
        tail = data[-k:]
        lead = tail[0]
        need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 0
        if need and k < need and all((b & 0xC0) == 0x80 for b in tail[1:]):
            head = data[:-k].decode("utf-8", errors="ignore")
            return head, tail
    return text, b""

