"""A whole "fine-tuned" model made from a tiny base: the base's directory with its top layer's own weights changed,
as `adgen demo`'s top-layers fine-tune leaves it (no adapter), for serving it beside its base (`adgen serve --base`)."""

from __future__ import annotations

import shutil
from pathlib import Path


def build_tuned_copy(base_dir: Path, out_dir: Path, *, seed: int = 7, scale: float = 0.1) -> Path:
    """`out_dir`: `base_dir` (tokenizer, configs) with the top decoder layer's weights moved by random noise."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(base_dir, out_dir, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.model.layers[-1].parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(out_dir)
    return out_dir
