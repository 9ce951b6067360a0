"""Experiment tracking (`report_to: [tensorboard | wandb | mlflow]`) through accelerate's trackers.

The trainer calls `accelerator_kwargs` (which trackers, where), `start` (the resolved config as
hyperparameters) and `log` (each metrics.jsonl row at its step); accelerate writes the files. Offline by
default: TensorBoard event files under <output_dir>/tracking, W&B in offline mode, MLflow in a local
<output_dir>/tracking/mlruns store, unless WANDB_MODE / MLFLOW_TRACKING_URI say otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict
from pathlib import Path

from adgen.errors import ConfigError
from adgen.train.config import TRACKER_PACKAGES, TrainConfig

PROJECT = "adgen"


def accelerator_kwargs(cfg: TrainConfig, out: Path) -> dict:
    if not cfg.report_to:
        return {}
    for name in cfg.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(f"report_to=[{name}] needs the {TRACKER_PACKAGES[name]} package: "
                              f"pip install {TRACKER_PACKAGES[name]} (or drop it from report_to)")
    logging_dir = out / "tracking"
    if "wandb" in cfg.report_to:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(logging_dir))
    if "mlflow" in cfg.report_to:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (logging_dir / "mlruns").resolve().as_uri())
    return {"log_with": list(cfg.report_to), "project_dir": str(logging_dir)}


def hyperparameters(cfg: TrainConfig) -> dict:
    """The config flattened to scalars (`lora.r`, lists as text): what trackers take as hyperparameters."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[prefix] = "" if value is None else value
        else:
            flat[prefix] = str(value)

    walk("", asdict(cfg))
    return flat


def start(accelerator, cfg: TrainConfig) -> None:
    if cfg.report_to:
        accelerator.init_trackers(PROJECT, config=hyperparameters(cfg))


def log(accelerator, cfg: TrainConfig, row: dict) -> None:
    """One metrics row (train loss, lr, tokens/s, memory; eval loss; generation metrics) at its step."""
    if not cfg.report_to:
        return
    values = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, dict):  # generation metrics: gen_eval/rouge-1, gen_eval/ended_share, ...
            values.update({f"{key}/{k}": v for k, v in value.items() if _number(v)})
        elif _number(value):
            values[key] = value
    if values:
        accelerator.log(values, step=int(row["step"]))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
