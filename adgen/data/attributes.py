"""AdGen attribute strings: `key#value` pairs joined by `*`, e.g. `类型#裙*版型#显瘦*版型#宽松`.

Attributes are an ordered list of pairs, not a dict: a key may repeat (版型#显瘦*版型#宽松) and the
order is what the data gives, so parse -> format returns the original string.
"""

from __future__ import annotations

from collections.abc import Mapping

PAIR_SEP = "*"
KV_SEP = "#"


def parse_attributes(content: str) -> list[tuple[str, str]]:
    """`"类型#裙*颜色#黑色"` -> `[("类型", "裙"), ("颜色", "黑色")]`.

    Raises ValueError whose message says which part failed, e.g. `part 2 'abc' is not key#value`.
    Spaces around keys and values are dropped (hand-typed inputs), nothing else is normalised.
    """
    if not isinstance(content, str):
        raise ValueError(f"attributes must be a string, got {type(content).__name__}")
    if not content.strip():
        raise ValueError("attribute string is empty")
    pairs: list[tuple[str, str]] = []
    for i, part in enumerate(content.strip().split(PAIR_SEP), start=1):
        if not part.strip():
            raise ValueError(f"part {i} is empty (a stray '{PAIR_SEP}')")
        if part.count(KV_SEP) != 1:
            what = "has no" if KV_SEP not in part else "has more than one"
            raise ValueError(f"part {i} {part.strip()!r} is not key{KV_SEP}value ({what} '{KV_SEP}')")
        key, value = (s.strip() for s in part.split(KV_SEP))
        if not key or not value:
            raise ValueError(f"part {i} {part.strip()!r} is not key{KV_SEP}value (empty {'key' if not key else 'value'})")
        pairs.append((key, value))
    return pairs



def attributes_of(content: str) -> list[tuple[str, str]] | None:
    """The attribute pairs of `content`, or None when it is not an attribute string (free text): the
    faithfulness figures are then unknown, not zero."""
    try:
        return parse_attributes(content)
    except ValueError:
        return None

def format_attributes(attrs: Mapping[str, str | list[str]] | list[tuple[str, str]]) -> str:
    """The inverse of `parse_attributes`. A mapping value may be a list (a repeated key).

    Raises ValueError for an empty key/value or one containing a separator, which would not
    parse back into the same pairs.
    """
    if isinstance(attrs, Mapping):
        pairs = [(k, v) for k, vs in attrs.items() for v in ([vs] if isinstance(vs, str) else vs)]
    else:
        pairs = list(attrs)
    if not pairs:
        raise ValueError("no attributes to format")
    for key, value in pairs:
        for name, s in (("key", key), ("value", value)):
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"attribute {name} {s!r} is empty or not a string")
            if KV_SEP in s or PAIR_SEP in s:
                raise ValueError(f"attribute {name} {s!r} contains '{KV_SEP}' or '{PAIR_SEP}'")
    return PAIR_SEP.join(f"{k.strip()}{KV_SEP}{v.strip()}" for k, v in pairs)
