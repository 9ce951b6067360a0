"""Decoding settings side by side on the same dev records: each named set of `DecodingConfig` fields generates
the records (greedy, one engine batch of 32 at a time), is scored with the field's metrics, and its texts are kept.

    python bench/decoding_ablation.py --model runs/demo/model --records 0:80 \\
        --config off='{"coverage_bonus_per_char": 0, "coverage_hold_chars": 0, "word_repeat_penalty": 0}' \\
        --config defaults='{}' --out runs/ablation

Writes OUT/NAME.json per set ({config, describe, metrics, texts, finish}) as soon as that set is whole (a rerun
skips the sets already there), prints one line of metrics per set and, at the end, the stutter count (an
ideograph doubled where the pair is no word: "腰腰") that the metrics do not show. Decide settings on dev records
1-80 only (issue 32): records outside them are the check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_kind  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "adgen" / "dev.json"
KEYS = ("rouge-1", "rouge-l", "bleu-4", "attr_coverage", "ended", "repetition_rate", "distinct-2",
        "compliance_violation_rate", "length_chars", "stutters", "tok_s")
DOUBLED = re.compile(r"([\u4e00-\u9fff])\1")


STUTTER_WORD_FREQ = 10  # a doubled pair this frequent in jieba's dictionary is a word (满满 193, 两两 30; 着着 3)


def stutters(texts: list[str]) -> int:
    """Doubled ideographs whose pair is not a word of jieba's dictionary ("腰腰", "卫卫"; not 满满, 轻轻)."""
    import jieba

    jieba.dt.check_initialized()
    return sum(1 for t in texts for m in DOUBLED.finditer(t) if jieba.dt.FREQ.get(m.group(0), 0) < STUTTER_WORD_FREQ)


def run_config(generator, records: list[dict], name: str, fields: dict, out: Path) -> dict:
    from adgen.generation.config import DecodingConfig
    from adgen.metrics.scoring import score_predictions

    config = DecodingConfig(**fields)
    outs, seconds = [], 0.0
    for start in range(0, len(records), 32):
        t = time.perf_counter()
        outs += generator.generate([r["content"] for r in records[start:start + 32]], config)
        seconds += time.perf_counter() - t
    metrics = score_predictions([{"predict": o.text, "label": r["summary"], "content": r["content"]}
                                 for r, o in zip(records, outs)])
    metrics["ended"] = sum(o.finish_reason == "stop" for o in outs) / len(outs)
    metrics["stutters"] = stutters([o.text for o in outs])
    metrics["tok_s"] = sum(o.completion_tokens for o in outs) / seconds
    result = {"config": fields, "describe": config.describe(), "metrics": metrics, "machine": cpu_kind(),
              "texts": [o.text for o in outs], "finish": [o.finish_reason for o in outs]}
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(out / f"{name}.json")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--records", default="0:80", help="dev records a:b (0-based, b excluded; default 0:80)")
    ap.add_argument("--config", action="append", required=True, metavar="NAME=JSON",
                    help="a named set of DecodingConfig fields (repeatable); '{}' = the defaults")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--out", required=True, help="folder for NAME.json per set")
    args = ap.parse_args()
    sets = {}
    for item in args.config:
        name, _, text = item.partition("=")
        if not name or not text:
            ap.error(f"--config {item!r}: write NAME=JSON, e.g. off='{{\"word_repeat_penalty\": 0}}'")
        sets[name] = json.loads(text)
    a, _, b = args.records.partition(":")
    records = [json.loads(x) for x in DEV.read_text(encoding="utf-8").splitlines() if x.strip()][int(a):int(b)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from adgen.generation.loader import load_generator

    generator = load_generator(args.model, adapter=args.adapter, dtype=args.dtype, batch_size=32)
    print(f"{len(records)} dev records ({args.records}), {cpu_kind()}", flush=True)
    for name, fields in sets.items():
        done = out / f"{name}.json"
        result = (json.loads(done.read_text(encoding="utf-8")) if done.exists()
                  else run_config(generator, records, name, fields, out))
        m = result["metrics"]
        print(name, " ".join(f"{k}={m[k]:.3f}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in KEYS),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
