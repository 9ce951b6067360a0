"""Write a Llama-architecture model (optionally with a LoRA adapter merged in) as a GGUF file for
llama.cpp / Ollama, plus an Ollama Modelfile next to it.

    model, tokenizer = load_for_gguf("smollm2-135m", adapter="runs/x/adapter", work_dir=Path("out"))
    result = export_gguf(model, tokenizer, "out/adgen.gguf", quant="q8_0")
    print(result.summary())

The file is written with the `gguf` package's `GGUFWriter` (llama.cpp's own Python writer), streaming
one tensor at a time, so memory stays at the fp32 model plus one converted tensor. Only the llama
architecture (`LlamaForCausalLM`: Llama-2/3, SmolLM2, ...) with a byte-level BPE tokenizer is
supported. Layout facts followed here, as llama.cpp's converter does them:

* tensor names `token_embd`, `blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,
  ffn_up,ffn_down}`, `output_norm`, `output` (left out when the embeddings are tied);
* the q and k projections are permuted per head from Hugging Face's "rotate half" rotary layout into
  llama.cpp's interleaved pairs (transformers' GGUF loader undoes exactly this);
* norms (and every 1-D tensor) stay F32; 2-D weights are F16, or Q8_0 with `quant="q8_0"`; the k-quants
  (`q4_k_m`, `q5_k_m`, `q6_k`) are made from an f16 file by llama.cpp's own `llama-quantize` (llama_cpp.py);
* the tokenizer is stored as `tokenizer.ggml.model = "gpt2"` with the token list, token types,
  merges, special ids, the pre-tokenizer name llama.cpp uses to split text, and the chat template.

The Modelfile is `<stem>.Modelfile` beside `<stem>.gguf` (so several exports can share a folder):
`ollama create NAME -f <stem>.Modelfile`.

This module checks, loads and writes; the parts it writes come from `gguf_tensors` (tensor names, the
rotary permutation, stored types), `gguf_tokenizer` (the tokenizer keys, the chat format) and `modelfile`
(the Ollama Modelfile). Its public names include theirs that users call (`detect_chat_format`,
`write_modelfile`, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
from tqdm.auto import tqdm

from adgen.data.chat import DEFAULT_SYSTEM_PROMPT
from adgen.errors import AdgenError
from adgen.export.checkpoint import stored_dtype
from adgen.export.gguf_tensors import Quant, encode_tensor, plan_tensors, rope_params, rope_type, tensor_nbytes
from adgen.export.gguf_tokenizer import ChatFormat, add_tokenizer_metadata, detect_chat_format, detect_pre_tokenizer
from adgen.export.llama_cpp import BUILD_COMMAND, LLAMA_QUANTIZE_TYPES, find_tool, quantize_gguf
from adgen.export.merge import merge_adapter
from adgen.export.modelfile import modelfile_path, modelfile_text, write_modelfile
from adgen.io import atomic_output
from adgen.models import load_model, load_tokenizer, resolve_model

__all__ = [
    "DIRECT_QUANTS", "QUANTS", "SUPPORTED_ARCHITECTURES", "ChatFormat", "GGUFExport", "Quant", "check_architecture",
    "check_gguf_path", "check_quant", "detect_chat_format", "detect_pre_tokenizer", "export_gguf", "load_for_gguf",
    "modelfile_path", "modelfile_text", "preflight", "write_modelfile",
]

# Written by adgen itself (gguf_tensors), and made by llama.cpp's llama-quantize from an f16 file.
DIRECT_QUANTS: tuple[str, ...] = ("f16", "q8_0")
QUANTS: tuple[str, ...] = DIRECT_QUANTS + tuple(LLAMA_QUANTIZE_TYPES)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM",)

_OTHER_QUANTS_HINT = (
    "for other llama.cpp types (Q5_0, IQ4_XS, ...) export f16 and run llama.cpp's "
    "`llama-quantize out.gguf out-iq4_xs.gguf IQ4_XS`"
)


@dataclass(frozen=True)
class GGUFExport:
    """What `export_gguf` wrote."""

    path: Path
    modelfile: Path | None
    quant: str
    n_tensors: int
    size_bytes: int
    chat_format: str | None

    def summary(self) -> str:
        size = f"{self.size_bytes / 2**20:.1f} MiB"
        extra = f"; Ollama: ollama create NAME -f {self.modelfile}" if self.modelfile else ""
        return f"wrote {self.path} ({size}, {self.n_tensors} tensors, {self.quant}){extra}"


# ---------------------------------------------------------------------------------------------- checks


def check_quant(quant: str) -> str:
    """The --quant value, lower-cased, when adgen writes it (f16 / q8_0 itself, the k-quants through llama.cpp)."""
    q = str(quant).lower()
    if q not in QUANTS:
        raise AdgenError(
            f"--quant {quant}: not supported for GGUF export; use --quant f16 (default, near-lossless), "
            f"--quant q8_0 (half the size), or {' / '.join(LLAMA_QUANTIZE_TYPES)} (made by llama.cpp's "
            f"llama-quantize: `{BUILD_COMMAND}` builds it); {_OTHER_QUANTS_HINT}"
        )
    return q


def check_gguf_path(path: str | Path, *, overwrite: bool = False) -> Path:
    out = Path(path)
    if out.suffix != ".gguf":
        raise AdgenError(f"--gguf {out}: give a file name ending in .gguf (e.g. --gguf {out.with_suffix('.gguf')})")
    if out.is_dir():
        raise AdgenError(f"--gguf {out} is a directory: give a file name, e.g. --gguf {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise AdgenError(f"{out} exists: pass --overwrite to replace it, or choose another --gguf file")
    return out


def check_architecture(config) -> None:
    """Refuse (with what is supported) anything llama.cpp's llama graph would compute differently."""
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if model_type != "llama" or (archs and not set(archs) <= set(SUPPORTED_ARCHITECTURES)):
        what = ", ".join(archs) or str(model_type)
        raise AdgenError(
            f"GGUF export supports the llama architecture only ({', '.join(SUPPORTED_ARCHITECTURES)}: Llama-2/3, "
            f"SmolLM2, ...), and this model is {what} (model_type {model_type!r}). For other architectures, "
            "write the merged model with `adgen export -o DIR` and convert DIR with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    unsupported = []
    if getattr(config, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={config.hidden_act}")
    if getattr(config, "attention_bias", False):
        unsupported.append("attention_bias=True")
    if getattr(config, "mlp_bias", False):
        unsupported.append("mlp_bias=True")
    if rope_type(config) not in ("default", "linear", "llama3"):
        unsupported.append(f"rope scaling {rope_type(config)!r}")
    if unsupported:
        raise AdgenError(
            f"GGUF export covers plain Llama models; this one has {', '.join(unsupported)}. Convert the merged "
            "model (`adgen export -o DIR`) with llama.cpp's convert_hf_to_gguf.py instead"
        )


def preflight(out_path: str | Path, *, quant: str = "f16", overwrite: bool = False, base_model: str | None = None) -> Path:
    """Cheap checks before any merging: quant name (and llama-quantize where it needs it), output path, and the
    base model's architecture."""
    if check_quant(quant) in LLAMA_QUANTIZE_TYPES:
        find_tool("llama-quantize")
    out = check_gguf_path(out_path, overwrite=overwrite)
    if base_model:
        resolved = resolve_model(base_model)
        cfg_file = Path(resolved.path) / "config.json" if resolved.kind != "hub" else None
        if cfg_file is not None and cfg_file.is_file():
            check_architecture(SimpleNamespace(**json.loads(cfg_file.read_text(encoding="utf-8"))))
    return out


# ----------------------------------------------------------------------------------------------- loading


def load_for_gguf(
    model: str | None,
    adapter: str | Path | None = None,
    *,
    work_dir: str | Path,
    merged_dir: str | Path | None = None,
    trust_remote_code: bool = False,
):
    """The fp32 model (with `adapter` merged in) and its tokenizer, ready for `export_gguf`.

    Merging is `adgen.export.merge_adapter` itself (fp32, into a temporary directory under `work_dir`
    that is removed afterwards). `merged_dir`, an fp32 directory that `merge_adapter` just wrote
    (`adgen export -o DIR --gguf F`), is loaded directly instead of merging twice.
    """
    def _load(spec: str):
        resolved = resolve_model(spec)
        tok = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        return load_model(resolved, dtype="fp32", device="cpu", trust_remote_code=trust_remote_code), tok

    if merged_dir is not None and stored_dtype(Path(merged_dir)) == "float32":
        return _load(str(merged_dir))
    if adapter is None:
        if not model:
            raise AdgenError("nothing to export: pass --model (and --adapter to merge one in)")
        return _load(model)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adgen-gguf-merge-", dir=work_dir))
    try:
        merged = merge_adapter(adapter, tmp / "merged", model=model, dtype="fp32", trust_remote_code=trust_remote_code)
        return _load(str(merged))  # weights are read into memory, so the directory can go
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- export


def _add_metadata(writer, model, tokenizer, quant: Quant, chat_template: Any, name: str | None) -> None:
    import gguf  # llama.cpp's writer: imported where a GGUF file is written (as in gguf_tensors.py)

    config = model.config
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    params = rope_params(config)
    vocab_size = int(config.vocab_size)

    writer.add_type("model")
    if name:
        writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    if head_dim * n_head != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope_type(config) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer_metadata(writer, tokenizer, vocab_size, chat_template)


def _write_gguf(path: Path, model, tokenizer, quant: Quant, chat_template: Any, name: str, progress: bool) -> int:
    """Write the GGUF file at `path` (f16 or q8_0, streaming one tensor at a time); returns the tensor count."""
    import gguf  # llama.cpp's writer: imported where a GGUF file is written (as in gguf_tensors.py)

    plans = plan_tensors(model, quant)
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    writer = gguf.GGUFWriter(path, arch="llama")
    try:
        _add_metadata(writer, model, tokenizer, quant, chat_template, name)
        for plan in plans:
            shape, nbytes = tensor_nbytes(plan.shape, plan.qtype)
            is_block = plan.qtype not in (F32, F16)
            dtype = np.uint8 if is_block else (np.float32 if plan.qtype == F32 else np.float16)
            writer.add_tensor_info(plan.name, shape, np.dtype(dtype), nbytes, raw_dtype=plan.qtype if is_block else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in tqdm(plans, desc=f"GGUF {quant}", unit="tensor", disable=not progress):
            writer.write_tensor_data(encode_tensor(plan.load(), plan.qtype))
    finally:
        writer.close()
    return len(plans)


@contextmanager
def _temp_file_beside(path: Path, tag: str) -> Iterator[Path]:
    """A temporary file name in `path`'s folder (same disk as the result), removed when the block ends."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{tag}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def export_gguf(
    model,
    tokenizer,
    out_path: str | Path,
    quant: str = "f16",
    chat_template: Any = None,
    *,
    system_prompt: str | None = None,
    modelfile: bool = True,
    overwrite: bool = False,
    name: str | None = None,
    progress: bool = True,
) -> GGUFExport:
    """Write `model` (a LlamaForCausalLM, fp32 for best fidelity) and `tokenizer` to `out_path` as GGUF.

    quant: "f16" (2-D weights in float16) or "q8_0" (2-D weights in Q8_0), written here, 1-D tensors in F32; or
    "q4_k_m" / "q5_k_m" / "q6_k": an f16 file written to a temporary file beside `out_path`, then quantized by
    llama.cpp's llama-quantize (found by `adgen.export.llama_cpp.find_tool`) and deleted.
    chat_template: stored as tokenizer.chat_template (default: the tokenizer's own).
    system_prompt: the Modelfile's SYSTEM (default: adgen's built-in Chinese ad-copy prompt; "" for none).
    name: general.name in the file (default: the file name's stem).
    The file appears atomically (`adgen.io.atomic_output`: a temporary file in the same directory, fsynced,
    then renamed).
    """
    q = check_quant(quant)
    out = check_gguf_path(out_path, overwrite=overwrite)
    check_architecture(model.config)
    quantize_tool = find_tool("llama-quantize") if q in LLAMA_QUANTIZE_TYPES else None  # before any writing
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    if system_prompt is None:
        system_prompt = DEFAULT_SYSTEM_PROMPT

    with atomic_output(out) as tmp:
        if quantize_tool is None:
            n_tensors = _write_gguf(tmp, model, tokenizer, cast(Quant, q), chat_template, name or out.stem, progress)
        else:
            with _temp_file_beside(out, "f16") as f16:
                n_tensors = _write_gguf(f16, model, tokenizer, "f16", chat_template, name or out.stem, progress)
                quantize_gguf(f16, tmp, q, tool=quantize_tool)
    mf = write_modelfile(out, tokenizer, chat_template=chat_template, system_prompt=system_prompt) if modelfile else None
    return GGUFExport(path=out, modelfile=mf, quant=q, n_tensors=n_tensors, size_bytes=out.stat().st_size,
                      chat_format=detect_chat_format(tokenizer, chat_template))
