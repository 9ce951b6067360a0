"""`adgen data inspect`: what is in an AdGen file, as a JSON-serializable dict and as plain text.

Counts what matters before training: duplicates (they over-weight some products), placeholders the
model will learn to write (`<UNK>`, `BRAND`), the attribute vocabulary, and lengths (in characters
and, given a tokenizer, in tokens: what `max_length` must cover).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from adgen.data.records import DataFile

PLACEHOLDERS = ("<UNK>", "BRAND")
PERCENTILES = (50, 90, 99)


def length_stats(values: Sequence[int]) -> dict[str, float | int]:
    """min, p50, p90, p99, max (nearest-rank: always a length that occurs) and mean."""
    if not values:
        return {}
    xs = sorted(values)
    stats: dict[str, float | int] = {"min": xs[0]}
    for p in PERCENTILES:
        stats[f"p{p}"] = xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]
    stats["max"] = xs[-1]
    stats["mean"] = round(sum(xs) / len(xs), 1)
    return stats


def inspect_data(data: DataFile, tokenizer: Any = None, *, model: str | None = None, top: int = 10) -> dict[str, Any]:
    """Statistics of a read file. `tokenizer` (any HF tokenizer) adds token lengths; `model` names it."""
    records = data.records
    contents = [r.content for r in records]
    summaries = [r.summary for r in records if r.summary is not None]
    pairs = Counter((r.content, r.summary) for r in records)
    keys: Counter[str] = Counter()
    values: Counter[str] = Counter()
    per_record = []
    for r in records:
        attrs = r.attributes
        per_record.append(len(attrs))
        keys.update(k for k, _ in attrs)
        values.update(f"{k}#{v}" for k, v in attrs)
    placeholders = {
        ph: {
            "content": sum(c.count(ph) for c in contents),
            "summary": sum(s.count(ph) for s in summaries),
            "records": sum(ph in r.content or ph in (r.summary or "") for r in records),
        }
        for ph in PLACEHOLDERS
    }
    lengths: dict[str, Any] = {
        "content_chars": length_stats([len(c) for c in contents]),
        "summary_chars": length_stats([len(s) for s in summaries]),
    }
    if tokenizer is not None:
        for name, texts in (("content", contents), ("summary", summaries)):
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            lengths[f"{name}_tokens"] = length_stats([len(x) for x in ids])
        lengths["tokenizer"] = model or getattr(tokenizer, "name_or_path", None)
    return {
        "path": str(data.path),
        "records": len(records),
        "skipped": data.skipped,
        "encoding": data.encoding,
        "newline": data.newline,
        "errors": [{"line": e.line, "reason": e.reason} for e in data.errors],
        "records_without_summary": len(records) - len(summaries),
        "distinct_contents": len(set(contents)),
        "duplicate_pairs": sum(n - 1 for n in pairs.values()),  # identical (content, summary) beyond the first
        "placeholders": placeholders,
        "attributes": {
            "distinct_keys": len(keys),
            "distinct_pairs": len(values),
            "per_record": length_stats(per_record),
            "top_keys": keys.most_common(top),
            "top_values": values.most_common(top),
        },
        "lengths": lengths,
    }


def _stats_row(label: str, stats: dict[str, Any]) -> str:
    cols = ["min", *(f"p{p}" for p in PERCENTILES), "max", "mean"]
    return f"  {label:<10}" + "".join(f"{stats.get(c, '-'):>8}" for c in cols)


def format_inspect_text(report: dict[str, Any], max_errors: int = 10) -> str:
    """A human-readable rendering of `inspect_data`'s report."""
    attrs = report["attributes"]
    lines = [
        f"{report['path']}",
        f"  records            {report['records']}",
        f"  skipped            {report['skipped']}",
        f"  encoding           {report['encoding'].upper()} ({report['newline'].upper()} line ends)",
        f"  distinct contents  {report['distinct_contents']}",
        f"  duplicate pairs    {report['duplicate_pairs']}",
    ]
    if report["records_without_summary"]:
        lines.append(f"  without summary    {report['records_without_summary']}")
    for ph, c in report["placeholders"].items():
        lines.append(f"  {ph:<18} in {c['records']} records ({c['content']} in contents, {c['summary']} in summaries)")
    per = attrs["per_record"]
    lines.append(
        f"  attributes         {attrs['distinct_keys']} keys, {attrs['distinct_pairs']} key#value pairs, "
        f"{per.get('p50')} per record (p50), {per.get('max')} max"
    )
    lines.append("  top keys           " + ", ".join(f"{k} {n}" for k, n in attrs["top_keys"]))
    lines.append("  top values         " + ", ".join(f"{k} {n}" for k, n in attrs["top_values"]))
    header = f"  {'':<10}" + "".join(f"{c:>8}" for c in ["min", *(f"p{p}" for p in PERCENTILES), "max", "mean"])
    lengths = report["lengths"]
    lines += ["", "lengths in characters", header]
    lines += [_stats_row(f, lengths[f"{f}_chars"]) for f in ("content", "summary")]
    if "content_tokens" in lengths:
        lines += ["", f"lengths in tokens ({lengths.get('tokenizer')})", header]
        lines += [_stats_row(f, lengths[f"{f}_tokens"]) for f in ("content", "summary")]
    if report["errors"]:
        lines += ["", f"skipped records (first {min(max_errors, len(report['errors']))} of {len(report['errors'])})"]
        lines += [f"  line {e['line']}: {e['reason']}" for e in report["errors"][:max_errors]]
    return "\n".join(lines)
