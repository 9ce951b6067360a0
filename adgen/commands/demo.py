"""`adgen demo`: the whole journey on built-in defaults (see adgen/demo.py)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the main job on built-in defaults (built-in model, no hub, no GPU)",
        description="Inspect the data, load the built-in model and write ad copy for a few dev records.",
    )
    p.add_argument("--data-dir", help="folder with dev.json (and train.json), e.g. ../shared/adgen; "
                   "default: a small built-in sample")
    p.add_argument("--model", default="smollm2-135m", help="model spec (default: the built-in smollm2-135m)")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("-n", "--num-examples", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from adgen.demo import DemoConfig, run_demo

    run_demo(DemoConfig(data_dir=args.data_dir, model=args.model, output_dir=args.output_dir,
                        num_examples=args.num_examples, max_new_tokens=args.max_new_tokens))
    return 0
