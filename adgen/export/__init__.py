"""Exporting a trained model, in two forms (`adgen export`):

* a LoRA / DoRA adapter merged into its base: a standalone transformers directory (`merge_adapter`,
  merge.py), loaded by transformers and vLLM without PEFT;
* a GGUF file for llama.cpp / Ollama with an Ollama Modelfile beside it (`export_gguf`, gguf.py; its tensor
  layout in gguf_tensors.py, its tokenizer keys in gguf_tokenizer.py, the Modelfile in modelfile.py; the
  k-quants through llama.cpp's own llama-quantize, llama_cpp.py).

llama_server.py runs llama.cpp's server on a GGUF (for the tests and bench/gguf_quants.py; not imported here).

What both read from a model or adapter directory (the adapter's config, the stored dtype, quantized
weights) is in checkpoint.py. Every name below is importable from `adgen.export`; the GGUF ones also from
`adgen.export.gguf`.
"""

from __future__ import annotations

from adgen.export.checkpoint import quantization_method, read_adapter_config, stored_dtype
from adgen.export.gguf import (
    DIRECT_QUANTS,
    QUANTS,
    SUPPORTED_ARCHITECTURES,
    ChatFormat,
    GGUFExport,
    Quant,
    check_architecture,
    check_gguf_path,
    check_quant,
    detect_chat_format,
    detect_pre_tokenizer,
    export_gguf,
    load_for_gguf,
    modelfile_path,
    modelfile_text,
    preflight,
    write_modelfile,
)
from adgen.export.llama_cpp import LLAMA_QUANTIZE_TYPES, find_tool, quantize_gguf
from adgen.export.merge import FOUR_BIT_PROCEDURE, merge_adapter

__all__ = [
    "DIRECT_QUANTS", "FOUR_BIT_PROCEDURE", "LLAMA_QUANTIZE_TYPES", "QUANTS", "SUPPORTED_ARCHITECTURES", "ChatFormat",
    "GGUFExport", "Quant", "check_architecture", "check_gguf_path", "check_quant", "detect_chat_format",
    "detect_pre_tokenizer", "export_gguf", "find_tool", "load_for_gguf", "merge_adapter", "modelfile_path",
    "modelfile_text", "preflight", "quantization_method", "quantize_gguf", "read_adapter_config", "stored_dtype",
    "write_modelfile",
]
