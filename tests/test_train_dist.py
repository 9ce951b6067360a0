"""Training across processes: SIGKILL + resume, DDP over gloo, and a real SmolLM2 QLoRA smoke run.

These spawn processes (or load the real SmolLM2 weights), hence @pytest.mark.slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import read_metrics, train_losses

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _cli_args(model_dir, data, out, *extra):
    return [
        "train", "--model", str(model_dir), "--train-data", str(data), "--output-dir", str(out),
        "--max-samples", "8", "--no-progress", "system_prompt=null", "max_length=64", "precision=fp32",
        "lora.target_modules=all-linear", "lr=5e-3", "warmup_steps=0", "plot=false", *extra,
    ]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


KILL_SCRIPT = r"""
import os, signal, sys
from adgen.train import checkpoint as ck
original = ck.save_checkpoint
def save(accelerator, out, step, **kw):
    if step == 6:  # die in the middle of writing the step-6 checkpoint
        tmp = ck.checkpoints_dir(out) / ".step-6.tmp"
        tmp.mkdir(parents=True)
        (tmp / "optimizer.pt").write_bytes(b"half written")
        os.kill(os.getpid(), signal.SIGKILL)
    return original(accelerator, out, step, **kw)
ck.save_checkpoint = save
from adgen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_equals_uninterrupted(tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.cli import main

    extra = ["--max-steps", "8", "save_every=2", "keep_checkpoints=3", "lora.dropout=0.1"]
    assert main(_cli_args(tiny_llama3_dir, adgen_train_path, tmp_path / "a", *extra)) == 0

    b = tmp_path / "b"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *_cli_args(tiny_llama3_dir, adgen_train_path, b, *extra)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # really SIGKILLed
    assert (b / "checkpoints" / ".step-6.tmp").is_dir() and not (b / "summary.json").exists()
    assert sorted(p.name for p in (b / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-2", "step-4"]

    # `--resume` without --config reuses the run's own config.yaml
    assert main(["train", "--output-dir", str(b), "--resume", "--no-progress"]) == 0
    assert not (b / "checkpoints" / ".step-6.tmp").exists()
    a_loss, b_loss = train_losses(tmp_path / "a"), train_losses(b)
    assert sorted(b_loss) == list(range(1, 9))
    for step, value in a_loss.items():
        assert b_loss[step] == pytest.approx(value, abs=1e-5), step
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_ddp_two_gloo_processes_match_one_process(tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.cli import main

    steps = ["--max-steps", "6", "lora.dropout=0.0"]
    # one process: 4 examples per step (2 x grad-accum 2)
    assert main(_cli_args(tiny_llama3_dir, adgen_train_path, tmp_path / "one", *steps,
                          "--batch-size", "2", "--grad-accum", "2")) == 0
    # two processes: the same 4 examples per step (1 x grad-accum 2 x 2 processes)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "adgen",
           *_cli_args(tiny_llama3_dir, adgen_train_path, tmp_path / "two", *steps, "--batch-size", "1",
                      "--grad-accum", "2")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    assert one[6] < one[1]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), (step, one, two)
    tokens = [r["tokens"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert tokens == [r["tokens"] for r in read_metrics(tmp_path / "one") if "loss" in r]


def test_smollm2_qlora_smoke(smollm2_dir, adgen_train_path, tmp_path):
    """The real SmolLM2-135M in NF4 on CPU: two QLoRA steps through the command, adapter written."""
    pytest.importorskip("bitsandbytes")
    from adgen.cli import main

    out = tmp_path / "q"
    assert main([
        "train", "--model", "smollm2-135m", "--method", "qlora", "--train-data", str(adgen_train_path),
        "--output-dir", str(out), "--max-steps", "2", "--max-samples", "4", "--batch-size", "2",
        "--grad-accum", "1", "max_length=256", "--no-progress",
    ]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == "qlora"
    assert all(0 < r["loss"] < 20 for r in read_metrics(out) if "loss" in r)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
