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
* norms (and every 1-D tensor) stay F32; 2-D weights are F16, or Q8_0 with `quant="q8_0"`;
* the tokenizer is stored as `tokenizer.ggml.model = "gpt2"` with the token list, token types,
  merges, special ids, the pre-tokenizer name llama.cpp uses to split text, and the chat template.

The Modelfile is `<stem>.Modelfile` beside `<stem>.gguf` (so several exports can share a folder):
`ollama create NAME -f <stem>.Modelfile`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from adgen.errors import AdgenError
from adgen.export import _stored_dtype

log = logging.getLogger(__name__)

Quant = Literal["f16", "q8_0"]
QUANTS: tuple[str, ...] = ("f16", "q8_0")
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM",)
ChatFormat = Literal["llama3", "chatml"]

_OTHER_QUANTS_HINT = (
    "for other llama.cpp types (Q4_K_M, Q5_K_M, ...) export f16 and run llama.cpp's "
    "`llama-quantize out.gguf out-q4_k_m.gguf Q4_K_M`"
)

# Hugging Face name (inside model.layers.N.) -> llama.cpp name (inside blk.N.)
_LAYER_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# How llama.cpp splits text before BPE ("tokenizer.ggml.pre"), for the byte-level tokenizers of llama
# models. The model's own tokenizer is compared with each on a probe text; the first that reproduces
# its ids exactly is written. Regexes: Llama-3's split (llama.cpp "llama-bpe"), GPT-2's (built into
# ByteLevel), and SmolLM's (single digits, then GPT-2's).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PROBE_TEXT = (
    "Hello World! It's 2024; we'll ship 12345 units at 3.14159 USD... I'M sure they'VE paid.\n\n"
    "类型#裙*颜色#白色*风格#简约*图案#条纹 这款连衣裙采用100%纯棉面料，穿着舒适透气！\n"
    "  indented\tline\r\n    x = [1, 22, 333, 4444] -> ok  🙂🙂 ÀÉÎ naïve\n\n\n end  "
)


def _pre_tokenizer_candidates() -> list[tuple[str, Callable[[], Any]]]:
    from tokenizers import Regex, pre_tokenizers

    return [
        ("llama-bpe", lambda: pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])),
        ("smollm", lambda: pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])),
        ("gpt-2", lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    ]


# Chat formats an Ollama TEMPLATE is written for (Go text/template syntax), and their stop strings.
_OLLAMA_TEMPLATES: dict[str, str] = {
    "llama3": (
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatml": "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
}
_STOP_TOKENS: dict[str, tuple[str, ...]] = {
    "llama3": ("<|eot_id|>", "<|end_of_text|>"),
    "chatml": ("<|im_end|>",),
}
_END_OF_TURN: dict[str, str] = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
_TURN_START: dict[str, str] = {"llama3": "<|start_header_id|>", "chatml": "<|im_start|>"}


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


def check_quant(quant: str) -> Quant:
    q = str(quant).lower()
    if q not in QUANTS:
        raise AdgenError(
            f"--quant {quant}: not supported for GGUF export; use --quant f16 (default, near-lossless) or "
            f"--quant q8_0 (half the size); {_OTHER_QUANTS_HINT}"
        )
    return q  # type: ignore[return-value]


def check_gguf_path(path: str | Path, *, overwrite: bool = False) -> Path:
    out = Path(path)
    if out.suffix != ".gguf":
        raise AdgenError(f"--gguf {out}: give a file name ending in .gguf (e.g. --gguf {out.with_suffix('.gguf')})")
    if out.is_dir():
        raise AdgenError(f"--gguf {out} is a directory: give a file name, e.g. --gguf {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise AdgenError(f"{out} exists: pass --overwrite to replace it, or choose another --gguf file")
    return out


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type") or params.get("type") or "default")


def _rope_params(config) -> dict:
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.update(getattr(config, "rope_parameters", None) or {})
    return params


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
    if _rope_type(config) not in ("default", "linear", "llama3"):
        unsupported.append(f"rope scaling {_rope_type(config)!r}")
    if unsupported:
        raise AdgenError(
            f"GGUF export covers plain Llama models; this one has {', '.join(unsupported)}. Convert the merged "
            "model (`adgen export -o DIR`) with llama.cpp's convert_hf_to_gguf.py instead"
        )


def preflight(out_path: str | Path, *, quant: str = "f16", overwrite: bool = False, base_model: str | None = None) -> Path:
    """Cheap checks before any merging: quant name, output path, and the base model's architecture."""
    check_quant(quant)
    out = check_gguf_path(out_path, overwrite=overwrite)
    if base_model:
        from adgen.models import resolve_model

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
    from adgen.export import merge_adapter
    from adgen.models import load_model, load_tokenizer, resolve_model

    def _load(spec: str):
        resolved = resolve_model(spec)
        tok = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
        return load_model(resolved, dtype="fp32", device="cpu", trust_remote_code=trust_remote_code), tok

    if merged_dir is not None and _stored_dtype(Path(merged_dir)) == "float32":
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


# ---------------------------------------------------------------------------------------------- tokenizer


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AdgenError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json; this one is slow-only")
    return json.loads(backend.to_str())


def _merges(tok_json: dict) -> list[str]:
    model = tok_json.get("model") or {}
    decoder = json.dumps(tok_json.get("decoder"))
    if model.get("type") != "BPE" or "ByteLevel" not in decoder:
        raise AdgenError(
            f"GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2', as Llama-3 and SmolLM2 "
            f"use); this tokenizer is {model.get('type')} with decoder {decoder[:80]}"
        )
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def detect_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text (tokenizer.ggml.pre), found by trying each."""
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    want = backend.encode(_PROBE_TEXT, add_special_tokens=False).ids
    serialized = backend.to_str()
    names = []
    for name, make in _pre_tokenizer_candidates():
        trial = Tokenizer.from_str(serialized)
        trial.pre_tokenizer = make()
        if trial.encode(_PROBE_TEXT, add_special_tokens=False).ids == want:
            return name
        names.append(name)
    raise AdgenError(
        f"this tokenizer splits text like none of llama.cpp's pre-tokenizers adgen knows ({', '.join(names)}), so "
        "llama.cpp would tokenize differently from training; convert the merged model (`adgen export -o DIR`) "
        "with llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers"
    )


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    from gguf import TokenType

    n_tok = len(tokenizer)
    if n_tok > vocab_size:
        raise AdgenError(
            f"the tokenizer has {n_tok} tokens but the model's embedding only {vocab_size} rows: tokenizer and "
            "model do not belong together"
        )
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    tokens: list[str] = []
    types: list[int] = []
    for i, piece in enumerate(pieces):
        if i in added:
            tokens.append(added[i].content)
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED))
        elif piece is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        else:
            tokens.append(piece)
            types.append(int(TokenType.NORMAL))
    for i in range(n_tok, vocab_size):  # embedding rows beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    return tokens, types


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS by itself (mirrored, so llama.cpp tokenizes like transformers)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and (not plain or plain[0] != bos)
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and (not plain or plain[-1] != eos)
    return add_bos, add_eos


def _template_text(chat_template: Any) -> str:
    if isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, dict):
        return "\n".join(str(v) for v in chat_template.values())
    if isinstance(chat_template, list):
        return "\n".join(str(c.get("template", "")) for c in chat_template)
    return ""


def detect_chat_format(tokenizer, chat_template: Any = None) -> ChatFormat | None:
    """'llama3' or 'chatml', from the chat template, else from the special tokens; None if neither."""
    text = _template_text(chat_template if chat_template is not None else tokenizer.chat_template)
    if "<|start_header_id|>" in text and "<|eot_id|>" in text:
        return "llama3"
    if "<|im_start|>" in text and "<|im_end|>" in text:
        return "chatml"
    if text:
        return None  # some other template: do not guess from the vocabulary
    vocab = tokenizer.get_vocab()
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    return None


# ------------------------------------------------------------------------------------------------ Modelfile


def _bos_in_template(tokenizer, chat_template: Any, fmt: ChatFormat) -> bool:
    """The chat template writes BOS before the first turn (Llama-3's does), and encoding adds none."""
    bos = tokenizer.bos_token
    if not bos or _adds_special(tokenizer)[0]:
        return False
    try:
        kwargs = {"chat_template": chat_template} if isinstance(chat_template, str) else {}
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    except Exception:  # noqa: BLE001 - no usable template: nothing to mirror
        return False
    # SmolLM2's "BOS" is <|im_start|>, the start of every turn: not a separate prefix.
    return isinstance(text, str) and text.startswith(bos) and not text.startswith(_TURN_START[fmt])


def modelfile_path(gguf_path: str | Path) -> Path:
    p = Path(gguf_path)
    return p.with_name(p.stem + ".Modelfile")


def modelfile_text(gguf_name: str, tokenizer, *, chat_template: Any = None, system_prompt: str | None = None) -> str:
    template = chat_template if chat_template is not None else tokenizer.chat_template
    fmt = detect_chat_format(tokenizer, template)
    lines = [
        "# Ollama Modelfile written by `adgen export --gguf`.",
        f"#   ollama create NAME -f {gguf_name.rsplit('.', 1)[0]}.Modelfile   (FROM is relative to this file)",
        f"FROM ./{gguf_name}",
    ]
    if fmt is not None:
        prefix = tokenizer.bos_token if _bos_in_template(tokenizer, template, fmt) else ""
        lines.append(f'TEMPLATE """{prefix}{_OLLAMA_TEMPLATES[fmt]}"""')
        vocab = tokenizer.get_vocab()
        stops = [s for s in _STOP_TOKENS[fmt] if s in vocab]
        if tokenizer.eos_token and tokenizer.eos_token not in stops:
            stops.append(tokenizer.eos_token)
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    else:
        lines.append("# No TEMPLATE: the chat format is neither Llama-3 nor ChatML; Ollama falls back to the")
        lines.append("# GGUF's tokenizer.chat_template. Add TEMPLATE / PARAMETER stop lines by hand if needed.")
    if system_prompt:
        if '"""' in system_prompt:
            raise AdgenError('the system prompt contains """, which an Ollama Modelfile cannot quote')
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"


def _default_mode() -> int:
    """What open() would give a new file (mkstemp makes 0600, which e.g. an `ollama` service user cannot read)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_modelfile(gguf_path: str | Path, tokenizer, *, chat_template: Any = None,
                    system_prompt: str | None = None) -> Path:
    gguf_path = Path(gguf_path)
    out = modelfile_path(gguf_path)
    _atomic_write_text(out, modelfile_text(gguf_path.name, tokenizer, chat_template=chat_template,
                                           system_prompt=system_prompt))
    return out


# ------------------------------------------------------------------------------------------------ tensors


def _rope_permute(w, n_head: int):
    """Rows of a q/k projection from HF's rotate-half order to llama.cpp's interleaved pairs, per head."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _llama3_rope_factors(config, head_dim: int):
    """Per-frequency divisors for Llama-3.1-style rope scaling (llama.cpp's rope_freqs.weight)."""
    import numpy as np

    p = _rope_params(config)
    base = float(p.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / head_dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


@dataclass
class _TensorPlan:
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[], Any]  # -> np.ndarray (float32), already permuted


def _gguf_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_TENSORS:
        return f"blk.{parts[2]}.{_LAYER_TENSORS[parts[3]]}"
    return None


def _plan_tensors(model, quant: Quant) -> list[_TensorPlan]:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    plans: list[_TensorPlan] = []
    unknown = []
    matrix_type = GGMLQuantizationType.Q8_0 if quant == "q8_0" else GGMLQuantizationType.F16
    block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]

    def order(hf_name: str) -> tuple:
        parts = hf_name.split(".")
        if hf_name == "model.embed_tokens.weight":
            return (0, 0, 0)
        if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
            rest = ".".join(parts[3:])
            return (1, int(parts[2]), list(_LAYER_TENSORS).index(rest) if rest in _LAYER_TENSORS else 99)
        return (2, 0, 0 if hf_name == "model.norm.weight" else 1)

    for hf_name in sorted(state, key=order):
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd.weight when output.weight is absent
        name = _gguf_name(hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        tensor = state[hf_name]
        shape = tuple(tensor.shape)
        if len(shape) == 1:
            qtype = GGMLQuantizationType.F32
        elif matrix_type == GGMLQuantizationType.Q8_0 and shape[-1] % block != 0:
            log.warning("%s: rows of %d values do not fill Q8_0 blocks of %d; writing it as F16", name, shape[-1], block)
            qtype = GGMLQuantizationType.F16
        else:
            qtype = matrix_type
        heads = n_head if name.endswith("attn_q.weight") else n_kv if name.endswith("attn_k.weight") else None

        def load(t=tensor, heads=heads):
            arr = t.detach().to("cpu").float().numpy()
            return np.ascontiguousarray(_rope_permute(arr, heads) if heads else arr)

        plans.append(_TensorPlan(name, shape, qtype, load))
    if unknown:
        raise AdgenError(
            f"GGUF export: the model has tensors a plain Llama has not ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}); convert the merged model with llama.cpp's convert_hf_to_gguf.py"
        )
    if _rope_type(config) == "llama3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
        factors = _llama3_rope_factors(config, head_dim)
        plans.append(_TensorPlan("rope_freqs.weight", factors.shape, GGMLQuantizationType.F32, lambda f=factors: f))
    return plans


def _encode(arr, qtype):
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return quantize(arr, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], int]:
    """(shape as the writer wants it, bytes) for a tensor of logical `shape` stored as `qtype`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    n = math.prod(shape)
    if qtype == GGMLQuantizationType.F32:
        return shape, 4 * n
    if qtype == GGMLQuantizationType.F16:
        return shape, 2 * n
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, math.prod(byte_shape)


# ------------------------------------------------------------------------------------------------- export


def _add_metadata(writer, model, tokenizer, quant: Quant, chat_template: Any, name: str | None) -> None:
    import gguf

    config = model.config
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    params = _rope_params(config)
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
    if _rope_type(config) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tok_json = _backend_json(tokenizer)
    merges = _merges(tok_json)
    tokens, types = _vocab(tokenizer, vocab_size)
    add_bos, add_eos = _adds_special(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(detect_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    fmt = detect_chat_format(tokenizer, chat_template)
    eot = tokenizer.get_vocab().get(_END_OF_TURN[fmt]) if fmt else None
    if eot is not None and eot != tokenizer.eos_token_id:
        writer.add_eot_token_id(int(eot))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(False)
    if isinstance(chat_template, dict):  # transformers' named templates -> llama.cpp's list form
        chat_template = [{"name": k, "template": v} for k, v in chat_template.items()]
    if chat_template:
        writer.add_chat_template(chat_template)


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

    quant: "f16" (2-D weights in float16) or "q8_0" (2-D weights in Q8_0); 1-D tensors stay F32.
    chat_template: stored as tokenizer.chat_template (default: the tokenizer's own).
    system_prompt: the Modelfile's SYSTEM (default: adgen's built-in Chinese ad-copy prompt; "" for none).
    name: general.name in the file (default: the file name's stem).
    The file appears atomically (a temporary file in the same directory, then os.replace).
    """
    import gguf
    import numpy as np
    from tqdm.auto import tqdm

    from adgen.data.chat import DEFAULT_SYSTEM_PROMPT

    q = check_quant(quant)
    out = check_gguf_path(out_path, overwrite=overwrite)
    check_architecture(model.config)
    if chat_template is None:
        chat_template = getattr(tokenizer, "chat_template", None)
    if system_prompt is None:
        system_prompt = DEFAULT_SYSTEM_PROMPT

    plans = _plan_tensors(model, q)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, arch="llama")
    try:
        _add_metadata(writer, model, tokenizer, q, chat_template, name or out.stem)
        for plan in plans:
            shape, nbytes = _nbytes(plan.shape, plan.qtype)
            is_block = plan.qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            dtype = np.uint8 if is_block else (np.float32 if plan.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(plan.name, shape, np.dtype(dtype), nbytes, raw_dtype=plan.qtype if is_block else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in tqdm(plans, desc=f"GGUF {q}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_encode(plan.load(), plan.qtype))
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    mf = write_modelfile(out, tokenizer, chat_template=chat_template, system_prompt=system_prompt) if modelfile else None
    return GGUFExport(path=out, modelfile=mf, quant=q, n_tensors=len(plans), size_bytes=out.stat().st_size,
                      chat_format=detect_chat_format(tokenizer, chat_template))
