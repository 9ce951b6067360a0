#!/usr/bin/env python
"""Build adgen's built-in attribute vocabulary (adgen/resources/attribute_vocab.json).

    python scripts/build_attribute_vocab.py [--train ../shared/adgen/train.json] [--min-count 2] [--out PATH]

Counts, per attribute key, the values seen in the training records' `content` and keeps those
seen at least `--min-count` times (rarer ones are as likely typos as facts, and keep the file
small). The matching policy (exclusive keys, vague values) is written beside the values, so the
file alone says how faithfulness was measured. Re-running on the same data gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from adgen.metrics.faithfulness import DEFAULT_MIN_COUNT, AttributeVocab  # noqa: E402

DEFAULT_TRAIN = REPO.parent / "shared" / "adgen" / "train.json"
DEFAULT_OUT = REPO / "adgen" / "resources" / "attribute_vocab.json"


def read_contents(path: Path) -> list[str]:
    """The `content` strings of an AdGen file (UTF-8, UTF-8-BOM or GBK, as read_records detects)."""
    try:
        from adgen.data.records import read_records
    except ImportError:  # a checkout without adgen.data.records: the shipped train.json is GBK JSON lines
        text = path.read_bytes().decode("gbk")
        return [json.loads(line)["content"] for line in text.splitlines() if line.strip()]
    return [r.content for r in read_records(path)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, default=DEFAULT_TRAIN, help="AdGen training file (default: %(default)s)")
    ap.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT, help="keep values seen this often (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSON (default: %(default)s)")
    args = ap.parse_args(argv)
    contents = read_contents(args.train)
    # The source names the data, not this machine's path, so the file is the same wherever it is built.
    source = f"AdGen train: {args.train.name}, {len(contents)} records, values seen >= {args.min_count} times"
    vocab = AttributeVocab.from_records(contents, min_count=args.min_count, source=source)
    vocab.save(args.out)
    n_values = sum(map(len, vocab.values.values()))
    print(f"wrote {args.out}: {len(vocab.values)} keys, {n_values} values from {len(contents)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
