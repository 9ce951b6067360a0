"""`adgen recipes list` / `adgen recipes copy NAME [DEST]`: the training recipes shipped with adgen.

    adgen recipes list                          # names and what each is for
    adgen recipes copy smollm2-135m-adgen my.yaml
    adgen train --config smollm2-135m-adgen     # a recipe by name (or --config my.yaml after editing)
"""

from __future__ import annotations

import argparse

from adgen.recipes import copy_recipe, list_recipes  # loaded at start-up anyway (train's flags)


def register(subparsers) -> None:
    p = subparsers.add_parser("recipes", help="list or copy the shipped training recipes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="recipes_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="the shipped recipes with a line on each")
    ls.add_argument("--all", action="store_true", help="also the accelerate / DeepSpeed launch configs")
    ls.set_defaults(func=run_list)
    cp = sub.add_parser("copy", help="copy a recipe to edit it")
    cp.add_argument("name", help="recipe name, e.g. smollm2-135m-adgen")
    cp.add_argument("dest", nargs="?", default=None, help="file or directory (default: ./<name>.yaml)")
    cp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    cp.set_defaults(func=run_copy)


def run_list(args) -> int:
    recipes = [r for r in list_recipes() if args.all or r.kind == "train"]
    width = max(len(r.name) for r in recipes)
    for r in recipes:
        print(f"{r.name:<{width}}  {r.summary}")
    if not args.all:
        print("\n(`--all` adds the accelerate / DeepSpeed launch configs; `adgen recipes copy NAME` to edit one)")
    return 0


def run_copy(args) -> int:
    target = copy_recipe(args.name, args.dest, overwrite=args.overwrite)
    print(f"{args.name} -> {target}  (then: adgen train --config {target})")
    return 0
