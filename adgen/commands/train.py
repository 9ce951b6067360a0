"""`adgen train`: fine-tune with LoRA / QLoRA / DoRA / P-Tuning v2 / full SFT (logic in adgen.train)."""

from __future__ import annotations

import argparse

from adgen.commands import quiet_library_noise

# the config keys that also have a --flag (every key is a `key=value` override); each flag's type, choices
# and help come from TrainConfig's field and its comment (`add_config_flags`)
FLAG_KEYS = ("model", "train_data", "eval_data", "method", "output_dir", "max_steps", "epochs", "max_samples",
             "lr", "batch_size", "grad_accum", "precision", "batching", "seed")
SHORT_FLAGS = {"output_dir": "-o"}


class _IntermixedParser(argparse.ArgumentParser):
    """Lets `key=value` overrides come anywhere, also after options (`--max-steps 5 lora.r=16`)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:
            return super().parse_known_args(args, namespace)
        self.raw_args = list(args) if args is not None else None  # what --help reads overrides from
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


class _HelpWithKeys(argparse.Action):
    """-h / --help: the flags, then every config key with its type, value and comment. After --config
    (and overrides) the values shown are that recipe's."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        # overrides are positionals, parsed after the options: take them from the raw arguments
        raw = getattr(parser, "raw_args", None) or []
        overrides = [a for a in raw if "=" in a and not a.startswith("-")]
        parser.epilog = config_keys_help(getattr(namespace, "config", None), overrides)
        parser.print_help()
        parser.exit()


def config_keys_help(config: str | None = None, overrides: list[str] | None = None) -> str:
    """The config keys as `--help` lists them: `key (type) = value` and the key's comment."""
    import textwrap

    from adgen.config import describe_fields
    from adgen.errors import AdgenError
    from adgen.train.config import TrainConfig, load_train_config

    cfg, source = TrainConfig(), "defaults"
    if config:
        try:
            cfg, source = load_train_config(config, [o for o in overrides or [] if "=" in o]), config
        except AdgenError as e:
            source = f"defaults ({e})"
    lines = [f"config keys (set in the YAML, or as key=value / section.key=value overrides; values: {source}):"]
    for key, tp, value, comment in describe_fields(cfg):
        lines.append(f"  {key} ({tp}) = {value}")
        if comment:
            lines.extend(textwrap.wrap(comment, width=100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --train-data, ... for FLAG_KEYS, built from TrainConfig's fields: the type (Literal ->
    choices), the comment as help, the config's default shown."""
    import types
    import typing

    from adgen.config import field_comments
    from adgen.train.config import TrainConfig

    hints, comments, defaults = typing.get_type_hints(TrainConfig), field_comments(TrainConfig), TrainConfig()
    for key in FLAG_KEYS:
        tp = hints[key]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `int | None` -> int
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        kwargs: dict = {"dest": key, "help": f"{comments.get(key, '')} (config key {key}; default {getattr(defaults, key)!r})"}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp in (int, float):
            kwargs["type"] = tp
        flags = ["--" + key.replace("_", "-")] + ([SHORT_FLAGS[key]] if key in SHORT_FLAGS else [])
        parser.add_argument(*flags, **kwargs)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="fine-tune a model (LoRA, QLoRA, DoRA, P-Tuning v2, full)",
        description=(
            "Fine-tune a chat model on AdGen data. Options come from --config (a YAML file or a shipped\n"
            "recipe's name: `adgen recipes list`), then `key=value` overrides (e.g. lora.r=16 lr=1e-4), then\n"
            "the flags below; every config key is listed at the end. Runs as is on one CPU/GPU, and under\n"
            "`accelerate launch` / `torchrun` on several."
        ),
    )
    p.__class__ = _IntermixedParser  # same parser, overrides allowed between options
    p.add_argument("-h", "--help", action=_HelpWithKeys, help="show the flags and every config key (after --config: its values)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lora.r=16 max_samples=200")
    p.add_argument("--config", "-c", default=None, help="YAML file or shipped recipe name (smollm2-135m-adgen, llama3-8b-lora, ...)")
    add_config_flags(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (ChatGLM-style)")
    p.add_argument("--force-fp16", action="store_true", help="allow precision=fp16 despite its NaN risk")
    p.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --output-dir (or from CHECKPOINT); without --config the "
        "run's own config.yaml is used",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    from adgen.commands.data import add_read_arguments

    add_read_arguments(p)  # --encoding, --on-error, --columns: as in `adgen data`
    p.set_defaults(func=run)


def build_config(args):
    """TrainConfig from --config, overrides and flags (later wins); --resume alone reuses the run's config."""
    from pathlib import Path

    from adgen.config import parse_overrides
    from adgen.train.config import load_train_config

    if args.resume not in (None, "latest") and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.append(args.resume)  # `--resume key=value`: an override, not a checkpoint path
        args.resume = "latest"
    overrides = parse_overrides(args.overrides)
    for key in FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if args.trust_remote_code:
        overrides["trust_remote_code"] = True
    if args.force_fp16:
        overrides["allow_fp16"] = True
    if args.no_progress:
        overrides["progress"] = False
    if getattr(args, "encoding", None):
        overrides["encoding"] = args.encoding
    if getattr(args, "on_error", "fail") != "fail":
        overrides["on_error"] = args.on_error
    if getattr(args, "columns", None):
        overrides["columns"] = args.columns
    config_path = args.config
    if config_path is None and args.resume is not None:
        out = overrides.get("output_dir")
        if out and (Path(out) / "config.yaml").is_file():
            config_path = str(Path(out) / "config.yaml")
    return load_train_config(config_path, overrides)


def run(args) -> int:
    quiet_library_noise(args)
    from adgen.train.trainer import train

    cfg = build_config(args)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    from adgen.train.report import print_summary

    print_summary(result.summary)
    return 0
