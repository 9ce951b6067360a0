"""`adgen serve`: the OpenAI-compatible API (+ /v1/adcopy) and the web UI in one process.

Safe by default: binds 127.0.0.1; a non-loopback bind needs --api-key (or $ADGEN_API_KEY), or
--insecure. The logic lives in adgen.serve.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from adgen.serve.settings import API_KEY_ENV, Limits

    lim = Limits()
    p = subparsers.add_parser(
        "serve",
        help="serve a model: OpenAI-compatible API, /v1/adcopy, web UI at /ui (streaming)",
        description=(
            "Serve a model over HTTP: POST /v1/chat/completions and GET /v1/models (OpenAI-compatible, "
            "streaming), POST /v1/adcopy (attributes -> copy + faithfulness figures), GET /health, "
            "and the web UI at /ui."
        ),
    )
    p.add_argument("--model", required=True, help="hub id, local HF dir, .gguf file, or built-in alias (smollm2-135m)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="PEFT (LoRA) adapter directory; repeat to serve several (the request's `model` field picks "
                        "one by NAME, or the base model): requests for different adapters decode in one batch. "
                        "The first one is the default; the UI compares it with the base model")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="the base model of a whole fine-tuned --model (a full or top-layers fine-tune, e.g. "
                        "`adgen demo`'s), served beside it under its own name: the UI's compare view and the API's "
                        "`model` field run it. Loads both models (twice the weights' memory: fine for SmolLM2; on a "
                        "GPU the two KV caches share --gpu-memory-utilization). Not with --adapter, whose base "
                        "is --model itself")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on the API (and KEY as the UI password); "
        f"prefer ${API_KEY_ENV}, which does not show in the process list",
    )
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without an API key")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; CORS is off by default)")
    p.add_argument("--served-model-name", default=None, help="model id shown in /v1/models (default: the model's name)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on GPUs that run it natively and on CPUs with AVX512-BF16 / AMX, else fp32), "
                        "bf16, fp32, fp16")
    p.add_argument("--batch-size", type=int, default=32,
                   help="most requests decoding together (continuous batching's slots; one batch without it)")
    p.add_argument("--no-continuous-batching", dest="continuous_batching", action="store_false",
                   help="run one job at a time (streams one by one; equal waiting non-streaming requests batched): "
                        "the baseline bench/serve_load.py compares with")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="FRACTION",
                   help="on a GPU, the share of its total memory the server may use (weights, KV cache, working "
                        "memory; default 0.9, as vLLM): the KV cache is sized from it at start -- as many of the "
                        "--batch-size slots as fit requests of --max-prompt-tokens + --max-tokens-limit; more "
                        "requests wait in the queue. /health and the startup line report the size")
    p.add_argument("--no-ui", action="store_true", help="API only, no web UI at /ui")
    p.add_argument("--no-ui-training", dest="ui_training", action="store_false",
                   help="no training page in the web UI (it starts `adgen train` processes and reads data files by "
                        "server path, for whoever can log into the UI)")
    p.add_argument("--vocab", default=None, help="attribute vocabulary JSON for the faithfulness figures (default: built-in)")
    p.add_argument("--examples", default=None, help="AdGen file whose first contents are the UI's example products")
    g = p.add_argument_group("limits (per request; 4xx above them)")
    g.add_argument("--max-tokens-limit", type=int, default=lim.max_tokens, help="cap on max_tokens")
    g.add_argument("--default-max-tokens", type=int, default=lim.default_max_tokens,
                   help="max_tokens of a request that gives none (default: sized from the tokenizer)")
    g.add_argument("--max-n", type=int, default=lim.max_n, help="cap on n (choices per request)")
    g.add_argument("--max-prompt-tokens", type=int, default=lim.max_prompt_tokens)
    g.add_argument("--max-prompt-chars", type=int, default=lim.max_prompt_chars)
    g.add_argument("--max-body-bytes", type=int, default=lim.max_body_bytes, help="request body size (413 above)")
    g.add_argument("--max-queue", type=int, default=lim.max_queue, help="waiting requests (429 above)")
    g.add_argument("--max-file-bytes", type=int, default=lim.max_file_bytes,
                   help="one upload to /v1/files (413 above; default 100 MiB)")
    g.add_argument("--max-batch-lines", type=int, default=lim.max_batch_lines,
                   help="requests in one batch input file (default 50000, OpenAI's cap)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the Batch API keeps uploaded files, batches and each finished row; a restarted "
                        "server with the same DIR resumes unfinished batches (default: $ADGEN_CACHE/serve, "
                        "~/.cache/adgen/serve)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from adgen.errors import ConfigError
    from adgen.models import serving_dtype
    from adgen.serve.settings import Limits, ServeSettings

    limits = Limits(
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens_limit,
        default_max_tokens=(None if args.default_max_tokens is None
                            else min(args.default_max_tokens, args.max_tokens_limit)),
        max_n=args.max_n,
        max_queue=args.max_queue,
        max_file_bytes=args.max_file_bytes,
        max_batch_lines=args.max_batch_lines,
    )
    limits.validate()
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ConfigError(f"--gpu-memory-utilization must be a fraction in (0, 1], not {args.gpu_memory_utilization}")
    from pathlib import Path

    adapters = [_named_adapter(spec) for spec in args.adapter]
    adapters[1:] = [(n or Path(p.rstrip("/\\")).name, p) for n, p in adapters[1:]]
    names = [n for n, _ in adapters[1:]]
    if len(set(names)) != len(names):
        raise ConfigError("each further --adapter needs a distinct name: --adapter NAME=PATH")
    settings = ServeSettings(
        model=args.model,
        adapter=adapters[0][1] if adapters else None,
        adapter_name=adapters[0][0] if adapters else None,
        extra_adapters=dict(adapters[1:]),
        base=args.base,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        insecure=args.insecure,
        cors_origins=list(args.cors_origin),
        served_model_name=args.served_model_name,
        device=args.device,
        dtype=serving_dtype(args.dtype, args.device),
        batch_size=args.batch_size,
        continuous_batching=args.continuous_batching,
        gpu_memory_utilization=args.gpu_memory_utilization,
        ui=not args.no_ui,
        ui_training=args.ui_training,
        vocab=args.vocab,
        examples=args.examples,
        limits=limits,
        state_dir=args.state_dir,
    )
    settings.validate()  # e.g. --base with --adapter: refused before anything loads
    return settings


def _named_adapter(spec: str) -> tuple[str | None, str]:
    """'NAME=PATH' -> (NAME, PATH); a plain PATH -> (None, PATH)."""
    from pathlib import Path

    name, sep, path = spec.partition("=")
    if sep and name and not Path(spec).exists():
        return name, path
    return None, spec


def run(args) -> int:
    import os
    import sys

    from adgen.serve.server import serve_forever
    from adgen.serve.settings import check_bind, is_loopback

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    settings = settings_from_args(args)
    key = settings.resolved_api_key()
    check_bind(settings.host, key, settings.insecure)  # before loading the model
    if not is_loopback(settings.host) and not key:
        print(f"adgen serve: WARNING: {settings.host} is exposed without an API key (--insecure)", file=sys.stderr)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(
        f"adgen serve: loading {settings.model}"
        + "".join(f" + adapter {p}" for p in [settings.adapter, *settings.extra_adapters.values()] if p)
        + (f" and the base model {settings.base}" if settings.base else ""),
        file=sys.stderr,
    )
    print(
        f"adgen serve: API http://{host}:{settings.port}/v1  health /health"
        + ("" if args.no_ui else f"  UI http://{host}:{settings.port}/ui")
        + ("  (API key required)" if key else ""),
        file=sys.stderr,
    )
    from adgen.serve import access_log

    access_log.configure(args.log_level)
    serve_forever(settings, log_level=args.log_level)
    return 0
