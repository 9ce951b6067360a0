"""Attribute faithfulness: does the copy say what the attributes say, and nothing against them?

An `AttributeVocab` holds, for each attribute key, the values seen in training data with their
counts (颜色 -> 白色: 233, 黑色: 298, ...), plus the small policy below; it is saved as JSON with a
run so the figures can be recomputed. `AttributeVocab.default()` is the built-in one, made by
`scripts/build_attribute_vocab.py` from the 4000 AdGen training records (values seen >= 2 times).

Definitions, per example (input attributes = distinct `(key, value)` pairs; text and values are
compared lower-cased, so "V领" matches the value "v领"):

- **coverage** (`attr_coverage`): share of the distinct input values that are substrings of the
  text (颜色#纯色*图案#纯色 counts "纯色" once). Values of `类型` (上衣 / 裙 / 裤) are left out:
  copy names the garment by its form (衬衫, 卫衣), so `类型#上衣` would be "missing" from nearly
  every good text. `None` when nothing is left to count.
- **mentions**: the vocabulary values the text names, found by a left-to-right longest match (so
  "深蓝色" is one mention, not also "蓝色"). Only *matchable* values take part: at least 2
  characters with a CJK character, or pure ASCII of at least 4 characters ("polo"); 1-character
  values (潮, 棉, 裙) and "ol" / "h" would match inside unrelated words. *Vague* values (纯色, 深色,
  浅色, 黑白, 常规) commit to nothing and are never mentions.
- a mention is **supported** when it equals an input value, is a substring of one, or contains a
  matchable one (input 蓝色, text 深蓝色; input 米白色, text 白色).
- **contradiction**: an unsupported mention `w` of an input key `K` that is *exclusive* (a garment
  has one of its values) where the input gives a value of `K` in the same exclusive group as `w`.
  Input 颜色#白色, text "黑色连衣裙" -> contradiction 颜色#黑色. Exclusive keys: colour, the lengths
  (裙长, 裤长, 衣长, 裙衣长, 衣袖长, 裙袖长), collars (衣领型, 裙领型), waist height (裙腰型, 裤腰型)
  and 裤型. Groups split keys that mix two properties: 裙长 holds a kind (连衣裙 / 半身裙) and a
  length (长裙 / 短裙 / 中长裙 / 中裙), so "连衣裙" + "长裙" is no contradiction; 松紧腰 is not a
  waist height; 连体裤 / 背带裤 are not a length or leg shape. Keys like 风格, 图案, 款式, 材质 are
  not exclusive: copy may combine 复古 and 简约, or mention 蕾丝 trim on a 棉 shirt.
- **hallucinated attribute**: an unsupported mention none of whose keys is in the input, for the
  checkable-fact keys (the exclusive keys and 材质): input without a colour, text says 红色.
  Styling advice ("搭配白色T恤") counts too: read the figure against the references' own (the
  AdGen references themselves score about 0.1 hallucinated values per example on dev;
  see docs/METRICS.md).

Counts are of distinct values per example (a value named twice counts once).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from adgen.data.attributes import parse_attributes
from adgen.errors import DataError
from adgen.io import atomic_write_json, read_json_file
from adgen.metrics.text_stats import is_cjk

Attributes = Sequence[tuple[str, str]]

VOCAB_FORMAT = "adgen-attribute-vocab"
VOCAB_VERSION = 1
DEFAULT_MIN_COUNT = 2

# key -> None (all its values are one exclusive group) or the groups of mutually exclusive values.
DEFAULT_EXCLUSIVE: dict[str, list[list[str]] | None] = {
    "颜色": None,
    "裙长": [["连衣裙", "半身裙"], ["长裙", "短裙", "中长裙", "中裙"]],
    "裤长": [["长裤", "九分裤", "八分裤", "七分裤", "五分裤", "短裤"]],
    "衣长": None,
    "裙衣长": None,
    "衣袖长": None,
    "裙袖长": None,
    "衣领型": None,
    "裙领型": None,
    "裙腰型": [["高腰", "中腰", "低腰", "自然腰"]],
    "裤腰型": [["高腰", "中腰", "低腰", "自然腰"]],
    "裤型": [["阔腿裤", "直筒裤", "哈伦裤", "铅笔裤", "灯笼裤", "垮裤"]],
}
DEFAULT_HALLUCINATION_KEYS: tuple[str, ...] = (*DEFAULT_EXCLUSIVE, "材质")
DEFAULT_VAGUE_VALUES: tuple[str, ...] = ("纯色", "深色", "浅色", "黑白", "常规")
COVERAGE_SKIP_KEYS: frozenset[str] = frozenset({"类型"})


def is_matchable(value: str) -> bool:
    """Can `value` be looked for as a substring without matching inside unrelated words?"""
    if value.isascii():
        return len(value) >= 4
    return len(value) >= 2 and any(map(is_cjk, value))


def _attributes_of(item: Any) -> list[tuple[str, str]]:
    """Attributes of a record-like item: `.attributes`, a content string, or a (key, value) list."""
    if hasattr(item, "attributes"):
        return list(item.attributes)
    if isinstance(item, str):
        return parse_attributes(item)
    if isinstance(item, Mapping) and "content" in item:
        return parse_attributes(item["content"])
    return [(str(k), str(v)) for k, v in item]


@dataclass
class AttributeVocab:
    """key -> {value: count} from training data, plus the matching policy (see module docstring)."""

    values: dict[str, dict[str, int]]
    exclusive: dict[str, list[list[str]] | None] = field(default_factory=lambda: dict(DEFAULT_EXCLUSIVE))
    hallucination_keys: tuple[str, ...] = DEFAULT_HALLUCINATION_KEYS
    vague_values: tuple[str, ...] = DEFAULT_VAGUE_VALUES
    min_count: int = DEFAULT_MIN_COUNT
    source: str | None = None

    # ---- construction / persistence -------------------------------------------------------

    @classmethod
    def from_records(
        cls, records: Iterable[Any], *, min_count: int = DEFAULT_MIN_COUNT, source: str | None = None
    ) -> "AttributeVocab":
        """Count values per key over `records` (Records, content strings or pair lists); keep count >= min_count."""
        counts: dict[str, Counter[str]] = {}
        for item in records:
            for key, value in _attributes_of(item):
                counts.setdefault(key, Counter())[value] += 1
        values = {
            key: {v: n for v, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count}
            for key, c in sorted(counts.items())
        }
        return cls(values={k: v for k, v in values.items() if v}, min_count=min_count, source=source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "source": self.source,
            "min_count": self.min_count,
            "policy": {
                "exclusive": self.exclusive,
                "hallucination_keys": list(self.hallucination_keys),
                "vague_values": list(self.vague_values),
            },
            "values": self.values,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "attribute vocabulary") -> "AttributeVocab":
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT or not isinstance(data.get("values"), dict):
            raise DataError(
                f"{where}: not an adgen attribute vocabulary (expected a JSON object with "
                f'"format": "{VOCAB_FORMAT}" and "values"). Make one with AttributeVocab.from_records(...).save(path) '
                "or scripts/build_attribute_vocab.py."
            )
        if data.get("version", VOCAB_VERSION) > VOCAB_VERSION:
            raise DataError(f"{where}: vocabulary version {data['version']} is newer than this adgen; upgrade adgen.")
        policy = data.get("policy") or {}
        try:
            values = {str(k): {str(v): int(n) for v, n in vs.items()} for k, vs in data["values"].items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise DataError(f'{where}: "values" must map key -> {{value: count}} ({e}).') from None
        return cls(
            values=values,
            exclusive=policy.get("exclusive", dict(DEFAULT_EXCLUSIVE)),
            hallucination_keys=tuple(policy.get("hallucination_keys", DEFAULT_HALLUCINATION_KEYS)),
            vague_values=tuple(policy.get("vague_values", DEFAULT_VAGUE_VALUES)),
            min_count=int(data.get("min_count", DEFAULT_MIN_COUNT)),
            source=data.get("source"),
        )

    @classmethod
    def load(cls, path: str | Path) -> "AttributeVocab":
        data = read_json_file(path, "attribute vocabulary file")
        return cls.from_dict(data, where=str(path))

    @classmethod
    def default(cls) -> "AttributeVocab":
        """The built-in vocabulary (AdGen train, values seen >= 2 times), shipped in adgen/resources."""
        return _default_vocab()

    # ---- matching ---------------------------------------------------------------------------

    @cached_property
    def _keys_of(self) -> dict[str, frozenset[str]]:
        """matchable, non-vague value (lower-cased) -> the keys it is a value of."""
        index: dict[str, set[str]] = {}
        for key, vs in self.values.items():
            for v in vs:
                lv = v.lower()
                if is_matchable(lv) and lv not in self._vague:
                    index.setdefault(lv, set()).add(key)
        return {v: frozenset(ks) for v, ks in index.items()}

    @cached_property
    def _vague(self) -> frozenset[str]:
        return frozenset(v.lower() for v in self.vague_values)

    @cached_property
    def _max_len(self) -> int:
        return max(map(len, self._keys_of), default=0)

    def keys_of(self, value: str) -> frozenset[str]:
        return self._keys_of.get(value.lower(), frozenset())

    def mentions(self, text: str) -> list[str]:
        """Distinct vocabulary values named in `text`, in order, by left-to-right longest match."""
        t, found, i = text.lower(), {}, 0
        while i < len(t):
            for size in range(min(self._max_len, len(t) - i), 1, -1):
                if t[i : i + size] in self._keys_of:
                    found.setdefault(t[i : i + size], None)
                    i += size
                    break
            else:
                i += 1
        return list(found)

    def group_of(self, key: str, value: str) -> int | None:
        """Index of the exclusive group of `key` holding `value`; None when `key` does not exclude it."""
        if key not in self.exclusive or value.lower() in self._vague:
            return None
        groups = self.exclusive[key]
        if groups is None:
            return 0
        return next((i for i, g in enumerate(groups) if value.lower() in {x.lower() for x in g}), None)


@lru_cache(maxsize=1)
def _default_vocab() -> AttributeVocab:
    resource = files("adgen").joinpath("resources/attribute_vocab.json")
    return AttributeVocab.from_dict(json.loads(resource.read_text(encoding="utf-8")), where=str(resource))


def _supported(mention: str, input_values: Iterable[str]) -> bool:
    # 1-character input values (裙, 棉) would make every mention containing them "supported".
    return any(mention == v or mention in v or (is_matchable(v) and v in mention) for v in input_values)


def coverage_values(attributes: Attributes) -> list[str]:
    """The distinct input values coverage counts, lower-cased, in input order (类型 left out; 颜色#纯色*图案#纯色
    asks for "纯色" once). The decoder's coverage bonus (adgen.generation.coverage) uses the same list."""
    return list(dict.fromkeys(v.lower() for k, v in attributes if k not in COVERAGE_SKIP_KEYS))


def missing_values(values: Sequence[str], text: str) -> list[str]:
    """The `values` (from `coverage_values`) that `text` does not name: a value is named where it is a
    substring of the lower-cased text."""
    lowered = text.lower()
    return [v for v in values if v not in lowered]


def faithfulness(attributes: Attributes, text: str, vocab: AttributeVocab) -> dict[str, Any]:
    """Coverage, contradictions and hallucinated attributes of `text` for one input (see module doc)."""
    pairs = list(dict.fromkeys((k, v.lower()) for k, v in attributes))
    counted = coverage_values(attributes)
    missing = missing_values(counted, text)
    by_key: dict[str, list[str]] = {}
    for k, v in pairs:
        by_key.setdefault(k, []).append(v)
    input_values = [v for _, v in pairs]

    contradictions: list[dict[str, Any]] = []
    hallucinated: list[dict[str, Any]] = []
    for w in vocab.mentions(text):
        if _supported(w, input_values):
            continue
        keys = vocab.keys_of(w)
        given = sorted(keys & by_key.keys())
        if given:
            clash = _contradiction(w, given, by_key, vocab)
            if clash:
                contradictions.append(clash)
        elif keys & set(vocab.hallucination_keys):
            hallucinated.append({"keys": sorted(keys & set(vocab.hallucination_keys)), "value": w})
    return {
        "attr_coverage": (len(counted) - len(missing)) / len(counted) if counted else None,
        "attr_missing": missing,
        "contradictions": contradictions,
        "hallucinated": hallucinated,
        "n_contradictions": len(contradictions),
        "n_hallucinated": len(hallucinated),
    }


def _contradiction(
    mention: str, given_keys: list[str], by_key: dict[str, list[str]], vocab: AttributeVocab
) -> dict[str, Any] | None:
    """The first input key whose given values share an exclusive group with `mention`, if any."""
    for key in given_keys:
        group = vocab.group_of(key, mention)
        if group is None:
            continue
        rivals = [v for v in by_key[key] if vocab.group_of(key, v) == group]
        if rivals:
            return {"key": key, "value": mention, "input": rivals}
    return None
