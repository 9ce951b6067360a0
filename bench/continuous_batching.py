"""Continuous batching (adgen.generation.engine) vs left-padded `model.generate` batches, same model and prompts.

Both sides: the same loaded model, the first N dev records, the default decoding (character DRY + loop
detection, max_new_tokens sized from the tokenizer unless given), `--batch-size` rows at a time. The engine
side then runs again with `--wide` slots. Prints wall time, generated tokens/s, finish reasons, the prefix
cache's saving, how many outputs are token-identical, and the first difference if any. Last line:
`cb_speedup=X wide_speedup=Y identical=K/N`.

    python bench/continuous_batching.py --model runs/demo/train/model -n 32 --batch-size 16 --wide 32
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from machine import cpu_flags

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEV = REPO.parent / "shared" / "adgen" / "dev.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--adapter", default=None)
    p.add_argument("--data", default=str(DEFAULT_DEV))
    p.add_argument("-n", "--num-records", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: sized from the tokenizer")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--wide", type=int, default=32, help="engine slots for the second engine run (0: skip)")
    return p.parse_args(argv)


def timed(gen, prompts, config):
    t = time.perf_counter()
    out = gen.generate(prompts, config)
    return out, time.perf_counter() - t


def report(name, out, seconds, stats=None):
    tokens = sum(g.completion_tokens for g in out)
    finish = dict(Counter(g.finish_reason for g in out))
    extra = f", prefix cache saved {stats['prefix_tokens_saved']} of {stats['prompt_tokens']} prompt tokens" if stats else ""
    print(f"{name}: {seconds:.1f} s, {tokens / seconds:.1f} generated tokens/s, finish {finish}{extra}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from adgen.data.records import read_records
    from adgen.generation import DecodingConfig, load_generator

    print(f"CPU flags: {cpu_flags()}")
    records = read_records(args.data).records[: args.num_records]
    prompts = [r.content for r in records]
    gen = load_generator(args.model, adapter=args.adapter, batch_size=args.batch_size)
    if not gen.uses_engine:
        print("this model cannot run on the engine (see adgen.generation.engine.supports_engine)")
        return 1
    config = DecodingConfig(max_new_tokens=args.max_new_tokens)
    gen.continuous = False
    base, base_s = timed(gen, prompts, config)
    report(f"model.generate, batches of {args.batch_size}", base, base_s)
    gen.continuous = True
    eng, eng_s = timed(gen, prompts, config)
    report(f"engine, {args.batch_size} slots", eng, eng_s, gen.last_engine_stats)
    same = sum(a.token_ids == b.token_ids for a, b in zip(eng, base))
    for a, b in zip(eng, base):
        if a.token_ids != b.token_ids:
            k = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                     min(len(a.token_ids), len(b.token_ids)))
            print(f"first difference at token {k}: engine {a.text[:40]!r} / model.generate {b.text[:40]!r}")
            break
    wide_s = None
    if args.wide:
        gen.batch_size = args.wide
        wide, wide_s = timed(gen, prompts, config)
        report(f"engine, {args.wide} slots", wide, wide_s, gen.last_engine_stats)
    print(f"cb_speedup={base_s / eng_s:.2f} wide_speedup={(base_s / wide_s) if wide_s else 0:.2f} identical={same}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
