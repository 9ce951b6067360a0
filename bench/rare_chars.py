"""How many generated Chinese characters are ones the training data (almost) never uses.

Token-level n-gram blocking (`--no-repeat-ngram-size`) on a byte-level tokenizer can force a different
*continuation byte* mid-character, which turns 设计 into 设讹: the text stays Chinese (Chinese share
does not notice) and the 4-gram repetition falls, yet the character is wrong. This counts such
near-miss characters: CJK characters seen fewer than --min-count times in the training records'
content + summary.

    python bench/rare_chars.py --train ../shared/adgen/train.json runs/eval-fine-tuned runs/eval-fine-tuned-no-repeat-12
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from adgen.data.records import read_records
from adgen.metrics.text_stats import is_cjk  # the same characters that Chinese share counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="`adgen eval` run directories (generated_predictions.jsonl)")
    ap.add_argument("--train", required=True, help="AdGen training file that defines the usual characters")
    ap.add_argument("--min-count", type=int, default=2, help="a character is usual from this many uses (default 2)")
    args = ap.parse_args()

    counts: Counter[str] = Counter()
    for r in read_records(args.train).records:
        counts.update(r.content)
        counts.update(r.summary or "")
    usual = {c for c, n in counts.items() if n >= args.min_count}

    print(f"{'run':40s} {'rare CJK chars':>15s} {'outputs with one':>17s}")
    for run in args.runs:
        path = Path(run) / "generated_predictions.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        cjk = rare = touched = 0
        for row in rows:
            chars = [c for c in row["predict"] if is_cjk(c)]
            k = sum(c not in usual for c in chars)
            cjk, rare, touched = cjk + len(chars), rare + k, touched + (k > 0)
        print(f"{run:40s} {rare / max(cjk, 1):15.4f} {touched / max(len(rows), 1):17.3f}")


if __name__ == "__main__":
    main()
