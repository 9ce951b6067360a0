"""`adgen score PRED.jsonl [--json]`: the field's ROUGE / BLEU-4 (+ faithfulness) on a prediction file.

The file holds JSON lines with a prediction and a reference (LLaMA-Factory's
generated_predictions.jsonl: `predict`, `label`); with the input too (`content`, or `prompt`)
the attribute-faithfulness figures are added. Every prediction is checked for the Advertising Law's
absolute terms (最佳, 国家级, 顶级, 销量第一 ...; adgen/resources/compliance/ad_law_terms.json) and,
with --forbidden-terms FILE, a merchant's own list (one term a line): compliance_violation_rate is the
share of predictions holding at least one. Definitions: docs/METRICS.md.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from adgen.errors import AdgenError
from adgen.io import atomic_write_jsonl
from adgen.metrics import AttributeVocab, aggregate, read_predictions, read_term_file, score_all


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="ROUGE-1/2/L + BLEU-4 (the field's protocol) and faithfulness of a predictions file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("predictions", help="JSON lines with the prediction and the reference (e.g. generated_predictions.jsonl)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--pred-field", default="predict", help="field holding the prediction (default: %(default)s)")
    p.add_argument("--label-field", default="label", help="field holding the reference (default: %(default)s)")
    p.add_argument("--vocab", default=None, help="attribute vocabulary JSON for faithfulness (default: built-in, AdGen train)")
    p.add_argument("--per-example", metavar="OUT.jsonl", default=None, help="also write each line's scores here")
    p.add_argument("--workers", type=int, default=1, help="processes to score with (same numbers; default: %(default)s)")
    p.add_argument("--forbidden-terms", metavar="FILE", default=None,
                   help="a merchant's own forbidden terms (brand rules, competitor names): UTF-8 text, one term a "
                        "line, # comments; checked beside the Advertising Law's list (Latin letters case-insensitively)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.workers < 1:
        raise AdgenError(f"--workers must be >= 1, got {args.workers}")
    terms = read_term_file(args.forbidden_terms) if args.forbidden_terms else ()
    rows = read_predictions(args.predictions, pred_field=args.pred_field, label_field=args.label_field)
    vocab = AttributeVocab.load(args.vocab) if args.vocab else None
    per_example = score_all(rows, vocab, workers=args.workers, progress=not args.json, forbidden_terms=terms)
    summary = aggregate(per_example, forbidden_terms=terms)
    if args.per_example:
        _write_per_example(args.per_example, rows, per_example)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        _print_table(summary, args.predictions)
    return 0


def _write_per_example(path: str, rows, per_example: list[dict[str, Any]]) -> None:
    atomic_write_jsonl(path, ({"line": r.line, **s} for r, s in zip(rows, per_example)))


def _print_table(summary: dict[str, Any], source: str) -> None:
    from rich.console import Console

    from adgen.evaluation.report import metrics_table, top_terms

    table = metrics_table(summary, f"{source}: {summary['n']} examples", value_header="mean",
                          decimals=4, use_labels=False)
    console = Console()
    console.print(table)
    if "n_with_attributes" not in summary:
        console.print("no input attributes in the file (a `content` or `prompt` field): faithfulness not scored")
    if "compliance_list" in summary:
        found = top_terms(summary.get("compliance_terms_found"), k=12) or "none"
        console.print(f"forbidden terms found ({summary['compliance_list']}; predictions holding each): {found}",
                      markup=False, highlight=False)
    console.print("means over examples, not rounded; published AdGen tables use this protocol (docs/METRICS.md)")
