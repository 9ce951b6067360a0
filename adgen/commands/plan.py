"""`adgen plan RECIPE [key=value ...]`: will the recipe fit a GPU? (logic in adgen.plan)

    adgen plan llama3-8b-qlora                   # parameters, training peak, serving slots on 24/40/80 GiB cards
    adgen plan llama3-8b-lora batch_size=4 gradient_checkpointing=true --gpu-memory 48
    adgen plan my.yaml --json                    # for machines

Works offline on the meta device: no weights are read or downloaded and no GPU is needed.
"""

from __future__ import annotations

import argparse
import json
import logging

from adgen.commands import quiet_library_noise
from adgen.config import parse_overrides
from adgen.errors import ConfigError


def register(subparsers) -> None:
    from adgen.commands.train import _IntermixedParser

    p = subparsers.add_parser(
        "plan", help="estimate a recipe's parameters and GPU memory (training, serving) without a GPU",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.__class__ = _IntermixedParser  # as `adgen train`: overrides may also come after the options
    p.add_argument("recipe", nargs="?", help="a shipped recipe's name (`adgen recipes list`) or a YAML file, "
                   "as for adgen train")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. batch_size=4 lora.r=16")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                   help="also plan for a card of this size (always: 24, 40 and 80 GiB)")
    p.set_defaults(func=run)


def run(args) -> int:
    quiet_library_noise(args)
    logging.getLogger("peft").setLevel(logging.ERROR)
    from adgen.plan import plan, render

    if not args.recipe or "=" in args.recipe:
        raise ConfigError("name the recipe to plan first: a shipped recipe (`adgen recipes list`, e.g. "
                          "`adgen plan llama3-8b-qlora`) or a YAML file, then any key=value overrides")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not a key=value override (e.g. batch_size=4); one recipe per call")
    result = plan(args.recipe, parse_overrides(args.overrides), gpu_memory_gib=args.gpu_memory)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return 0
    from rich.console import Console

    Console().print(render(result))
    return 0
