"""Merge a LoRA / DoRA adapter into its base model: a standalone transformers directory.

The merged directory (config.json, model.safetensors, tokenizer, generation_config.json) loads with
`AutoModelForCausalLM.from_pretrained` and with vLLM, no PEFT needed. Merging happens in 16 or 32 bit:
a 4-bit base is refused, because W4 + BA cannot be stored in 4 bits without re-quantizing (the
merged model would not be the one that was evaluated). The right procedure for a QLoRA adapter:
load the base in bf16, merge, then quantize the merged model if wanted.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from adgen.errors import AdgenError
from adgen.export.checkpoint import quantization_method, read_adapter_config, stored_dtype
from adgen.io import replace_dir, temp_dir_for
from adgen.models import dtype_name, load_tokenizer, resolve_model

log = logging.getLogger(__name__)

FOUR_BIT_PROCEDURE = (
    "load the base model in 16-bit and merge there (adgen export --model <the 16-bit base> --adapter {adapter} "
    "--dtype bf16 -o DIR); then, if you want a 4-bit model, quantize the merged one (e.g. load DIR with "
    "BitsAndBytesConfig(load_in_4bit=True), or convert it to GGUF / AWQ)"
)


def merge_adapter(
    adapter: str | Path,
    output_dir: str | Path,
    *,
    model: str | None = None,
    dtype: str = "auto",
    quantization: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Merge `adapter` into `model` (default: the adapter's base_model_name_or_path); returns output_dir."""
    # peft here, not at the top: importing it (and the bitsandbytes it pulls in) costs ~3 s, which an export of a
    # plain model (adgen.export.gguf imports this module) should not pay
    from peft import PeftModel

    adapter = Path(adapter)
    acfg = read_adapter_config(adapter)
    if quantization:
        raise AdgenError(
            f"refusing to merge into a {quantization} base: merged weights cannot be stored in 4/8 bit without "
            "re-quantizing, so the result would not be the model you trained. " + FOUR_BIT_PROCEDURE.format(adapter=adapter)
        )
    ptype = str(acfg.get("peft_type", "")).upper()
    if ptype not in ("LORA",):
        raise AdgenError(
            f"{adapter} is a {ptype or 'non-LoRA'} adapter: only LoRA / DoRA adapters merge into the weights "
            "(prefix tuning adds trained key/value prefixes at run time). Serve it as an adapter instead: "
            "load the base model and pass --adapter"
        )
    spec = model or acfg.get("base_model_name_or_path")
    if not spec:
        raise AdgenError(f"{adapter}/adapter_config.json names no base model: pass --model")
    resolved = resolve_model(spec)
    quant = quantization_method(resolved.path) if resolved.kind != "hub" else None
    if quant:
        raise AdgenError(
            f"{spec} is a {quant}-quantized checkpoint: refusing to merge into quantized weights. "
            + FOUR_BIT_PROCEDURE.format(adapter=adapter)
        )

    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise AdgenError(f"{out} exists and is not empty: pass --overwrite to replace it, or choose another -o")
        if not (out / "config.json").is_file():
            raise AdgenError(f"--overwrite: {out} does not look like a model directory; refusing to replace it")

    if dtype == "auto":
        dtype = "float32" if stored_dtype(resolved.path) in ("float32", None) else "bfloat16"
    name = dtype_name(dtype)
    if name not in ("bfloat16", "float32"):
        raise AdgenError(f"--dtype {dtype}: merge in bf16 or fp32 (fp16 risks overflow in Llama-3 weights)")
    torch_dtype = getattr(torch, name)

    base = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch_dtype, trust_remote_code=trust_remote_code)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(out)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else resolved.path
        tokenizer = load_tokenizer(str(tok_src), trust_remote_code=trust_remote_code)
        tokenizer.save_pretrained(str(tmp))
        try:
            GenerationConfig.from_pretrained(str(resolved.path)).save_pretrained(str(tmp))
        except OSError:
            pass  # the base has no generation_config.json
        (tmp / "adgen_export.json").write_text(
            json.dumps({"base_model": str(spec), "adapter": str(adapter.resolve()), "dtype": name,
                        "method": "dora" if acfg.get("use_dora") else "lora"}, indent=2) + "\n",
            encoding="utf-8",
        )
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
