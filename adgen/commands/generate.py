"""`adgen generate`: ad copy for one attribute string, or for a whole catalog file (resumable).

    adgen generate --content "类型#裙*颜色#黑色*风格#简约"
    adgen generate --attributes '{"类型": "裙", "版型": ["宽松", "显瘦"]}' --stream
    adgen generate --input catalog.jsonl --output ads.jsonl --batch-size 16
    adgen generate --content "..." -n 4 --do-sample --temperature 0.95 --top-p 0.7 --best-of coverage
    adgen generate --input catalog.parquet --output out/ --engine ray --workers 4   (Ray Data, sharded)
    adgen generate --input catalog.parquet --output out/ --engine ray --gpus-per-worker 1   (one GPU per worker)

The logic lives in `adgen.generation` (engine) and `adgen.generation.bulk` (resumable files).
`add_model_arguments` / `add_decoding_arguments` / `decoding_config` are reusable by other commands.
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_MODEL = "smollm2-135m"


def add_model_arguments(p: argparse.ArgumentParser, *, default_model: str | None = DEFAULT_MODEL) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model, required=default_model is None,
                   help=f"built-in alias, local HF directory, .gguf file or hub id (default: {default_model})")
    g.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT (LoRA) adapter directory to apply on the model")
    g.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="generation backend (vllm needs `pip install vllm`)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on capable GPUs, else fp32), bf16, fp32, fp16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--batch-size", type=int, default=32,
                   help="prompts decoding together (default 32; continuous batching: a finished one's place is "
                        "taken at once; on CPUs a decode step of 32 rows costs little more than one of 8)")
    g.add_argument("--no-continuous-batching", dest="continuous_batching", action="store_false",
                   help="hf backend: length-sorted left-padded model.generate batches (the path before continuous "
                        "batching; also what models the engine cannot drive use)")
    g.add_argument("--system-prompt", default="default",
                   help="system prompt: 'default' (adgen's Chinese copywriter prompt), '' for none, or your text")


# Older spellings of decoding flags, kept working.
FLAG_ALIASES = {"banned_strings": ("--ban",)}
_METAVARS = {int: "N", float: "X", str: "TEXT"}


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """`--<field-name>` for every DecodingConfig field (type, default and help from the field), and --plain.
    Every flag defaults to None (not given: the field's default), so `decoding_config` knows what was asked."""
    from adgen.generation.decoding_fields import decoding_fields

    g = p.add_argument_group("decoding (greedy unless sampling is asked for; character-level repetition control on)")
    for f in decoding_fields():
        more = (" (repeatable; '' drops the default)" if f.default else " (repeatable)") if f.is_list else ""
        kwargs: dict = {"dest": f.name, "default": None,
                        "help": f"{f.help}{more} (default: {f.default_text()})".replace("%", "%%")}
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.is_list:
            kwargs.update(action="append", metavar=_METAVARS[f.type])
        else:
            kwargs.update(type=f.type, metavar=_METAVARS[f.type])
        g.add_argument(f.flag, *FLAG_ALIASES.get(f.name, ()), **kwargs)
    g.add_argument("--plain", action="store_true",
                   help="plain decoding: no DRY, no character n-gram ban, no ending bonus, no banned text, no loop detection")


def decoding_config(args: argparse.Namespace):
    """A DecodingConfig from the options of `add_decoding_arguments`: the flags given, a sampling setting
    (--temperature, --top-p, --top-k) implying --do-sample, --plain switching the adgen-specific shaping off."""
    from adgen.generation.config import PLAIN_FIELDS, DecodingConfig
    from adgen.generation.decoding_fields import decoding_fields

    values = {}
    for f in decoding_fields():
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = _list_flag(f, value) if f.is_list else value
    if "do_sample" not in values:
        values["do_sample"] = any(f.spec.sampling and f.name in values for f in decoding_fields())
    if args.plain:
        values.update(PLAIN_FIELDS)  # --plain wins over the shaping flags
    return DecodingConfig(**values)


def _list_flag(f, values: list[str]) -> tuple[str, ...]:
    """A repeatable flag's values: '' drops the default (--ban ''), otherwise a list replaces the default,
    or adds to it for banned_strings (the law's terms stay banned)."""
    from adgen.generation.decoding_fields import added_to_default

    if "" in values:
        return tuple(dict.fromkeys(v for v in values if v))
    return added_to_default(f, values) if f.spec.adds_to_default else tuple(values)


def _banned(values: list[str] | None) -> tuple[str, ...]:
    """--banned-strings / --ban as banned_strings (None: not given, the default)."""
    from adgen.generation.decoding_fields import field_named

    f = field_named("banned_strings")
    return f.default if values is None else _list_flag(f, values)


def register(subparsers) -> None:
    from adgen.commands.data import add_read_arguments

    p = subparsers.add_parser(
        "generate",
        help="write ad copy for an attribute string or a whole catalog file",
        description="Write ad copy from product attributes, for one input (--content / --attributes) "
        "or a whole file (--input/--output: progress bar, resumable after a kill).",
    )
    src = p.add_argument_group("input")
    x = src.add_mutually_exclusive_group(required=True)
    x.add_argument("--content", help='an AdGen attribute string, e.g. "类型#裙*颜色#黑色"')
    x.add_argument("--attributes", help='a JSON object, e.g. \'{"类型": "裙", "版型": ["宽松", "显瘦"]}\'')
    x.add_argument("--input", metavar="FILE", help="records with `content`: JSON lines / array, Parquet, CSV, a save_to_disk directory or a Hub dataset id (ID[:SPLIT])")
    src.add_argument("--output", "-o", metavar="FILE", help="with --input: the JSON lines file to write (resumed if it exists)")
    src.add_argument("--overwrite", action="store_true", help="with --input: start the output afresh instead of resuming")
    add_model_arguments(p)
    add_decoding_arguments(p)
    c = p.add_argument_group("candidates and output")
    c.add_argument("-n", type=int, default=1, metavar="K", help="make K candidates per input (needs sampling)")
    c.add_argument("--best-of", choices=["first", "coverage", "mbr"], default="first",
                   help="which candidate to keep as `predict`: the first, the best attribute coverage, or mbr (of those "
                        "that ended, cover the most and break no term: the highest mean ROUGE-L against the others)")
    c.add_argument("--vocab", default=None, metavar="FILE",
                   help="attribute vocabulary for --best-of coverage / mbr (default: built-in)")
    c.add_argument("--stream", action="store_true", help="with --content: print the text as it is generated")
    c.add_argument("--json", action="store_true", help="with --content: print one JSON object")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("engine (--input only)")
    r.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: Ray Data workers, --output is then a directory of "
                        "shards (needs `pip install 'adgen[ray]'`)")
    r.add_argument("--address", default=None, help="with --engine ray: the Ray cluster to join (default: start a local one)")
    r.add_argument("--workers", type=int, default=None,
                   help="with --engine ray: generator copies (default: one per GPU with GPUs, else one per CPU)")
    r.add_argument("--gpus-per-worker", type=float, default=None, metavar="X",
                   help="with --engine ray: GPUs Ray gives each worker (default: 1 where this machine or the cluster "
                        "has GPUs, else 0; a fraction like 0.5 shares a GPU; Ray hides GPUs from workers that ask "
                        "for none)")
    r.add_argument("--block-size", type=int, default=64, metavar="N",
                   help="with --engine ray: records per shard, the unit of work and of resuming (default 64)")
    r.add_argument("--shard-format", choices=["parquet", "jsonl"], default="parquet",
                   help="with --engine ray: shard and merged output format (default parquet)")
    add_read_arguments(p)
    p.set_defaults(func=run)


def content_from_args(args: argparse.Namespace) -> str | None:
    from adgen.data.attributes import format_attributes, parse_attributes
    from adgen.errors import AdgenError

    if args.attributes is not None:
        try:
            obj = json.loads(args.attributes)
        except json.JSONDecodeError as e:
            raise AdgenError(f"--attributes: not valid JSON ({e.msg}, column {e.colno}); "
                             'give an object like \'{"类型": "裙", "颜色": "黑色"}\'') from None
        if not isinstance(obj, dict) or not all(
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)) for v in obj.values()
        ):
            raise AdgenError('--attributes: give a JSON object of strings or lists of strings, e.g. '
                             '\'{"类型": "裙", "版型": ["宽松", "显瘦"]}\'')
        try:
            return format_attributes(obj)
        except ValueError as e:
            raise AdgenError(f"--attributes: {e}") from None
    if args.content is not None:
        content = args.content.strip()
        if not content:
            raise AdgenError("--content is empty; give attributes like \"类型#裙*颜色#黑色\"")
        try:
            parse_attributes(content)
        except ValueError as e:  # still usable as a free-form prompt: warn, don't refuse
            print(f"adgen: warning: --content is not a clean attribute string ({e}); using it as is", file=sys.stderr)
        return content
    return None


def _check_args(args: argparse.Namespace) -> None:
    from adgen.errors import AdgenError

    if args.input is not None and not args.output:
        raise AdgenError("--input needs --output FILE (the JSON lines file to write; an existing one is resumed)")
    if args.input is None and args.output:
        raise AdgenError("--output goes with --input FILE; for a single input the text is printed")
    if args.n < 1:
        raise AdgenError(f"-n must be >= 1, not {args.n}")
    if args.batch_size < 1:
        raise AdgenError(f"--batch-size must be >= 1, not {args.batch_size}")
    if args.stream and (args.input is not None or args.n > 1 or args.json):
        raise AdgenError("--stream works with one input and one candidate, without --json")
    if args.engine == "ray" and (args.input is None or args.backend != "hf"):
        raise AdgenError("--engine ray generates for a catalog (--input FILE --output DIR) with the hf backend")
    if args.engine != "ray" and any(getattr(args, k) is not None for k in ("address", "workers", "gpus_per_worker")):
        raise AdgenError("--address / --workers / --gpus-per-worker go with --engine ray")
    if args.engine == "ray":
        from adgen.generation.ray_catalog import check_gpu_options

        check_gpu_options(args.gpus_per_worker, args.device)  # before the catalog is read and Ray starts


def run(args: argparse.Namespace) -> int:
    from adgen.errors import AdgenError

    _check_args(args)
    config = decoding_config(args)
    config.check_candidates(args.n)
    content = content_from_args(args)
    if args.engine == "ray":
        from adgen.generation.ray_catalog import import_ray

        import_ray()  # a missing extra is reported before anything slow
    data = None
    if args.input is not None:  # read (and report bad lines) before the slow model load
        from adgen.commands.data import read_data

        data = read_data(args.input, args, require_summary=False)
    vocab = None
    if args.best_of in ("coverage", "mbr") and args.vocab:
        from adgen.metrics import AttributeVocab

        vocab = AttributeVocab.load(args.vocab)

    from adgen.data.chat import resolve_system_prompt

    kw = {"system_prompt": resolve_system_prompt(args.system_prompt)}
    if args.engine == "ray":
        return _run_ray(args, data, config, kw)

    from adgen.generation import load_generator

    generator = load_generator(
        args.model, adapter=args.adapter, backend=args.backend, dtype=args.dtype, device=args.device,
        batch_size=args.batch_size, **kw, **continuous_option(args),
    )
    if data is not None:
        return _run_bulk(args, generator, data, config, vocab)
    return _run_single(args, generator, content, config, vocab)


def _run_single(args, generator, content: str, config, vocab) -> int:
    from adgen.data.attributes import attributes_of
    from adgen.generation.bulk import pick_best

    if args.stream:
        stream = generator.stream(content, config)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    cands = generator.generate([content] * args.n, config)
    best, faith = pick_best(attributes_of(content) or [], cands, args.best_of, vocab) if args.n > 1 else (0, None)
    if args.json:
        obj = {"content": content, "predict": cands[best].text, "finish_reason": cands[best].finish_reason,
               "prompt_tokens": cands[best].prompt_tokens, "completion_tokens": cands[best].completion_tokens}
        if args.n > 1:
            obj.update(candidates=[c.text for c in cands], chosen=best)
        if faith is not None:
            obj["attr_coverage"] = faith["attr_coverage"]
        print(json.dumps(obj, ensure_ascii=False))
        return 0
    if args.n == 1:
        print(cands[0].text)
        return 0
    for i, c in enumerate(cands):
        mark = "*" if i == best else " "
        print(f"{mark}[{i + 1}] {c.text}")
    if faith is not None:
        cov = faith["attr_coverage"]
        print(f"(* kept: best attribute coverage {cov:.0%})" if cov is not None else "(* kept)", file=sys.stderr)
    return 0


def _run_bulk(args, generator, data, config, vocab) -> int:
    from adgen.generation.bulk import generate_bulk

    return _resumable_job(
        lambda: generate_bulk(generator, data.records, args.output, config, n=args.n, best_of=args.best_of,
                              vocab=vocab, overwrite=args.overwrite, progress=not args.no_progress),
        f"every finished record is in {args.output}", args.output, data, config)


def _run_ray(args, data, config, kw) -> int:
    from adgen.generation.ray_catalog import run_catalog
    from adgen.models import resolve_model

    resolve_model(args.model)  # convert a built-in / GGUF model once here, not in every worker at once
    generator_kwargs = dict(model_spec=args.model, adapter=args.adapter, backend="hf", dtype=args.dtype,
                            device=args.device, batch_size=args.batch_size, continuous=args.continuous_batching, **kw)
    return _resumable_job(
        lambda: run_catalog(
            data.records, args.output, generator_kwargs=generator_kwargs, config=config, n=args.n,
            best_of=args.best_of, vocab_path=args.vocab, address=args.address, workers=args.workers,
            gpus_per_worker=args.gpus_per_worker, block_size=args.block_size, shard_format=args.shard_format,
            overwrite=args.overwrite, progress=not args.no_progress),
        f"every finished block is in {args.output}/shards", args.output, data, config)


def _resumable_job(job, kept: str, output, data, config) -> int:
    """Run a catalog job; on Ctrl-C say what is kept and how to resume; print its summary."""
    try:
        summary = job()
    except KeyboardInterrupt:
        print(f"adgen: interrupted; {kept}: run the same command again to resume", file=sys.stderr)
        raise
    summary.bad_lines = list(data.errors)
    print(f"{output}: {summary.describe()} ({config.describe()})", file=sys.stderr)
    return 0


def continuous_option(args) -> dict:
    """load_generator's `continuous` for the hf backend (vLLM batches continuously by itself)."""
    return {} if args.backend == "vllm" else {"continuous": args.continuous_batching}

