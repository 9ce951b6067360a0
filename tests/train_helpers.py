"""Shared pieces of the training tests: a fast tiny-model config and a metrics reader."""

from __future__ import annotations

import json
from pathlib import Path

from adgen.config import deep_merge


def tiny_overrides(model_dir, data, out, **over) -> dict:
    """Fast settings: 8 short AdGen examples (no system prompt, cut at 64 tokens), fp32, no dropout."""
    base = {
        "model": str(model_dir),
        "train_data": str(data),
        "output_dir": str(out),
        "max_samples": 8,
        "system_prompt": None,
        "max_length": 64,
        "batch_size": 2,
        "grad_accum": 1,
        "max_steps": 6,
        "lr": 5e-3,
        "warmup_steps": 0,
        "save_every": 0,
        "eval_every": 0,
        "precision": "fp32",
        "progress": False,
        "plot": False,
        "lora": {"dropout": 0.0, "target_modules": "all-linear"},
    }
    return deep_merge(base, over)


def tiny_config(model_dir, data, out, **over):
    from adgen.train.config import load_train_config

    return load_train_config(None, tiny_overrides(model_dir, data, out, **over))


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def eval_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r}
