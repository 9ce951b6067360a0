"""`adgen export`: merge a LoRA/DoRA adapter into its base model (logic in adgen.export.merge), and/or write a
GGUF file + Ollama Modelfile for llama.cpp / Ollama (logic in adgen.export.gguf)."""

from __future__ import annotations

from pathlib import Path

from adgen.commands import quiet_library_noise
from adgen.errors import AdgenError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="merge a LoRA adapter into the base weights (HF / vLLM directory) and/or write a GGUF for llama.cpp / Ollama",
        description=(
            "Merge a LoRA / DoRA adapter into its base model and write a standalone transformers directory "
            "that transformers and vLLM load without PEFT (-o DIR), and/or a GGUF file that llama.cpp, Ollama "
            "and transformers load, with an Ollama Modelfile beside it (--gguf FILE.gguf; Llama-architecture "
            "models only). Merging into a 4-bit base is refused: merge into the 16-bit base, then quantize the "
            "merged model if you need 4 bit."
        ),
    )
    p.add_argument("--adapter", "-a", default=None,
                   help="adapter directory (e.g. runs/x/adapter); required with -o, optional with --gguf")
    p.add_argument("--model", "-m", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output", "-o", default=None, dest="output", help="directory for the merged model")
    p.add_argument("--gguf", default=None, metavar="FILE.gguf",
                   help="write a GGUF file (merged in fp32) and FILE.Modelfile for `ollama create NAME -f FILE.Modelfile`")
    p.add_argument("--quant", default="f16", metavar="{f16,q8_0,q4_k_m,q5_k_m,q6_k}",
                   help="GGUF weight type: f16 (default) or q8_0, written directly (norms stay f32); q4_k_m, q5_k_m, "
                        "q6_k: quantized from f16 by llama.cpp's llama-quantize (`bash scripts/build_llama_cpp.sh`)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="weights of the merged model at -o (auto: fp32 bases stay fp32, others bf16); "
                        "the GGUF is always merged in fp32")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None,
                   help="(refused) merging into a quantized base; shown for the explanation")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --output / file at --gguf")
    p.set_defaults(func=run)


def run(args) -> int:
    quiet_library_noise(args)

    gguf = getattr(args, "gguf", None)
    if not args.output and not gguf:
        raise AdgenError("nothing to write: pass -o DIR (merged transformers model) and/or --gguf FILE.gguf")
    if args.output and not args.adapter:
        raise AdgenError("-o writes an adapter merged into its base: pass --adapter DIR (to convert a model "
                         "without an adapter to GGUF, use --gguf FILE.gguf alone)")
    if gguf:
        from adgen.export.checkpoint import read_adapter_config
        from adgen.export.gguf import preflight

        if args.quantize:
            raise AdgenError(f"--quantize {args.quantize} does not apply to GGUF export: use --quant q8_0, "
                             "or --quant q4_k_m (llama.cpp's 4-bit type)")
        if not args.model and not args.adapter:
            raise AdgenError("--gguf needs --model (and optionally --adapter to merge in)")
        base = args.model or read_adapter_config(args.adapter).get("base_model_name_or_path")
        preflight(gguf, quant=args.quant, overwrite=args.overwrite, base_model=base)

    out = None
    if args.output:
        from adgen.export.merge import merge_adapter

        out = merge_adapter(
            args.adapter, args.output, model=args.model, dtype=args.dtype, quantization=args.quantize,
            trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
        )
        print(f"merged {args.adapter} into {args.model or 'its base model'}: {out}")
        print(f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) or `vllm serve {out}`")
    if gguf:
        from adgen.export.gguf import export_gguf, load_for_gguf

        model, tokenizer = load_for_gguf(
            args.model, args.adapter, work_dir=Path(gguf).parent, merged_dir=out,
            trust_remote_code=args.trust_remote_code,
        )
        result = export_gguf(model, tokenizer, gguf, quant=args.quant, overwrite=args.overwrite)
        print(result.summary())
    return 0
