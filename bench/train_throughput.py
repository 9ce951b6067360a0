"""Training throughput: the reference projects' way (HF Trainer + PEFT) vs `adgen train`, same recipe.

    python bench/train_throughput.py --quick     # <= 6 min here; last line: train_speedup=X eval_loss_delta=Y
    python bench/train_throughput.py             # 256 records, as in BENCHMARKS.md
    python bench/train_throughput.py --levers    # + one adgen run per lever switched off (its share)
    python bench/train_throughput.py --quick --pairs 3   # baseline, adgen, baseline, adgen, ...: medians per side

Both sides: the built-in smollm2-135m, the first N records of ../shared/adgen/train.json encoded by the
same ChatFormatter (default system prompt, max_length 512, response-only labels), LoRA r=8 alpha=16
dropout 0.05 on q_proj+v_proj, lr 2e-4 cosine with 3% warmup, 4 records per optimizer step, 1 epoch.

- baseline: `transformers.Trainer` + PEFT, fp32, padded batches of 4 (DataCollatorForSeq2Seq, no
  length grouping), full logits with the labels' -100 mask (what the reference projects' scripts do).
- candidate: `adgen train` defaults (precision auto, packed rows with per-example attention, LM head
  on response tokens only), with --batch-size 4 --grad-accum 1 for the same optimizer steps.

Each side trains in its own process (peak RSS from wait4); one more process then computes the eval loss
of both adapters on the first dev records with the same fp32 code (token-weighted mean over response
tokens), so the comparison does not depend on either engine's own eval.

The sides run one after the other, so a slow spell of a shared host can land on one side only (on the 2-core
Xeon of docs/BENCHMARK_NOTES.md section 1 the ratio moved 1.98-3.00 over five runs of one tree). `--pairs N`
runs the two sides alternately N times and reports each side's median samples/s (and its highest peak RSS); the
first pair's adapters are evaluated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_flags, cpu_kind

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "v_proj"]
LR = 2e-4
PER_STEP = 4
SEED = 42


def encode(path: str, limit: int, tokenizer):
    from adgen.data.chat import ChatFormatter, encode_records
    from adgen.data.records import read_records

    fmt = ChatFormatter(tokenizer, max_length=512)
    examples, _ = encode_records(fmt, read_records(path).records[:limit])
    return examples


def model_path() -> str:
    from adgen.models import resolve_model

    return str(resolve_model("smollm2-135m").path)


# ---- workers (each runs in its own process) ------------------------------------------------------


def worker_baseline(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    examples = encode(args.train, args.records, tok)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"), per_device_train_batch_size=PER_STEP, learning_rate=LR,
        num_train_epochs=1, lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * math.ceil(len(rows) / PER_STEP)), logging_steps=1, save_strategy="no",
        report_to=[], seed=SEED, remove_unused_columns=False, disable_tqdm=True, bf16=False, fp16=False,
        use_cpu=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.save_pretrained(str(Path(args.out) / "adapter"))
    return {"seconds": seconds, "samples": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows),
            "first_train_loss": losses[0], "final_train_loss": losses[-1], "steps": trainer.state.global_step}


def worker_eval(args) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adgen.train.collate import pad

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    examples = sorted(encode(args.dev, args.eval_records, tok), key=lambda e: len(e.input_ids))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    losses = {}
    for name, adapter in zip(args.names, args.adapters):
        model = PeftModel.from_pretrained(base, adapter).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(examples), 8):
                b = pad(examples[i : i + 8], tok.pad_token_id or 0)
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
                keep = b.targets != -100
                total += float(torch.nn.functional.cross_entropy(logits[keep], b.targets[keep], reduction="sum"))
                count += int(keep.sum())
        losses[name] = total / count
        base = model.unload()  # the bare base model again for the next adapter
    return {"eval_loss": losses, "eval_records": len(examples)}


# ---- driver ----------------------------------------------------------------------------------------


def run_child(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run a child process; returns (its peak RSS in KiB, wall seconds). Output goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (exit {code}); see {log}:\n" + log.read_text()[-3000:])
    return usage.ru_maxrss, time.perf_counter() - t0


def candidate_cmd(args, out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "adgen", "train", "--model", "smollm2-135m", "--train-data", args.train,
        "--max-samples", str(args.records), "--method", "lora", "--lr", str(LR), "--batch-size", str(PER_STEP),
        "--grad-accum", "1", "--epochs", "1", "--seed", str(SEED), "--output-dir", str(out), "--overwrite",
        "--no-progress", "lora.r=8", "lora.alpha=16", "lora.dropout=0.05", f"lora.target_modules={','.join(TARGETS)}",
        "max_length=512", "eval_every=0", "save_every=0", *extra,
    ]


def run_candidate(args, work: Path, name: str, extra: list[str]) -> dict:
    out = work / name
    rss, _ = run_child(candidate_cmd(args, out, extra), work / f"{name}.log")
    s = json.loads((out / "summary.json").read_text())
    return {"name": name, "samples_per_s": s["train_examples"] / s["train_time_s"], "tokens_per_s": s["tokens_per_s"],
            "seconds": s["train_time_s"], "peak_rss_gib": rss / 2**20, "first_train_loss": s["first_train_loss"],
            "final_train_loss": s["final_train_loss"], "adapter": str(out / "adapter"), "precision": s["precision"],
            "batching": s["batching"]}


LEVERS = {  # name -> the adgen override that switches that one lever off
    "no bf16 (fp32)": ["--precision", "fp32"],
    "no packing (padded)": ["--batching", "padded"],
    "no per-example attention": ["attn_implementation=sdpa"],
    "full logits": ["target_logits_only=false"],
    "torch's dropout": ["fast_dropout=false"],
}


def _median_row(runs: list[dict]) -> dict:
    """One side over its runs: the median samples/s (and tokens/s, seconds), the highest peak RSS; the first
    run's losses and adapter (the runs train the same records with the same seed)."""
    row = dict(runs[0])
    for key in ("samples_per_s", "tokens_per_s", "seconds"):
        row[key] = statistics.median(r[key] for r in runs)
    row["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="48 records, 48 dev records (<= 6 min here)")
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--eval-records", type=int, default=100)
    p.add_argument("--levers", action="store_true", help="also one adgen run per lever switched off")
    p.add_argument("--pairs", type=int, default=1,
                   help="run baseline and adgen alternately this many times; medians per side (default 1)")
    p.add_argument("--train", default=str(ROOT.parent / "shared/adgen/train.json"))
    p.add_argument("--dev", default=str(ROOT.parent / "shared/adgen/dev.json"))
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--worker", choices=["baseline", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--names", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = {"baseline": worker_baseline, "eval": worker_eval}[args.worker](args)
        Path(args.out, "result.json").write_text(json.dumps(result))
        return
    if args.quick:
        args.records, args.eval_records = 48, 48

    import torch

    from adgen.models import resolve_model

    resolve_model("smollm2-135m")  # convert the built-in model once, outside the timed runs
    print(f"# {args.records} train records, eval loss on {args.eval_records} dev records; torch {torch.__version__}, "
          f"{os.cpu_count()} cpu(s); CPU flags: {cpu_flags()} -> {cpu_kind()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="adgen-train-bench-"))
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--train", args.train, "--dev", args.dev, "--records", str(args.records),
              "--eval-records", str(args.eval_records)]

    pairs = []
    for i in range(max(1, args.pairs)):
        tag = "" if i == 0 else f"-{i + 1}"
        (work / f"baseline{tag}").mkdir()
        rss, _ = run_child([*me, "--worker", "baseline", "--out", str(work / f"baseline{tag}"), *common],
                           work / f"baseline{tag}.log")
        b = json.loads((work / f"baseline{tag}" / "result.json").read_text())
        base = {"name": "baseline: HF Trainer + PEFT, fp32, padded", "samples_per_s": b["samples"] / b["seconds"],
                "tokens_per_s": b["tokens"] / b["seconds"], "seconds": b["seconds"], "peak_rss_gib": rss / 2**20,
                "first_train_loss": b["first_train_loss"], "final_train_loss": b["final_train_loss"],
                "adapter": str(work / f"baseline{tag}" / "adapter")}
        print(f"baseline done in {b['seconds']:.0f}s", flush=True)
        cand = run_candidate(args, work, f"adgen{tag}", [])
        cand["name"] = f"adgen train defaults ({cand['precision']}, {cand['batching']})"
        print(f"adgen done in {cand['seconds']:.0f}s", flush=True)
        pairs.append((base, cand))
    rows = [_median_row([p[0] for p in pairs]), _median_row([p[1] for p in pairs])]
    if len(pairs) > 1:
        print("pairs (baseline s, adgen s, ratio): " + ", ".join(
            f"({b['seconds']:.0f}, {c['seconds']:.0f}, {c['samples_per_s'] / b['samples_per_s']:.2f})" for b, c in pairs))
    if args.levers:
        for lever, extra in LEVERS.items():
            rows.append(run_candidate(args, work, lever.split()[0] + "-" + str(len(rows)), extra))
            rows[-1]["name"] = f"adgen, {lever}"
            print(f"{lever} done in {rows[-1]['seconds']:.0f}s", flush=True)

    (work / "eval").mkdir()
    names = [str(i) for i in range(len(rows))]
    run_child([*me, "--worker", "eval", "--out", str(work / "eval"), *common, "--adapters",
               *[r["adapter"] for r in rows], "--names", *names], work / "eval.log")
    evals = json.loads((work / "eval" / "result.json").read_text())["eval_loss"]
    for name, r in zip(names, rows):
        r["eval_loss"] = evals[name]

    base = rows[0]
    print(f"\n{'run':58s} {'samples/s':>9s} {'tok/s':>7s} {'x base':>7s} {'peak RSS':>9s} "
          f"{'train loss':>10s} {'eval loss':>9s}")
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        print(f"{r['name'][:58]:58s} {r['samples_per_s']:9.3f} {r['tokens_per_s']:7.0f} {r['speedup']:6.2f}x "
              f"{r['peak_rss_gib']:6.2f} GiB {r['final_train_loss']:10.4f} {r['eval_loss']:9.4f}")
    if args.levers:
        full = rows[1]["samples_per_s"]
        print("\nshare of each lever (adgen defaults vs that lever off):")
        for r in rows[2:]:
            print(f"  {r['name']:48s} {full / r['samples_per_s']:.2f}x of the speed comes from it")
    if args.json:
        Path(args.json).write_text(json.dumps({"records": args.records, "eval_records": args.eval_records,
                                               "torch": torch.__version__, "rows": rows,
                                               "pairs_seconds": [[b["seconds"], c["seconds"]] for b, c in pairs]},
                                              indent=2))
    cand = rows[1]
    delta = (cand["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
    print(f"precision: baseline fp32, adgen {cand['precision']}")
    print(f"train_speedup={cand['speedup']:.2f} eval_loss_delta={100 * delta:+.2f}% "
          f"rss_ratio={cand['peak_rss_gib'] / base['peak_rss_gib']:.2f}")


if __name__ == "__main__":
    main()
