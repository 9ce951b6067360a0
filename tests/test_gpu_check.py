"""bench/gpu_check.sh: its --dry mode (the GPU mode's code on a tiny model on CPU) runs and ends with the summary
line; the summary's bookkeeping (failed phases, skipped QLoRA, steady-state tokens/s) on its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402  (bench/ is not a package)

KEYS = ("gpu", "lora_tok_s", "baseline_tok_s", "lora_peak_gib", "plan_peak_gib", "qlora_tok_s", "gen_speedup",
        "serve_ttft_p95_s", "seeded_ok")


def _summary_line(text: str) -> dict:
    last = [line for line in text.splitlines() if line.strip()][-1]
    assert last.startswith("gpu_check: "), last
    return dict(item.split("=", 1) for item in last.removeprefix("gpu_check: ").split())


@pytest.mark.slow
def test_dry_mode_runs_every_phase_and_ends_with_the_summary_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = _summary_line(proc.stdout)
    assert set(KEYS) <= set(line) and list(line) == list(gpu_check.SUMMARY_KEYS)
    assert line["gpu"] == "cpu-dry"
    for key in ("lora_tok_s", "baseline_tok_s", "plan_peak_gib", "gen_tok_s", "generate_tok_s", "gen_speedup",
                "serve_ttft_p95_s"):
        assert float(line[key]) > 0, key
    assert line["lora_peak_gib"] == "n/a"  # no CUDA allocator on the CPU
    assert line["qlora_tok_s"] == line["qlora_plan_peak_gib"] == "skipped"
    assert "needs CUDA" in proc.stdout  # the reason QLoRA is skipped is printed
    assert line["serve_ok"] == line["seeded_ok"] == "True"
    saved = json.loads(out.read_text())
    assert saved["summary"]["lora_tok_s"] == float(line["lora_tok_s"])
    assert saved["results"]["lora"]["loss_finite"] and saved["results"]["lora_baseline"]["loss_finite"]
    assert saved["architecture"]["num_hidden_layers"] == 2 and saved["architecture"]["vocab_size"] == 128256


def test_a_failed_phase_is_reported_and_fails_the_run():
    results = {"lora": {"tok_s": 10.0, "peak_gib": 1.0, "plan_peak_gib": 1.1, "loss_finite": True},
               "lora_baseline": {"error": "RuntimeError: CUDA error"},
               "generation": {"engine": {"tok_s": 5.0}, "generate": {"tok_s": 2.5}, "speedup": 2.0},
               "serve": {"serve_ok": True, "ttft_p95_s": 0.1, "seeded_ok": True}}
    line = gpu_check.summary(results, "NVIDIA H100 80GB HBM3")
    assert line["gpu"] == "NVIDIA_H100_80GB_HBM3" and line["baseline_tok_s"] == "error"
    assert line["qlora_tok_s"] == "skipped" and line["gen_speedup"] == 2.0
    assert gpu_check.failed(results)
    del results["lora_baseline"]
    assert not gpu_check.failed(results)
    results["lora"]["loss_finite"] = False
    assert gpu_check.failed(results)


def test_tokens_per_second_leaves_the_first_step_out():
    # (seconds, cumulative tokens) at the end of steps 1..3: step 1 (warm-up) took 10 s
    assert gpu_check.steady_tokens_per_s([(10.0, 100.0), (11.0, 300.0), (12.0, 500.0)]) == 200.0
    assert gpu_check.steady_tokens_per_s([(10.0, 100.0)]) is None


def test_gpu_mode_without_cuda_says_to_use_dry(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--dry" in capsys.readouterr().err
