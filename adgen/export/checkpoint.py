"""What a model or adapter directory says about itself in its config files: the adapter's config, the
checkpoint's stored dtype and whether its weights are quantized. Read by the merge (merge.py) and by the
GGUF export (gguf.py)."""

from __future__ import annotations

import json
from pathlib import Path

from adgen.errors import ModelError


def read_adapter_config(adapter: str | Path) -> dict:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ModelError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def _model_config(model_path: str | Path) -> dict | None:
    cfg = Path(model_path) / "config.json"
    return json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else None


def quantization_method(model_path: str | Path) -> str | None:
    """The quantization method (bitsandbytes, gptq, awq) of a checkpoint stored quantized, else None."""
    qc = (_model_config(model_path) or {}).get("quantization_config")
    if not qc:
        return None
    if qc.get("load_in_4bit") or qc.get("load_in_8bit") or qc.get("quant_method") in ("bitsandbytes", "gptq", "awq"):
        return str(qc.get("quant_method") or "bitsandbytes")
    return None


def stored_dtype(model_path: str | Path) -> str | None:
    """The dtype config.json says the weights are stored in ("float32", "bfloat16", ...); None if it says none."""
    data = _model_config(model_path)
    if data is None:
        return None
    return data.get("dtype") or data.get("torch_dtype")
