"""`adgen demo`: the whole journey on built-in defaults (see adgen/demo.py)."""

from __future__ import annotations

import argparse

from adgen.demo_config import DemoConfig  # dataclass only: cheap at start-up


def register(subparsers) -> None:
    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="the whole journey on built-in defaults: zero-shot eval, short fine-tune, eval, comparison (~10 min on CPU)",
        description="Inspect the data, evaluate the built-in model zero-shot on a few dev records, fine-tune it "
        "briefly (the top layers' own weights, recipe demo-smollm2-135m), evaluate again, and write the comparison "
        "(markdown + PNG) and the command that serves the result beside its base model (the web UI compares the "
        "two). No hub, no GPU needed.",
    )
    p.add_argument("--data-dir", help="folder with dev.json and train.json, e.g. ../shared/adgen; "
                   "default: a small built-in sample")
    p.add_argument("--model", default=d.model, help=f"model spec (default: the built-in {d.model})")
    p.add_argument("--output-dir", "-o", default=d.output_dir, help=f"where everything goes (default {d.output_dir})")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, metavar="N",
                   help=f"dev records evaluated before and after fine-tuning (default {d.eval_samples})")
    p.add_argument("--minutes", type=float, default=d.minutes,
                   help=f"time budget of the whole demo; the fine-tune gets what the evaluations leave, sized from "
                        f"its measured step time (default {d.minutes:g})")
    p.add_argument("--train-samples", type=int, default=d.train_samples, metavar="N",
                   help=f"at most the first N train records for the short fine-tune (default {d.train_samples})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="tokens per output (default: sized from the tokenizer)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adgen.demo import run_demo

    run_demo(DemoConfig(data_dir=args.data_dir, model=args.model, output_dir=args.output_dir,
                        eval_samples=args.eval_samples, train_samples=args.train_samples, minutes=args.minutes,
                        max_new_tokens=args.max_new_tokens, progress=not args.no_progress))
    return 0
