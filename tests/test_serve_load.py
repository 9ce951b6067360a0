"""The load check (bench/serve_load.py) as a test: 32 concurrent streams against the tiny model,
through the real `adgen serve` process, none lost or mixed up, /health answering throughout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_32_concurrent_streams(tiny_llama3_dir):
    cmd = [sys.executable, str(REPO / "bench" / "serve_load.py"), "--requests", "32", "--max-tokens", "16",
           "--model", str(tiny_llama3_dir), "--timeout", "240", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["problems"] == [] and result["ok"], result
    assert proc.returncode == 0
    assert result["requests"] == result["completed"] == 32
    assert result["distinct_texts"] >= 16  # prompts differ, so a mix-up would show
    assert result["health_samples_during"] >= 1
    print(json.dumps(result, ensure_ascii=False))


def test_load_check_detects_a_mixed_up_stream():
    """The checker itself: a swapped text, a missing [DONE] and a failed /health are all reported."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import serve_load
    finally:
        sys.path.pop(0)
    contents = serve_load.prompts(3)
    assert len(set(contents)) == 3
    ref = {c: f"text-{i}" for i, c in enumerate(contents)}

    def res(content, text, done=True, rid=None):
        return {"content": content, "status": 200, "text": text, "ids": {rid or content}, "finish": "length",
                "done": done, "ttft": 0.1, "latency": 0.2, "completion_tokens": 4, "error": None}

    good = {"reference": ref, "results": [res(c, ref[c]) for c in contents], "wall": 1.0,
            "health": [(200, 0.01, 0)], "health_after": (200, {"active_generations": 0})}
    assert serve_load.check(good)[0] == []
    bad = dict(good, results=[res(contents[0], ref[contents[1]]), res(contents[1], ref[contents[1]], done=False),
                              res(contents[2], ref[contents[2]])], health=[(500, 0.01, None)])
    problems = serve_load.check(bad)[0]
    assert any("mixed up" in p for p in problems)
    assert any("incomplete" in p for p in problems)
    assert any("/health failed" in p for p in problems)
