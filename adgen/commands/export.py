"""`adgen export`: merge a LoRA/DoRA adapter into its base model (logic in adgen.export)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="merge a LoRA adapter into the base weights (standalone HF / vLLM directory)",
        description=(
            "Merge a LoRA / DoRA adapter into its base model and write a standalone transformers directory "
            "that transformers and vLLM load without PEFT. Merging into a 4-bit base is refused: merge into "
            "the 16-bit base, then quantize the merged model if you need 4 bit."
        ),
    )
    p.add_argument("--adapter", "-a", required=True, help="adapter directory (e.g. runs/x/adapter)")
    p.add_argument("--model", "-m", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output", "-o", required=True, dest="output", help="directory for the merged model")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="weights of the merged model (auto: fp32 bases stay fp32, others bf16)")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                   help="(refused) merging into a quantized base; shown for the explanation")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --output")
    p.set_defaults(func=run)


def _quiet(args) -> None:
    """Hide known, harmless library noise unless -v (bitsandbytes' optional-kernel notice, deprecations)."""
    import logging
    import warnings

    if not getattr(args, "verbose", False):
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")


def run(args) -> int:
    _quiet(args)
    from adgen.export import merge_adapter

    out = merge_adapter(
        args.adapter, args.output, model=args.model, dtype=args.dtype, quantization=args.quantize,
        trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
    )
    print(f"merged {args.adapter} into {args.model or 'its base model'}: {out}")
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) or `vllm serve {out}`")
    return 0
