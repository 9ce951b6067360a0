"""Generation throughput: the reference projects' way (one `model.generate` per record) vs adgen's engine.

Same model, same dev records, same prompts (the same chat-formatted ids), greedy, same
max_new_tokens, same stop ids. Prints samples/s, generated tokens/s and the field's metrics for both,
and the ratio; the last line is `gen_speedup=X` (samples/s of adgen / baseline).

    python bench/generation_throughput.py            # 64 dev records, 128 new tokens
    python bench/generation_throughput.py --quick    # fewer records, same settings (<= 6 min here)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from machine import cpu_flags, cpu_kind

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEV = REPO.parent / "shared" / "adgen" / "dev.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(DEFAULT_DEV))
    p.add_argument("-n", "--num-records", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="adgen engine batch size")
    p.add_argument("--quick", action="store_true", help="24 records instead of 64 (same settings otherwise)")
    p.add_argument("--json-out", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def run_baseline(model, tokenizer, formatter, contents, max_new_tokens):
    """What the reference predict scripts do: one generate call per record, batch of 1, no padding."""
    import torch

    texts, new_tokens = [], 0
    stop_ids = formatter.stop_token_ids
    for content in contents:
        ids = torch.tensor([formatter.prompt_ids(content)])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0],
            )
        gen = out[0, ids.shape[1]:].tolist()
        n = next((j for j, t in enumerate(gen) if t in stop_ids), len(gen))
        new_tokens += min(n + 1, len(gen))
        texts.append(tokenizer.decode(gen[:n], skip_special_tokens=True))
    return texts, new_tokens


def plain_decoding(decoding_cls, max_new_tokens: int):
    """Plain greedy. Older trees (run with PYTHONPATH=<old tree> for before / after figures) have no
    `DecodingConfig.plain`: there, the same switches that tree knows."""
    if hasattr(decoding_cls, "plain"):
        return decoding_cls.plain(max_new_tokens=max_new_tokens)
    off = {"dry_multiplier": 0.0, "no_repeat_char_ngram": 0, "loop_detection": False, "end_after_chars": 0,
           "banned_strings": ()}
    known = decoding_cls.__dataclass_fields__
    return decoding_cls(max_new_tokens=max_new_tokens, **{k: v for k, v in off.items() if k in known})


def main(argv=None) -> int:
    args = parse_args(argv)
    n = 24 if args.quick else args.num_records
    import torch

    from adgen.data.records import read_records
    from adgen.generation import DecodingConfig, load_generator
    from adgen.metrics import score_predictions

    records = read_records(args.data).records[:n]
    contents = [r.content for r in records]
    labels = [r.summary for r in records]
    print(f"# {n} records of {args.data}, greedy, max_new_tokens={args.max_new_tokens}, model {args.model}")
    print(f"# machine: {os.cpu_count()} cpus, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; CPU flags: {cpu_flags()} -> {cpu_kind()}")

    gen = load_generator(args.model, batch_size=args.batch_size)
    # Same weights, same dtype for both (`--dtype auto`: fp32 on every CPU, `adgen.models.select_dtype`):
    # only the way of generating differs.
    model, tokenizer, formatter = gen.model, gen.tokenizer, gen.formatter
    print(f"# precision: baseline and adgen {next(model.parameters()).dtype} (the same model object)")

    run_baseline(model, tokenizer, formatter, contents[:1], 4)  # warm-up (allocations, kernels)
    t0 = time.perf_counter()
    base_texts, base_tokens = run_baseline(model, tokenizer, formatter, contents, args.max_new_tokens)
    base_s = time.perf_counter() - t0

    # the same decoding as the baseline (plain greedy): the bench measures the engine, not adgen's
    # repetition control / ending (on by default in `adgen eval`; their cost: docs/BENCHMARK_NOTES.md section 3)
    gen.generate(contents[:2], plain_decoding(DecodingConfig, 4))  # warm-up
    t0 = time.perf_counter()
    outs = gen.generate(contents, plain_decoding(DecodingConfig, args.max_new_tokens))
    cand_s = time.perf_counter() - t0
    cand_texts = [o.text for o in outs]
    cand_tokens = sum(o.completion_tokens for o in outs)

    def metrics(texts):
        rows = [{"predict": t, "label": lab, "content": c} for t, lab, c in zip(texts, labels, contents)]
        return score_predictions(rows)

    base_m, cand_m = metrics(base_texts), metrics(cand_texts)
    same = sum(a == b for a, b in zip(base_texts, cand_texts))
    result = {
        "records": n,
        "baseline": {"seconds": base_s, "samples_per_s": n / base_s, "tokens_per_s": base_tokens / base_s},
        "adgen": {"seconds": cand_s, "samples_per_s": n / cand_s, "tokens_per_s": cand_tokens / cand_s,
                  "batch_size": args.batch_size},
        "identical_texts": same,
    }
    print(f"{'':10} {'seconds':>9} {'samples/s':>10} {'tokens/s':>9} " + " ".join(f"{k:>8}" for k in
          ("rouge-1", "rouge-2", "rouge-l", "bleu-4")))
    for name, r, m in (("baseline", result["baseline"], base_m), ("adgen", result["adgen"], cand_m)):
        print(f"{name:10} {r['seconds']:9.1f} {r['samples_per_s']:10.3f} {r['tokens_per_s']:9.1f} "
              + " ".join(f"{m[k]:8.2f}" for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")))
    deltas = {k: cand_m[k] - base_m[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
    result["metric_deltas"] = deltas
    result["baseline"]["metrics"] = {k: base_m[k] for k in deltas}
    result["adgen"]["metrics"] = {k: cand_m[k] for k in deltas}
    speedup = result["adgen"]["samples_per_s"] / result["baseline"]["samples_per_s"]
    max_delta = max(abs(v) for v in deltas.values())
    print(f"identical texts: {same}/{n}; largest metric difference: {max_delta:.3f} points")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"gen_speedup={speedup:.2f} max_metric_delta={max_delta:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
