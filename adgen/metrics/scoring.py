"""Per-example scores and their means: the protocol, text statistics and attribute faithfulness.

`score_example(row, vocab)` gives one flat dict per prediction (what `adgen eval` writes per
example); `aggregate(per_example)` turns a list of them into the summary `adgen score` prints;
`score_predictions(rows, vocab)` does both.

Summary keys: `n`; `rouge-1`, `rouge-2`, `rouge-l`, `bleu-4` (means over all n, not rounded);
`chinese_share`, `repetition_rate`, `distinct-1`, `distinct-2`, `length_chars` (means over the
examples where the figure is defined); and, when any row carries its input attributes,
`n_with_attributes` and, over those rows, `attr_coverage` (mean), `attr_contradiction_rate`
(share of examples with >= 1 contradiction), `contradictions_per_example` and
`hallucinated_per_example` (mean counts of distinct values); `compliance_violation_rate` (share of
all n examples whose prediction holds >= 1 forbidden term: the Advertising Law's absolute terms,
`adgen.metrics.compliance`, plus a merchant's `forbidden_terms`), `compliance_terms_found`
({term: examples holding it}) and `compliance_list` (the term list's name and version).
Per example, `compliance_terms` lists the forbidden strings found.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from adgen.metrics.compliance import ad_law_terms, compliance_scores, compliance_summary
from adgen.metrics.faithfulness import AttributeVocab, faithfulness
from adgen.metrics.predictions import PredictionRow, attributes_from_fields
from adgen.metrics.protocol import PROTOCOL_KEYS, score_pair
from adgen.metrics.text_stats import text_stats

TEXT_KEYS: tuple[str, ...] = ("chinese_share", "repetition_rate", "distinct-1", "distinct-2", "length_chars")
FAITHFULNESS_KEYS: tuple[str, ...] = (
    "attr_coverage",
    "attr_contradiction_rate",
    "contradictions_per_example",
    "hallucinated_per_example",
)
COMPLIANCE_KEYS: tuple[str, ...] = ("compliance_violation_rate",)
_PARALLEL_MIN_ROWS = 512  # below this, starting processes costs more than it saves


def as_row(obj: PredictionRow | Mapping[str, Any]) -> PredictionRow:
    """A PredictionRow from itself or a mapping with predict, label and optionally attributes/content/prompt."""
    if isinstance(obj, PredictionRow):
        return obj
    attributes = obj.get("attributes")
    if attributes is not None:
        attributes = [(str(k), str(v)) for k, v in attributes]
    else:
        attributes = attributes_from_fields(dict(obj), where="prediction row")
    return PredictionRow(predict=obj["predict"], label=obj["label"], attributes=attributes)


def score_example(
    row: PredictionRow | Mapping[str, Any],
    vocab: AttributeVocab | None = None,
    *,
    forbidden_terms: Sequence[str] = (),
) -> dict[str, Any]:
    """Protocol scores + text statistics + the forbidden terms found (the Advertising Law's list and
    `forbidden_terms`, a merchant's own), + faithfulness when the row's attributes are known."""
    row = as_row(row)
    scores: dict[str, Any] = {**score_pair(row.predict, row.label), **text_stats(row.predict)}
    if row.attributes is not None:
        scores.update(faithfulness(row.attributes, row.predict, vocab or AttributeVocab.default()))
    scores.update(compliance_scores(row.predict, forbidden_terms))
    return scores


def _mean(values: Iterable[float | int | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    # fsum: the correctly rounded sum, so the mean does not depend on summation order.
    return math.fsum(kept) / len(kept) if kept else None


def compliance_list_label(forbidden_terms: Sequence[str] = ()) -> str:
    """Which list produced the compliance figures: the built-in list's name and version (+ the merchant's count)."""
    label = ad_law_terms().label
    n = len({t.strip() for t in forbidden_terms if t.strip()})
    return label + (f" + {n} merchant term{'s' if n != 1 else ''}" if n else "")


def aggregate(per_example: Sequence[Mapping[str, Any]], *, forbidden_terms: Sequence[str] = ()) -> dict[str, Any]:
    """Means of per-example scores (see the module docstring for each key). `forbidden_terms` only
    names the merchant's list in `compliance_list` (the rows already hold what was found)."""
    summary: dict[str, Any] = {"n": len(per_example)}
    for key in (*PROTOCOL_KEYS, *TEXT_KEYS):
        summary[key] = _mean(s[key] for s in per_example)
    attributed = [s for s in per_example if "n_contradictions" in s]
    if attributed:
        summary["n_with_attributes"] = len(attributed)
        summary["attr_coverage"] = _mean(s["attr_coverage"] for s in attributed)
        summary["attr_contradiction_rate"] = _mean(s["n_contradictions"] > 0 for s in attributed)
        summary["contradictions_per_example"] = _mean(s["n_contradictions"] for s in attributed)
        summary["hallucinated_per_example"] = _mean(s["n_hallucinated"] for s in attributed)
    compliance = compliance_summary(per_example)
    if compliance:
        summary.update(compliance, compliance_list=compliance_list_label(forbidden_terms))
    return summary


_worker_vocab: AttributeVocab | None = None
_worker_terms: tuple[str, ...] = ()


def _init_worker(vocab: AttributeVocab | None, forbidden_terms: tuple[str, ...] = ()) -> None:
    global _worker_vocab, _worker_terms
    _worker_vocab, _worker_terms = vocab, forbidden_terms


def _score_in_worker(row: PredictionRow) -> dict[str, Any]:
    return score_example(row, _worker_vocab, forbidden_terms=_worker_terms)


def score_all(
    rows: Iterable[PredictionRow | Mapping[str, Any]],
    vocab: AttributeVocab | None = None,
    *,
    workers: int = 1,
    progress: bool = False,
    forbidden_terms: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """`score_example` over rows, in order; with workers > 1, in processes (same numbers: each
    example is scored on its own by the same code)."""
    rows = [as_row(r) for r in rows]
    terms = tuple(forbidden_terms)
    if vocab is None and any(r.attributes is not None for r in rows):
        vocab = AttributeVocab.default()
    if workers > 1 and len(rows) >= _PARALLEL_MIN_ROWS:
        pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(vocab, terms))
        with pool:
            results = pool.map(_score_in_worker, rows, chunksize=64)
            return list(_maybe_progress(results, len(rows), progress))
    return [score_example(r, vocab, forbidden_terms=terms) for r in _maybe_progress(rows, len(rows), progress)]


def _maybe_progress(items: Iterable[Any], total: int, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm import tqdm  # ~70 ms to import, and adgen.metrics is imported at CLI start-up (decoding defaults)

    # disable=None: no bar when stderr is not a terminal (CI logs, pipes).
    return tqdm(items, total=total, desc="scoring", unit="ex", leave=False, disable=None)


def score_predictions(
    rows: Iterable[PredictionRow | Mapping[str, Any]],
    vocab: AttributeVocab | None = None,
    *,
    workers: int = 1,
    progress: bool = False,
    forbidden_terms: Sequence[str] = (),
) -> dict[str, Any]:
    """Summary means over rows (PredictionRow or mappings with predict/label[/attributes|content|prompt]);
    `forbidden_terms`: a merchant's own list, checked beside the Advertising Law's."""
    per_example = score_all(rows, vocab, workers=workers, progress=progress, forbidden_terms=forbidden_terms)
    return aggregate(per_example, forbidden_terms=forbidden_terms)
