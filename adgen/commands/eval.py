"""`adgen eval`: generate for every record of an AdGen file, score it, write a run directory.

    adgen eval --data dev.json --limit 20                              # built-in smollm2-135m, greedy
    adgen eval --model meta-llama/Meta-Llama-3-8B-Instruct --adapter runs/lora/adapter --data dev.json
    adgen eval --data dev.json --do-sample --temperature 0.95 --top-p 0.7 --max-new-tokens 64 --seed 0

Writes into --output-dir (default runs/eval-<model>-<time>): generated_predictions.jsonl (one line
per record with its scores), metrics.json (every figure, decoding, model, data sha256, timings) and
report.md. An interrupted eval resumes when run again with the same --output-dir and settings.
Scores: the field's protocol (jieba ROUGE-1/2/L F x100, character BLEU-4 x100, mean over
examples), attribute faithfulness and compliance_violation_rate (the Advertising Law's absolute
terms: 最佳, 国家级, 顶级 ...); see docs/METRICS.md. The logic lives in adgen.evaluation.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from adgen.commands.data import add_read_arguments, read_data
from adgen.commands.generate import add_decoding_arguments, add_model_arguments, continuous_option, decoding_config
from adgen.data.chat import resolve_system_prompt
from adgen.errors import AdgenError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model (+ adapter) on an AdGen file: predictions, metrics.json, report.md",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--data", required=True, metavar="FILE", help="AdGen file with content and summary (e.g. dev.json; JSON lines / array, Parquet or CSV)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N records only")
    g.add_argument("--output-dir", "-o", default=None, metavar="DIR",
                   help="run directory (default: runs/eval-<model>-<time>); an unfinished run there is resumed")
    g.add_argument("--overwrite", action="store_true", help="discard an earlier (finished or unfinished) run in --output-dir")
    g.add_argument("--vocab", default=None, metavar="FILE",
                   help="attribute vocabulary JSON for faithfulness (default: the adapter's training run "
                        "attribute_vocab.json if there is one, else the built-in one)")
    g.add_argument("--examples", type=int, default=3, metavar="K", help="best / worst examples in report.md (default 3)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(p)
    add_decoding_arguments(p)
    add_read_arguments(p)
    p.set_defaults(func=run)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def default_output_dir(model: str, adapter: str | None) -> Path:
    name = _slug(Path(str(model).rstrip("/")).name)
    if adapter:
        a = Path(str(adapter).rstrip("/"))
        name += "-" + _slug(a.parent.name if a.name == "adapter" and a.parent.name else a.name)
    return Path("runs") / f"eval-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args: argparse.Namespace) -> int:
    from adgen.evaluation.run import make_fingerprint, prepare_output_dir, resolve_vocab, run_eval, sha256_file

    if args.limit is not None and args.limit < 1:
        raise AdgenError(f"--limit must be >= 1, not {args.limit}")
    if args.batch_size < 1:
        raise AdgenError(f"--batch-size must be >= 1, not {args.batch_size}")
    if args.examples < 0:
        raise AdgenError(f"--examples must be >= 0, not {args.examples}")
    config = decoding_config(args)

    # Everything cheap and checkable first: data, vocabulary, output dir; then the slow model load.
    data = read_data(args.data, args)
    records = data.records[: args.limit] if args.limit else data.records
    if not records:
        raise AdgenError(f"{args.data}: no records to evaluate")
    vocab, vocab_source = resolve_vocab(args.vocab, args.adapter)
    system_prompt = resolve_system_prompt(args.system_prompt)
    out = Path(args.output_dir) if args.output_dir else default_output_dir(args.model, args.adapter)
    fingerprint = make_fingerprint(
        model=args.model, adapter=args.adapter, data_sha256=sha256_file(args.data), decoding=config,
        system_prompt=system_prompt,
    )
    done = prepare_output_dir(out, fingerprint, overwrite=args.overwrite, claim=False)
    if done:
        left = len(records) - sum(1 for r in records if _key(r) in done)
        print(f"{out}: resuming an unfinished run ({len(records) - left} of {len(records)} records done)", file=sys.stderr)

    from adgen.generation.loader import load_generator  # torch, transformers

    t = time.perf_counter()
    generator = load_generator(
        args.model, adapter=args.adapter, backend=args.backend, dtype=args.dtype, device=args.device,
        batch_size=args.batch_size, system_prompt=system_prompt, **continuous_option(args),
    )
    load_s = time.perf_counter() - t
    result = run_eval(
        generator, records, out, config,
        data_path=args.data,
        data_info={
            "limit": args.limit,
            "records_in_file": len(data.records),
            "skipped_bad_records": data.skipped,
            "encoding": data.encoding,
        },
        vocab=vocab, vocab_source=vocab_source, fingerprint=fingerprint,
        progress=not args.no_progress, model_load_s=load_s, report_examples=args.examples,
    )
    print_summary(result.metrics)
    print(f"wrote {result.predictions_path}, {result.metrics_path}, {result.report_path}", file=sys.stderr)
    return 0


def _key(record) -> str:
    from adgen.generation.resumable import record_key

    return record_key(record.line, record.content)


def print_summary(metrics: dict) -> None:
    """Every figure of metrics.json as a rich table."""
    from rich.console import Console

    from adgen.evaluation.report import metrics_table

    t = metrics["timings"]
    title = f"{metrics['model']}" + (f" + {metrics['adapter']}" if metrics.get("adapter") else "")
    table = metrics_table(metrics["metrics"], f"adgen eval: {title}, {metrics['n']} examples")
    table.add_section()
    table.add_row("[bold]run[/bold]", "")
    table.add_row("hit max_new_tokens", f"{metrics['hit_max_new_tokens_share']:.0%}")
    table.add_row("stopped by loop detection", f"{metrics.get('stopped_by_loop_share', 0.0):.0%}")
    table.add_row("decoding", metrics["decoding"]["description"])
    sps, tps = t.get("samples_per_s"), t.get("tokens_per_s")
    table.add_row("samples/s", f"{sps:.3f}" if sps else "n/a")
    table.add_row("generated tokens/s", f"{tps:.1f}" if tps else "n/a")
    table.add_row("generation / total s", f"{t['generation_s']:.1f} / {t['total_s']:.1f}")
    Console(stderr=False).print(table)
