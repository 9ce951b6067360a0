"""Advertising-Law compliance: the absolute terms a Chinese ad may not use, found in a text.

China's Advertising Law (2015 revision) Art. 9(3) forbids "国家级", "最高级", "最佳" and similar
terms; SAMR's 2023 guidance on absolute terms says which terms are "similar" and when context
exempts them. The rules -- which terms, which patterns, which exceptions and why -- live in one
versioned file, `adgen/resources/compliance/ad_law_terms.json` (docs/METRICS.md, "Compliance").

- `ad_law_terms()` -> the built-in `TermList` (loaded once); `load_term_list(path)` reads one.
- `find_violations(text, extra_terms=())` -> the forbidden strings found in `text`, in order of first
  occurrence, each once. `extra_terms`: a merchant's own list (brand rules, competitor names),
  matched as plain substrings, Latin letters case-insensitively.
- `find_hits(text, extra_terms=())` -> the same as `Hit`s (term, rule id, span).
- `read_term_file(path)` -> a merchant's list from a text file (one term a line, `#` comments).
- `compliance_scores(text, extra_terms)` -> the per-example field (`compliance_terms`).

A hit is a screening result ("a person should look at this"), not a legal finding: the guidance's
exemptions (self-comparison, consumer tips, trademarks, awards, facts limited in time and place)
depend on context no pattern sees. Matching is on the NFKC form of the text, so full-width
"ＮＯ．１" / "１００％有效" are found like their ASCII forms.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from adgen.errors import DataError
from adgen.io import read_json_file, read_utf8_text

MERCHANT_RULE = "merchant"
COMPLIANCE_KEY = "compliance_terms"  # per example: the forbidden strings found in the prediction


@dataclass(frozen=True)
class Rule:
    """One group of the list: plain `terms`, regex `patterns`, and `exceptions` that clear a hit inside them."""

    id: str
    title: str
    note: str
    ban: bool
    terms: tuple[str, ...]
    patterns: tuple[str, ...]
    exceptions: tuple[str, ...]
    regexes: tuple[re.Pattern, ...]  # the terms (one alternation, longest first) + each pattern
    exception_regexes: tuple[re.Pattern, ...]


@dataclass(frozen=True)
class Hit:
    term: str  # the matched text (NFKC form)
    rule: str  # the rule id, or "merchant"
    start: int
    end: int


@dataclass(frozen=True)
class TermList:
    name: str
    version: str
    date: str
    legal_basis: tuple[dict[str, Any], ...]
    rules: tuple[Rule, ...]
    source: str

    @property
    def label(self) -> str:
        """`name version`: what metrics record as the list that produced them."""
        return f"{self.name} {self.version}"

    @property
    def banned_strings(self) -> tuple[str, ...]:
        """The plain terms of the rules marked `ban` (the decoder's default; patterns cannot be banned)."""
        out: list[str] = []
        for rule in self.rules:
            if rule.ban:
                out.extend(t for t in rule.terms if t not in out)
        return tuple(out)

    def find_hits(self, text: str, extra_terms: Sequence[str] = ()) -> list[Hit]:
        """Every forbidden match in `text`: the leftmost-longest of overlapping ones, in text order."""
        if not text:
            return []
        text = unicodedata.normalize("NFKC", text)
        found: list[Hit] = []
        for rule in self.rules:
            cleared = [m.span() for rx in rule.exception_regexes for m in rx.finditer(text)]
            for rx in rule.regexes:
                for m in rx.finditer(text):
                    if m.end() > m.start() and not any(a <= m.start() and m.end() <= b for a, b in cleared):
                        found.append(Hit(m.group(0), rule.id, m.start(), m.end()))
        merchant = _merchant_regex(tuple(extra_terms))
        if merchant is not None:
            found.extend(Hit(m.group(0), MERCHANT_RULE, m.start(), m.end()) for m in merchant.finditer(text))
        found.sort(key=lambda h: (h.start, -(h.end - h.start)))
        kept: list[Hit] = []
        for hit in found:
            if not kept or hit.start >= kept[-1].end:
                kept.append(hit)
        return kept

    def find_violations(self, text: str, extra_terms: Sequence[str] = ()) -> list[str]:
        """The forbidden strings found, each once, in order of first occurrence."""
        return list(dict.fromkeys(h.term for h in self.find_hits(text, extra_terms)))


def _alternation(terms: Iterable[str], flags: int = 0) -> re.Pattern:
    ordered = sorted(set(terms), key=lambda t: (-len(t), t))  # longest first: 全网最低价 before 最低价
    return re.compile("|".join(re.escape(t) for t in ordered), flags)


@lru_cache(maxsize=32)
def _merchant_regex(terms: tuple[str, ...]) -> re.Pattern | None:
    kept = [unicodedata.normalize("NFKC", t.strip()) for t in terms]
    kept = [t for t in kept if t]
    return _alternation(kept, re.IGNORECASE) if kept else None


TERM_LIST_FIX = "fix the compliance term list (format: adgen/resources/compliance/ad_law_terms.json)"


def _fail(where: str, reason: str) -> DataError:
    return DataError(f"{where}: {reason}; {TERM_LIST_FIX}.")


def _strings(obj: dict, key: str, where: str) -> tuple[str, ...]:
    values = obj.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise _fail(where, f'"{key}" must be a list of non-empty strings')
    return tuple(values)


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise _fail(where, f"bad regex {pattern!r} ({e})") from None


def parse_term_list(data: Any, source: str) -> TermList:
    """A TermList from the JSON object of a term-list file; DataError naming `source` when it is not one."""
    if not isinstance(data, dict):
        raise _fail(source, "expected a JSON object")
    for key in ("name", "version"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise _fail(source, f'no "{key}" string')
    if not isinstance(data.get("rules"), list) or not data["rules"]:
        raise _fail(source, 'no "rules" list')
    rules: list[Rule] = []
    for i, raw in enumerate(data["rules"]):
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
            raise _fail(f"{source}: rules[{i}]", 'each rule needs an "id" string')
        where = f"{source}: rule {raw['id']!r}"
        if raw["id"] in {r.id for r in rules} or raw["id"] == MERCHANT_RULE:
            raise _fail(where, "duplicate or reserved rule id")
        terms, patterns = _strings(raw, "terms", where), _strings(raw, "patterns", where)
        exceptions = _strings(raw, "exceptions", where)
        if not terms and not patterns:
            raise _fail(where, 'a rule needs "terms" or "patterns"')
        regexes = ([_alternation(unicodedata.normalize("NFKC", t) for t in terms)] if terms else [])
        regexes += [_compile(p, where) for p in patterns]
        rules.append(Rule(
            id=raw["id"], title=str(raw.get("title", "")), note=str(raw.get("note", "")), ban=bool(raw.get("ban", False)),
            terms=terms, patterns=patterns, exceptions=exceptions, regexes=tuple(regexes),
            exception_regexes=tuple(_compile(p, where) for p in exceptions),
        ))
    return TermList(
        name=data["name"], version=data["version"], date=str(data.get("date", "")),
        legal_basis=tuple(data.get("legal_basis") or ()), rules=tuple(rules), source=source,
    )


def load_term_list(path: str | Path) -> TermList:
    data = read_json_file(path, "term list file", fix=TERM_LIST_FIX)
    return parse_term_list(data, str(path))


@lru_cache(maxsize=1)
def ad_law_terms() -> TermList:
    """The built-in list (adgen/resources/compliance/ad_law_terms.json), loaded once."""
    res = resources.files("adgen") / "resources" / "compliance" / "ad_law_terms.json"
    return parse_term_list(json.loads(res.read_text(encoding="utf-8")), "adgen/resources/compliance/ad_law_terms.json")


def find_hits(text: str, extra_terms: Sequence[str] = ()) -> list[Hit]:
    return ad_law_terms().find_hits(text, extra_terms)


def find_violations(text: str, extra_terms: Sequence[str] = ()) -> list[str]:
    """The forbidden strings in `text` (the built-in list + `extra_terms`), each once, in order."""
    return ad_law_terms().find_violations(text, extra_terms)


def compliance_scores(text: str, extra_terms: Sequence[str] = ()) -> dict[str, list[str]]:
    """The per-example field: {"compliance_terms": [the forbidden strings found]}."""
    return {COMPLIANCE_KEY: find_violations(text, extra_terms)}


def read_term_file(path: str | Path) -> tuple[str, ...]:
    """A merchant's list: UTF-8 text, one term a line; blank lines and lines starting with # are skipped."""
    text = read_utf8_text(path, "a UTF-8 text file with one forbidden term a line")
    terms = [line.strip() for line in text.splitlines()]
    terms = [t for t in terms if t and not t.startswith("#")]
    if not terms:
        raise DataError(f"{path}: no terms in the file; write one forbidden term a line (# starts a comment).")
    return tuple(dict.fromkeys(terms))


def compliance_summary(per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate figures over rows that carry `compliance_terms` (empty when none does):
    `compliance_violation_rate` (share of rows with >= 1 term) and `compliance_terms_found`
    ({term: rows containing it}, most frequent first)."""
    checked = [s[COMPLIANCE_KEY] for s in per_example if COMPLIANCE_KEY in s]
    if not checked:
        return {}
    counts: dict[str, int] = {}
    for terms in checked:
        for t in set(terms):
            counts[t] = counts.get(t, 0) + 1
    return {
        "compliance_violation_rate": sum(bool(t) for t in checked) / len(checked),
        "compliance_terms_found": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
