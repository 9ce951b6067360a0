"""Evaluation metrics: the field's ROUGE / BLEU-4 protocol, attribute faithfulness, text statistics.

- `protocol`: `score_pair(pred, label)`, exactly the field's per-example ROUGE-1/2/L and BLEU-4.
- `faithfulness`: `AttributeVocab`, `faithfulness(attributes, text, vocab)`.
- `text_stats`: `text_stats(text)` (Chinese share, repetition, distinct-1/2, length).
- `predictions`: reading prediction files (`read_predictions`).
- `compliance`: `find_violations(text, extra_terms)`, the Advertising Law's absolute terms
  (`ad_law_terms()`, adgen/resources/compliance/ad_law_terms.json) and a merchant's own list.
- `scoring`: `score_example`, `aggregate`, `score_predictions`.

Definitions of every figure: the module docstrings and docs/METRICS.md.
"""

from adgen.metrics.compliance import ad_law_terms, find_violations, read_term_file
from adgen.metrics.faithfulness import AttributeVocab, faithfulness
from adgen.metrics.predictions import PredictionRow, extract_attribute_string, read_predictions
from adgen.metrics.protocol import PROTOCOL_KEYS, score_pair
from adgen.metrics.scoring import (
    COMPLIANCE_KEYS,
    FAITHFULNESS_KEYS,
    TEXT_KEYS,
    aggregate,
    score_all,
    score_example,
    score_predictions,
)
from adgen.metrics.text_stats import text_stats

__all__ = [
    "COMPLIANCE_KEYS",
    "FAITHFULNESS_KEYS",
    "PROTOCOL_KEYS",
    "TEXT_KEYS",
    "AttributeVocab",
    "PredictionRow",
    "ad_law_terms",
    "aggregate",
    "extract_attribute_string",
    "faithfulness",
    "find_violations",
    "read_predictions",
    "read_term_file",
    "score_all",
    "score_example",
    "score_pair",
    "score_predictions",
    "text_stats",
]
