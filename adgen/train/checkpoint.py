"""Atomic, resumable checkpoints: `output_dir/checkpoints/step-N/`.

A checkpoint is written into `checkpoints/.step-N.tmp/` and renamed to `step-N` only when complete
(`trainer_state.json` is its last file), so a kill at any moment leaves either the previous
checkpoints or the new one, never half of one; leftover `.tmp` directories are removed on resume.

Contents:
    trainable.safetensors   every trainable parameter under its training-time name (what resume loads)
    adapter/                PEFT methods: the adapter in standard PEFT format (usable for eval as is)
    optimizer.pt            optimizer state (DDP: identical on every process, written once)
    scheduler.pt            LR scheduler state
    rng/rank-<r>.pt         python, numpy, torch (+ CUDA) RNG states of each process
    accelerate_state/       FSDP / DeepSpeed only: their sharded model + optimizer state
    trainer_state.json      step, data position, counters, metrics so far, config
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from adgen.errors import AdgenError
from adgen.io import atomic_write_json, replace_dir
from adgen.train.fsdp_cpu import full_state_dict, gather_trainable

STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass
class CheckpointInfo:
    path: Path
    step: int


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[CheckpointInfo]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append(CheckpointInfo(p, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(output_dir: str | Path) -> CheckpointInfo | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(output_dir: str | Path, resume: str | bool) -> CheckpointInfo:
    """`True`/"latest" -> newest checkpoint of output_dir; a path -> that checkpoint."""
    if resume in (True, "latest", "auto", ""):
        found = latest_checkpoint(output_dir)
        if found is None:
            raise AdgenError(
                f"--resume: no checkpoint in {checkpoints_dir(output_dir)} (checkpoints are written every "
                "save_every steps); start a new run without --resume"
            )
        return found
    path = Path(str(resume))
    m = STEP_RE.match(path.name)
    if not m or not (path / "trainer_state.json").is_file():
        raise AdgenError(f"--resume {path}: not a complete checkpoint directory (expected .../checkpoints/step-N)")
    return CheckpointInfo(path, int(m.group(1)))


def clean_partial(output_dir: str | Path) -> None:
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


# ---- RNG -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- save / load -----------------------------------------------------------------------------


def trainable_state(model) -> dict:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _gather_sharded_trainable(accelerator, model, wrapped, *, is_peft: bool) -> dict:
    """FSDP / DeepSpeed: the trainable weights whole (on the main process). PEFT gathers only those (an 8B
    model's full state dict is 16 GB, its LoRA adapter a few MB); full fine-tuning trains (nearly) every weight,
    so it takes accelerate's full state dict. A collective: every process calls it."""
    if is_peft:
        return gather_trainable(accelerator, model)
    state = full_state_dict(accelerator, wrapped)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.contiguous().cpu() for k, v in state.items() if k in names}


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    *,
    model,  # the unwrapped training model (PeftModel or transformers model)
    wrapped,  # what accelerator.prepare returned (for FSDP / DeepSpeed state)
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    keep: int,
    is_peft: bool,
) -> Path:
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    main = accelerator.is_main_process
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / "rng" / f"rank-{accelerator.process_index}.pt")
    if sharded:
        accelerator.save_state(str(tmp / "accelerate_state"))
        weights = _gather_sharded_trainable(accelerator, model, wrapped, is_peft=is_peft)
    if main:
        if not sharded:
            weights = trainable_state(model)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(weights, str(tmp / "trainable.safetensors"))
        if is_peft:  # sharded: from the gathered weights (the model's own are this process's shards)
            model.save_pretrained(str(tmp / "adapter"), **({"state_dict": weights} if sharded else {}))
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        atomic_write_json(tmp / "trainer_state.json", trainer_state)
        replace_dir(tmp, final)  # a previous attempt of the same step (e.g. resumed twice) is replaced
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt: CheckpointInfo, *, model, wrapped, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG; returns trainer_state."""
    path = ckpt.path
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    world = state.get("world_size", 1)
    if world != accelerator.num_processes:
        raise AdgenError(
            f"checkpoint {path} was written by {world} process(es), this run has {accelerator.num_processes}: "
            "resume with the same number of processes (the data order depends on it)"
        )
    if (path / "accelerate_state").is_dir():
        accelerator.load_state(str(path / "accelerate_state"))
    else:
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        unknown = [n for n in weights if n not in params]
        if missing or unknown:
            raise AdgenError(
                f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected {unknown[:3]}): "
                "resume with the same model, method and LoRA settings"
            )
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w.to(params[n].device, params[n].dtype))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    rng_file = path / "rng" / f"rank-{accelerator.process_index}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state
