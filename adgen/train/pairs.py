"""Preference pairs for DPO, drawn from the model's own samples: what `adgen pairs` writes and DPO reads.

Input: the output of `adgen generate --input train.json -n K --do-sample --plain` (plain decoding, so a
sample that loops shows as a loop: `candidates` + `candidate_finish_reasons` per record). Each
candidate is scored with the evaluation's own measures: did it end on the end-of-turn token, attribute
coverage, contradictions, character 4-gram repetition.

- **chosen**: a candidate that ended, contradicts no attribute, holds no broken text (`<UNK>`, U+FFFD),
  repeats little (4-gram repetition
  <= `max_chosen_repetition`) and covers at least `min_chosen_coverage`; the best by coverage, then
  fewer hallucinated values, then less repetition. With `reference_fallback`, a record none of whose
  samples qualifies takes its reference copy as chosen (marked `chosen_source: reference`).
- **rejected**: a candidate that never stopped (length limit), contradicts an attribute, holds broken text, repeats
  (> `min_rejected_repetition`) or covers clearly less than the chosen one (by `coverage_gap`); the
  worst first: never stopped, then contradictions, then lowest coverage.
- Records without both are left out (counted by reason in the summary).

Pair file lines: `{"line", "content", "chosen", "rejected", "chosen_finish", "rejected_finish",
"chosen_source", "why", "why_kinds"}`. `*_finish` says whether the text ended on the end-of-turn token ("stop"):
DPO trains the end-of-turn token into chosen texts that ended and leaves it out of those that were cut.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from adgen.data.attributes import parse_attributes
from adgen.errors import DataError
from adgen.metrics import faithfulness
from adgen.metrics.text_stats import repetition_rate


BROKEN_MARKS = ("<UNK>", "<unk>", "\ufffd")


@dataclass(frozen=True)
class PairRules:
    min_chosen_coverage: float = 0.6
    max_chosen_repetition: float = 0.10
    min_rejected_repetition: float = 0.20
    coverage_gap: float = 0.25
    reference_fallback: bool = False


@dataclass(frozen=True)
class PreferencePair:
    content: str
    chosen: str
    rejected: str
    chosen_ended: bool = True
    rejected_ended: bool = False
    line: int = 0


def score_candidate(attributes, text: str, finish_reason: str, vocab) -> dict[str, Any]:
    f = faithfulness(attributes, text, vocab)
    return {
        "ended": finish_reason == "stop",
        "coverage": f["attr_coverage"] if f["attr_coverage"] is not None else 1.0,
        "contradictions": f["n_contradictions"],
        "hallucinated": f["n_hallucinated"],
        "repetition": repetition_rate(text),
        # an unknown-token marker or a replacement character: never copy to prefer
        "broken": any(mark in text for mark in BROKEN_MARKS),
    }


def _why_rejected(s: dict, chosen_cov: float, rules: PairRules) -> list[tuple[str, str]]:
    """(kind, detail) for each way the candidate is worse than a chosen copy with coverage chosen_cov."""
    why = []
    if not s["ended"]:
        why.append(("never stopped", "never stopped"))
    if s["contradictions"]:
        why.append(("contradicts", f"{s['contradictions']} contradiction(s)"))
    if s["repetition"] > rules.min_rejected_repetition:
        why.append(("repeats", f"repetition {s['repetition']:.2f}"))
    if s["broken"]:
        why.append(("broken text", "holds an unknown-token marker or U+FFFD"))
    if s["coverage"] <= chosen_cov - rules.coverage_gap:
        why.append(("misses attributes", f"coverage {s['coverage']:.2f} vs {chosen_cov:.2f}"))
    return why


def choose_pair(row: dict, vocab, rules: PairRules = PairRules()) -> tuple[dict | None, str]:
    """(pair line, "") or (None, the reason no pair was made) for one generation row."""
    texts = row.get("candidates") or [row.get("predict", "")]
    finishes = row.get("candidate_finish_reasons") or [row.get("finish_reason", "")] * len(texts)
    try:
        attributes = parse_attributes(row["content"])
    except ValueError:
        return None, "bad attributes"
    scores = [score_candidate(attributes, t, f, vocab) for t, f in zip(texts, finishes)]
    good = [i for i, s in enumerate(scores) if s["ended"] and not s["contradictions"] and not s["broken"]
            and s["repetition"] <= rules.max_chosen_repetition and s["coverage"] >= rules.min_chosen_coverage]
    if good:
        best = max(good, key=lambda i: (scores[i]["coverage"], -scores[i]["hallucinated"], -scores[i]["repetition"], -i))
        chosen, chosen_cov, source, chosen_finish = texts[best], scores[best]["coverage"], "sample", "stop"
    elif rules.reference_fallback and row.get("summary"):
        chosen, chosen_cov, source, chosen_finish = row["summary"], 1.0, "reference", "stop"
        chosen_cov = score_candidate(attributes, chosen, "stop", vocab)["coverage"]
    else:
        return None, "no sample fit to be chosen"
    bad = [(i, _why_rejected(s, chosen_cov, rules)) for i, s in enumerate(scores)]
    bad = [(i, why) for i, why in bad if why]
    if not bad:
        return None, "no sample fit to be rejected"
    worst, why = min(bad, key=lambda b: (scores[b[0]]["ended"], -scores[b[0]]["contradictions"],
                                          scores[b[0]]["coverage"], -scores[b[0]]["repetition"], b[0]))
    return {
        "line": row.get("line", 0), "content": row["content"], "chosen": chosen, "rejected": texts[worst],
        "chosen_finish": chosen_finish, "rejected_finish": finishes[worst], "chosen_source": source,
        "why": "; ".join(detail for _, detail in why), "why_kinds": [kind for kind, _ in why],
    }, ""


def build_pairs(rows: Iterable[dict], vocab, rules: PairRules = PairRules()) -> tuple[list[dict], Counter]:
    """Pair lines for the rows that give one, and a count of what happened to every row."""
    pairs, outcome = [], Counter()
    for row in rows:
        pair, reason = choose_pair(row, vocab, rules)
        if pair is None:
            outcome[reason] += 1
            continue
        pairs.append(pair)
        outcome[f"pair ({pair['chosen_source']} chosen)"] += 1
        outcome.update("rejected: " + kind for kind in pair["why_kinds"])
    return pairs, outcome


def _json_lines(path: str | Path, make_it: str) -> Iterator[tuple[int, Any]]:
    """(line number, object) for each non-blank line; a missing file or bad JSON is a DataError naming the
    file (and line) and, through `make_it`, how such a file is made."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file. {make_it}") from None
    with f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield n, json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: bad JSON ({e.msg}). Each line must be one JSON object. {make_it}") from None


def read_generation_rows(path: str | Path) -> list[dict]:
    """The rows `adgen generate --input ... -n K` wrote (each needs `content`)."""
    make_it = "Pass the JSON lines `adgen generate --input FILE --output OUT -n K` wrote"
    rows = []
    for n, row in _json_lines(path, make_it):
        if not isinstance(row, dict) or "content" not in row:
            raise DataError(f"{path}:{n}: no `content`. {make_it}")
        rows.append(row)
    return rows


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Pair file (JSON lines); a bad line is a DataError naming the file, the line and the fix."""
    pairs = []
    for n, obj in _json_lines(path, f"Make one with `adgen pairs --input GENERATIONS --output {path}`"):
        missing = [k for k in ("content", "chosen", "rejected") if not isinstance(obj.get(k), str) or not obj.get(k)]
        if missing:
            raise DataError(f"{path}:{n}: missing or empty {', '.join(missing)}. A pair line needs the strings "
                            '"content", "chosen" and "rejected" (as `adgen pairs` writes them)')
        pairs.append(PreferencePair(obj["content"], obj["chosen"], obj["rejected"],
                                    obj.get("chosen_finish", "stop") == "stop",
                                    obj.get("rejected_finish", "length") == "stop", n))
    if not pairs:
        raise DataError(f"{path}: no pairs. Make them with `adgen pairs --input GENERATIONS --output {path}`")
    return pairs
