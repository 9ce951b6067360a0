"""Decoding settings and the result of one generation (shared by every backend)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Literal

from adgen.errors import ConfigError

FinishReason = Literal["stop", "length", "loop", "cancelled"]

# Requests decoding together (continuous batching's slots) unless told otherwise: `adgen generate` / `eval` /
# `serve --batch-size` and the library's generators.
GENERATION_BATCH_SIZE = 32

# A text of this many characters fits every AdGen reference (dev p99 176, max 237 characters).
ROOM_CHARS = 192


# Text no merchant can publish: "<UNK>", the placeholder in 31% of AdGen's train references.
DEFAULT_BANNED_STRINGS: tuple[str, ...] = ("<UNK>",)


def ad_law_banned_strings() -> tuple[str, ...]:
    """The Advertising Law's absolute terms that can be banned as strings (国家级, 最佳, 顶级, 销量第一 ...):
    the plain terms of the rules marked "ban" in adgen/resources/compliance/ad_law_terms.json, the list the
    scorer checks (`adgen.metrics.compliance`). Patterns (NO.1, 最好 + not advice) cannot be banned as strings.

    In the default (`default_banned_strings()`): `RepeatState.penalties` bans such words where they would be
    completed, not where they start, so 最新, 国家标准 and 中长款 stay writable.
    """
    from adgen.metrics.compliance import ad_law_terms

    return ad_law_terms().banned_strings


def default_banned_strings() -> tuple[str, ...]:
    """What decoding never writes unless told otherwise: "<UNK>" and the Advertising Law's absolute terms."""
    return DEFAULT_BANNED_STRINGS + ad_law_banned_strings()


# The adgen-specific shaping switched off (the fields `DecodingConfig.plain` sets).
PLAIN_FIELDS = {"dry_multiplier": 0.0, "no_repeat_char_ngram": 0, "loop_detection": False, "end_after_chars": 0,
                "banned_strings": ()}


@dataclass(frozen=True)
class DecodingConfig:
    """How to decode. Greedy by default (deterministic, what evaluation reports).

    - `do_sample=False` -> greedy; the sampling fields are then ignored. `temperature <= 0` also
      means greedy (the OpenAI convention), whatever `do_sample` says.
    - `top_k=0` and `top_p=1.0` disable those filters. `repetition_penalty=1.0` is off.
    - `no_repeat_ngram_size=N` (> 0) forbids any N-token sequence from occurring twice, prompt
      included (Hugging Face's n-gram blocking; 0 = off). It stays deterministic under greedy
      decoding and stops small models' phrase loops; N counts *tokens*, so pick it per tokenizer
      (SmolLM2 spends ~2.5 byte tokens on a Chinese character, Llama-3 about one).
    - `seed` makes sampling reproducible (the same seed and prompts give the same text).
    - `stop`: strings that end the text; the text is cut before the first one (finish_reason "stop").
    - Character-level repetition control (adgen.generation.repetition; on by default, greedy and
      sampled alike): `dry_multiplier` (0 = off), `dry_base`, `dry_allowed_length` (characters) and
      `dry_sequence_breakers` -- DRY on characters: a candidate that would extend a sequence of L >=
      allowed characters already written loses multiplier * base ** (L - allowed) from its logit;
      `no_repeat_char_ngram=N` (0 = off) bans any character N-gram from occurring twice;
      `loop_detection` stops a completion whose tail repeats, trims the repeats, finish_reason "loop".
    - Room to end, then an ending (on by default): past `end_after_chars` characters a clause end
      ("，") becomes a sentence end ("。" takes the comma's probability), and right after a sentence
      end (。！？) the end-of-turn token gets a logit bonus of `end_bias_per_char` per character past
      `end_after_chars`. The text ends at a sentence end near the length of real copy instead of
      listing phrases to the token limit; it never cuts a sentence or a character.
    - `banned_strings`: text never written, in any tokenization (default "<UNK>": 31% of AdGen's train
      references hold that placeholder, so a tuned model learns to write it; no merchant can publish it).
      A merchant's own list (brand rules, competitor names) goes here too; `ad_law_banned_strings()` are
      the Advertising Law's absolute terms (describe() names them as one item).
    - `max_new_tokens=None` sizes the limit from the tokenizer (`max_new_tokens_for`): room for
      ROOM_CHARS characters, so a model that would end can.
    The model's own end-of-turn ids always stop generation; they are not configured here.
    """

    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    dry_multiplier: float = 1.5  # 0.8 in llama.cpp; 1.5 chosen on dev records 17-80 (docs/BENCHMARK_NOTES.md section 3)
    dry_base: float = 1.75
    dry_allowed_length: int = 3
    dry_sequence_breakers: tuple[str, ...] = ("\n",)
    no_repeat_char_ngram: int = 0
    loop_detection: bool = True
    end_after_chars: int = 120  # AdGen references: mean 111 characters
    end_bias_per_char: float = 0.2
    banned_strings: tuple[str, ...] = field(default_factory=lambda: default_banned_strings())

    def __post_init__(self) -> None:
        # Accept a list (or a single string) for `stop`, keep a hashable tuple.
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        banned = self.banned_strings
        if isinstance(banned, str):
            banned = (banned,)
        object.__setattr__(self, "banned_strings", tuple(banned or ()))
        breakers = self.dry_sequence_breakers
        if isinstance(breakers, str):
            breakers = (breakers,)
        object.__setattr__(self, "dry_sequence_breakers", tuple(breakers or ()))
        self.validate()

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0

    def validate(self) -> None:
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ConfigError(f"max_new_tokens must be a positive integer (or None: sized from the tokenizer), not {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), not {self.top_k}")
        if not 0.01 <= self.repetition_penalty <= 100:  # 5e-324 divides a logit into inf: NaN probabilities
            raise ConfigError(f"repetition_penalty must be in [0.01, 100] (1.0 = off; 1.1-1.3 usual), "
                              f"not {self.repetition_penalty}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), not {self.no_repeat_ngram_size!r}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ConfigError("stop must be a list of strings")
        if not self.dry_multiplier >= 0:
            raise ConfigError(f"dry_multiplier must be >= 0 (0 = off; 1.5 here, 0.8 in llama.cpp), not {self.dry_multiplier}")
        if not self.dry_base >= 1.0:
            raise ConfigError(f"dry_base must be >= 1 (1.75 is the usual value), not {self.dry_base}")
        if not isinstance(self.dry_allowed_length, int) or self.dry_allowed_length < 1:
            raise ConfigError(f"dry_allowed_length must be an integer >= 1 (characters), not {self.dry_allowed_length!r}")
        if any(not isinstance(b, str) or len(b) != 1 for b in self.dry_sequence_breakers):
            raise ConfigError(f"dry_sequence_breakers must be single characters, not {list(self.dry_sequence_breakers)!r}")
        if not isinstance(self.no_repeat_char_ngram, int) or self.no_repeat_char_ngram < 0 or self.no_repeat_char_ngram == 1:
            raise ConfigError(f"no_repeat_char_ngram must be 0 (off) or an integer >= 2 (characters), not {self.no_repeat_char_ngram!r}")
        if not isinstance(self.end_after_chars, int) or isinstance(self.end_after_chars, bool) or self.end_after_chars < 0:
            raise ConfigError(f"end_after_chars must be an integer >= 0 (characters; 0 = off), not {self.end_after_chars!r}")
        if not self.end_bias_per_char >= 0:
            raise ConfigError(f"end_bias_per_char must be >= 0 (logits per character; 0 = off), not {self.end_bias_per_char}")
        if any(not isinstance(b, str) or not b for b in self.banned_strings):
            raise ConfigError(f"banned_strings must be non-empty strings, not {list(self.banned_strings)!r}")
        if not isinstance(self.loop_detection, bool):
            raise ConfigError(f"loop_detection must be true or false, not {self.loop_detection!r}")

    @property
    def ends_copy(self) -> bool:
        """The length-aware ending bonus is on."""
        return self.end_after_chars > 0 and self.end_bias_per_char > 0

    @property
    def shapes_logits(self) -> bool:
        """The character-level DRY, n-gram ban or ending bonus changes the logits."""
        return self.dry_multiplier > 0 or self.no_repeat_char_ngram > 0 or self.ends_copy or bool(self.banned_strings)

    @property
    def controls_repetition(self) -> bool:
        return self.shapes_logits or self.loop_detection

    def check_candidates(self, n: int) -> None:
        """`-n K` candidates per input need sampling: greedy decoding would make K identical ones."""
        if n < 1:
            raise ConfigError(f"-n must be >= 1, not {n}")
        if n > 1 and self.greedy:
            raise ConfigError(f"-n {n} with greedy decoding gives {n} identical candidates: add --do-sample "
                              "(and e.g. --temperature 0.95 --top-p 0.7)")

    def replace(self, **changes) -> "DecodingConfig":
        return replace(self, **changes)

    @classmethod
    def plain(cls, **fields) -> "DecodingConfig":
        """Decoding as `model.generate` does it: no character-level repetition control, no loop
        detection, no ending, nothing banned (`--plain`; the baseline of comparisons and benches)."""
        return cls(**{**PLAIN_FIELDS, **fields})

    def for_tokenizer(self, tokenizer) -> "DecodingConfig":
        """This config with `max_new_tokens` fixed (sized from the tokenizer when it is None)."""
        if self.max_new_tokens is not None:
            return self
        return self.replace(max_new_tokens=max_new_tokens_for(tokenizer))

    def describe(self) -> str:
        """One line for reports: which decoding produced the numbers."""
        limit = self.max_new_tokens if self.max_new_tokens is not None else "auto"
        if self.greedy:
            s = f"greedy, max_new_tokens={limit}"
        else:
            s = (f"sampling temperature={self.temperature} top_p={self.top_p} top_k={self.top_k}, "
                 f"max_new_tokens={limit}, seed={self.seed}")
        if self.repetition_penalty != 1.0:
            s += f", repetition_penalty={self.repetition_penalty}"
        if self.no_repeat_ngram_size:
            s += f", no_repeat_ngram_size={self.no_repeat_ngram_size}"
        if self.dry_multiplier > 0:
            s += f", char DRY {self.dry_multiplier}/{self.dry_base}/{self.dry_allowed_length}"
        if self.no_repeat_char_ngram:
            s += f", no_repeat_char_ngram={self.no_repeat_char_ngram}"
        if self.ends_copy:
            s += f", ending after {self.end_after_chars} chars (+{self.end_bias_per_char}/char)"
        if self.banned_strings:
            s += f", never writes {_banned_summary(self.banned_strings)}"
        if self.loop_detection:
            s += ", loop detection"
        return s


def _banned_summary(banned: tuple[str, ...], show: int = 8) -> str:
    """`<UNK>`, or `<UNK> + the Advertising Law's absolute terms (74)` -- never 80 terms in a report line."""
    parts: list[str] = []
    rest = banned
    if len(banned) > 1:
        law = ad_law_banned_strings()
        law_set = set(law)
        if law_set <= set(banned):
            rest = tuple(b for b in banned if b not in law_set)
            parts.append(f"the Advertising Law's absolute terms ({len(law)})")
    if rest:
        shown = "/".join(rest[:show]) + (f" and {len(rest) - show} more" if len(rest) > show else "")
        parts.insert(0, shown)
    return " + ".join(parts)


@dataclass
class Generation:
    """One finished completion.

    `text` is clean: no special tokens, cut before the first stop string, never ending in half a
    UTF-8 character. `completion_tokens` counts the generated tokens including the end-of-turn token
    the model emitted (as OpenAI-style usage does). `finish_reason`: "stop" (end-of-turn token or a
    stop string), "length" (max_new_tokens reached), "cancelled" (a stream closed early).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    token_ids: list[int] = field(default_factory=list, repr=False)


def max_new_tokens_for(tokenizer, chars: int = ROOM_CHARS) -> int:
    """Tokens that hold `chars` characters of ad copy with this tokenizer (measured on the built-in
    sample of copy, +10%, rounded up to 32): SmolLM2 ~2.1 tokens a character on the sample -> 448, Llama-3 ~1.0 -> 224."""
    per_char = _TOKENS_PER_CHAR.get(tokenizer)
    if per_char is None:
        text = _sample_copy()
        per_char = len(tokenizer(text, add_special_tokens=False)["input_ids"]) / max(1, len(text))
        _TOKENS_PER_CHAR[tokenizer] = per_char
    return int(chars * per_char * 1.1 + 31) // 32 * 32


_TOKENS_PER_CHAR: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> tokens per character


def _sample_copy() -> str:
    import json
    from importlib import resources

    path = resources.files("adgen") / "resources" / "sample_adgen.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    return "".join(json.loads(line)["summary"] for line in lines if line.strip())
