"""FSDP2 over gloo on 2 CPU processes (configs/accelerate/fsdp-cpu.yaml), LoRA and full fine-tuning: the same
loss curve as 1 process with the same global batch, sharded checkpoints, and a resume from one of them that
gives the same next steps as the uninterrupted run. Spawns processes: slow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import train_losses

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp-cpu.yaml"

pytestmark = pytest.mark.slow

METHODS = {
    "lora": ["lora.target_modules=all-linear", "lora.dropout=0.0", "lr=5e-3"],
    "full": ["--method", "full", "lr=1e-3"],
}


def _args(model_dir, data, out, method, *extra):
    return ["train", "--model", str(model_dir), "--train-data", str(data), "--output-dir", str(out),
            "--max-samples", "8", "--no-progress", "system_prompt=null", "max_length=64", "precision=fp32",
            "warmup_steps=0", "plot=false", "--max-steps", "4", *METHODS[method], *extra]


def _launch_fsdp(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_processes", "2", "--main_process_port", "0", "-m", "adgen", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_two_processes_match_one_and_resume_exactly(method, tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.cli import main

    # one process: 4 examples per step (2 x grad-accum 2)
    assert main(_args(tiny_llama3_dir, adgen_train_path, tmp_path / "one", method,
                      "--batch-size", "2", "--grad-accum", "2")) == 0
    # two FSDP processes: the same 4 examples per step (1 x grad-accum 2 x 2 processes), a checkpoint every 2 steps
    two = tmp_path / "two"
    fsdp_args = ["--batch-size", "1", "--grad-accum", "2", "save_every=2", "keep_checkpoints=5"]
    _launch_fsdp(_args(tiny_llama3_dir, adgen_train_path, two, method, *fsdp_args))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["status"] == "completed"

    one_loss, two_loss = train_losses(tmp_path / "one"), train_losses(two)
    assert sorted(one_loss) == sorted(two_loss) == [1, 2, 3, 4]
    assert one_loss[4] < one_loss[1]  # it trains
    for step in one_loss:
        assert two_loss[step] == pytest.approx(one_loss[step], rel=1e-4, abs=1e-4), (step, one_loss, two_loss)

    # the checkpoint is sharded (one torch.distributed.checkpoint file per process), not a DDP copy
    state = two / "checkpoints" / "step-2" / "accelerate_state"
    assert state.is_dir(), sorted(p.name for p in (two / "checkpoints" / "step-2").iterdir())
    assert len(list(state.rglob("__*_0.distcp"))) >= 2
    final = two / ("adapter" if method == "lora" else "model")
    assert (final / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")).is_file()

    # resume from the sharded step-2 checkpoint in a copy of the run: steps 3 and 4 again, the same losses
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    for name in ("summary.json", "adapter", "model"):
        p = resumed / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    _launch_fsdp(["train", "--output-dir", str(resumed), "--resume", str(resumed / "checkpoints" / "step-2"),
                  "--no-progress"])
    again = train_losses(resumed)
    assert sorted(again) == [1, 2, 3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(two_loss[step], rel=1e-6, abs=1e-6), (step, again, two_loss)
