"""`adgen pairs --input GENERATIONS.jsonl --output pairs.jsonl`: preference pairs for DPO from the model's own samples.

Make the samples first, with plain sampling so that loops show as loops:

    adgen generate --model runs/sft/best --input train-part.jsonl --output samples.jsonl -n 3 --do-sample --plain
    adgen pairs --input samples.jsonl --output pairs.jsonl --reference-fallback
    adgen train --config smollm2-135m-dpo model=runs/sft/best preference_data=pairs.jsonl

chosen = a sample that ended on its own, contradicts no attribute, repeats little and covers the most
attributes; rejected = one that never stopped, contradicts, repeats or covers clearly less. Rules and
the file format: adgen/train/pairs.py.
"""

from __future__ import annotations

import argparse

from adgen.errors import DataError
from adgen.io import atomic_write_jsonl
from adgen.metrics import AttributeVocab


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pairs", help="preference pairs (chosen / rejected) for DPO from `adgen generate -n K` samples",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, metavar="FILE", help="output of `adgen generate --input ... -n K`")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="pair file to write (JSON lines)")
    p.add_argument("--vocab", default=None, help="attribute vocabulary JSON (default: built-in, AdGen train)")
    p.add_argument("--min-chosen-coverage", type=float, default=0.6,
                   help="a chosen copy covers at least this share of the attributes (default: %(default)s)")
    p.add_argument("--coverage-gap", type=float, default=0.25,
                   help="a candidate covering this much less than the chosen one is rejected (default: %(default)s)")
    p.add_argument("--reference-fallback", action="store_true",
                   help="records with no sample fit to be chosen take their reference copy (`summary`) instead")
    p.set_defaults(func=run)


def run(args) -> int:
    from adgen.train.pairs import PairRules, build_pairs, read_generation_rows

    rows = read_generation_rows(args.input)
    if not any(len(r.get("candidates") or []) > 1 for r in rows):
        raise DataError(f"{args.input}: no record has several candidates. Sample them: "
                        "adgen generate --input FILE --output OUT -n 4 --do-sample --plain")
    vocab = AttributeVocab.load(args.vocab) if args.vocab else AttributeVocab.default()
    rules = PairRules(min_chosen_coverage=args.min_chosen_coverage, coverage_gap=args.coverage_gap,
                      reference_fallback=args.reference_fallback)
    pairs, outcome = build_pairs(rows, vocab, rules)
    atomic_write_jsonl(args.output, pairs)
    print(f"{len(pairs)} pairs from {len(rows)} records -> {args.output}")
    for what, count in outcome.most_common():
        print(f"  {what}: {count}")
    return 0 if pairs else 1
