"""The web UI's training runs without a browser: the form's checks, the job manager (one run at a time, stop /
resume, a crashed process), the trainer's clean stop on SIGTERM, and an adapter loaded into a running server.

The manager's tests run a stand-in for `adgen train` (FAKE_TRAINER: writes a metrics row every 50 ms, checkpoints
and exits on SIGTERM, crashes at step $FAKE_CRASH_AT) so they take seconds; the real trainer's SIGTERM path runs in-process
on the tiny model (test_sigterm_checkpoints_and_resume_continues), and end to end in tests/test_webui_training.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from adgen.errors import AdgenError, ConfigError, DataError
from adgen.serve.training_form import TrainForm, parse_extra
from adgen.serve.training_jobs import TrainingBusy, TrainingJobs
from browser_helpers import wait_for
from train_helpers import read_metrics, tiny_config

FAKE_TRAINER = r'''
import json, os, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--output-dir") + 1])
out.mkdir(parents=True, exist_ok=True)
extra = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
steps = int(extra.get("max_steps", 10**6))
ckpts = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")) if "--resume" in args else []
step = ckpts[-1] if ckpts else 0
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print(f"[adgen] 4 examples, 2 per step, {steps} steps (1.00 epochs)", flush=True)
while step < steps:
    if stop:
        (out / "checkpoints" / f"step-{step}").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text("{}")
        print(f"adgen: error: stopped on request (SIGTERM) at step {step}", flush=True)
        sys.exit(2)
    step += 1
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": 10.0 / step, "time": step * 0.05}) + "\n")
    print(f"[adgen] step {step}/{steps} loss {10.0 / step:.4f}", flush=True)
    if os.environ.get("FAKE_CRASH_AT") == str(step):
        raise RuntimeError("boom: the fake trainer crashed")
    time.sleep(0.05)
(out / "adapter").mkdir(exist_ok=True)
(out / "adapter" / "adapter_config.json").write_text("{}")
'''


@pytest.fixture()
def data_files(tmp_path, adgen_dev_path):
    lines = adgen_dev_path.read_text(encoding="utf-8").splitlines()
    good = tmp_path / "train.jsonl"
    good.write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + '{"content": "类型#裙"}\n', encoding="utf-8")  # no summary on line 2
    return good, bad


@pytest.fixture()
def fake_jobs(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER, encoding="utf-8")
    jobs = TrainingJobs(tmp_path / "ui-runs", command=[sys.executable, str(script)], stop_grace_s=20)
    yield jobs
    jobs.close(timeout=10)


def form(train_data, **kw) -> TrainForm:
    return TrainForm(**{"recipe": "smollm2-135m", "model": "smollm2-135m", "train_data": str(train_data), **kw})


def ended(jobs):
    """The latest run's status once its process has ended, else None."""
    st = jobs.status()
    return st if not st.active else None


def test_form_overrides_are_what_adgen_train_takes():
    f = form("data/x y.jsonl", method="dora", lora_r=4, lr=1e-3, max_steps=7, extra=parse_extra("a=1 # note\nb=2"))
    assert f.overrides() == ['model="smollm2-135m"', 'train_data="data/x y.jsonl"', "eval_data=null",
                             "gen_eval_every=0", "method=dora", "lora.r=4", "lr=0.001", "max_steps=7", "a=1", "b=2"]


def test_bad_data_and_settings_are_refused_before_anything_starts(fake_jobs, data_files, tmp_path):
    good, bad = data_files
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*summary"):
        fake_jobs.start(form(bad))
    with pytest.raises(DataError, match="no such file on the server"):
        fake_jobs.start(form(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="'lr' must be > 0"):
        fake_jobs.start(form(good, extra=("lr=-1",)))
    assert fake_jobs.status() is None and not (tmp_path / "ui-runs").exists()


@pytest.mark.slow  # spawns processes / loads a model
def test_one_run_at_a_time_stop_and_resume(fake_jobs, data_files):
    good, _ = data_files
    st, checked = fake_jobs.start(form(good, max_steps=400))
    assert len(checked) == 1 and checked[0].startswith("train data: 8 records, 8 distinct products")
    with pytest.raises(TrainingBusy, match="one run at a time"):
        fake_jobs.start(form(good))
    with pytest.raises(TrainingBusy):
        fake_jobs.resume()
    wait_for(lambda: fake_jobs.status().step >= 3)
    assert fake_jobs.status().state == "running" and fake_jobs.status().total_steps == 400
    fake_jobs.stop()
    st = wait_for(lambda: ended(fake_jobs))
    assert st.state == "stopped" and st.resumable and "Resume continues" in st.message
    stopped_at = st.step
    assert (Path(st.run_dir) / "checkpoints" / f"step-{stopped_at}").is_dir()

    fake_jobs.resume(max_steps=stopped_at + 3)
    st = wait_for(lambda: ended(fake_jobs))
    assert st.state == "completed"
    assert [r["step"] for r in st.metrics] == list(range(1, stopped_at + 4))  # continued from the checkpoint
    assert st.adapter_dir and not st.resumable
    job = json.loads((Path(st.run_dir).parent / "job.json").read_text())
    assert job["attempts"][-1]["argv"][:2] == ["train", "--resume"] and f"max_steps={stopped_at + 3}" in job["attempts"][-1]["argv"]


@pytest.mark.slow  # spawns processes / loads a model
def test_a_crash_or_kill_is_failed_with_the_log_and_the_next_start_runs(fake_jobs, data_files, monkeypatch):
    good, _ = data_files
    monkeypatch.setenv("FAKE_CRASH_AT", "3")
    fake_jobs.start(form(good))
    monkeypatch.delenv("FAKE_CRASH_AT")
    st = wait_for(lambda: ended(fake_jobs))
    assert st.state == "failed" and st.returncode == 1
    assert "boom: the fake trainer crashed" in st.log_tail and "exit code 1" in st.message

    fake_jobs.start(form(good, max_steps=10**5))
    pid = wait_for(lambda: fake_jobs.status().pid)
    wait_for(lambda: fake_jobs.status().step >= 2)
    os.killpg(pid, signal.SIGKILL)
    st = wait_for(lambda: ended(fake_jobs))
    assert st.state == "failed" and st.returncode == -signal.SIGKILL
    assert not st.resumable  # no checkpoint was written: nothing to continue from
    with pytest.raises(AdgenError, match="no checkpoint to continue from"):
        fake_jobs.resume()


@pytest.mark.slow  # spawns processes / loads a model
def test_a_run_cut_off_by_a_server_restart_shows_interrupted(fake_jobs, data_files, tmp_path):
    good, _ = data_files
    fake_jobs.start(form(good, max_steps=10**5))
    wait_for(lambda: fake_jobs.status().step >= 1)
    again = TrainingJobs(tmp_path / "ui-runs")  # a new server process reading the same state dir
    assert again.status().state == "interrupted"


@pytest.mark.slow  # spawns processes / loads a model
def test_sigterm_checkpoints_and_resume_continues(tiny_llama3_dir, data_files, tmp_path):
    """The trainer's own stop (adgen.train.loop.StopSignal): SIGTERM mid-run -> a checkpoint of that step, a
    "stopped" summary, TrainingStopped; --resume continues from it."""
    from adgen.train import train
    from adgen.train.loop import TrainingStopped

    good, _ = data_files
    out = tmp_path / "run"
    cfg = tiny_config(tiny_llama3_dir, good, out, max_steps=1000, save_every=0)

    def send_sigterm_after_two_steps():
        wait_for(lambda: len(read_metrics(out)) >= 2 if (out / "metrics.jsonl").exists() else False, timeout=120)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler is in place: fit() is running its steps

    handler_before = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=send_sigterm_after_two_steps, daemon=True)
    sender.start()
    with pytest.raises(TrainingStopped, match="stopped on request"):
        train(cfg)
    sender.join(5)
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["status"] == "stopped" and stopped_at >= 2
    assert (out / "checkpoints" / f"step-{stopped_at}" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handler is gone after the run

    resumed = train(tiny_config(tiny_llama3_dir, good, out, max_steps=stopped_at + 2, save_every=0), resume=True)
    assert resumed.status == "completed"
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, stopped_at + 3))


@pytest.mark.slow  # spawns processes / loads a model
def test_an_adapter_loads_while_a_request_runs(tiny_llama3_dir, tiny_llama3_lora_dir, tiny_llama3_lora_b_dir):
    """Loading waits for the running forward (ForwardGate); the running stream finishes; the new name answers
    with its own weights; a taken name is refused."""
    import asyncio

    from adgen.generation import load_generator
    from adgen.generation.config import DecodingConfig
    from adgen.serve.service import ServeState
    from adgen.serve.settings import ServeSettings

    settings = ServeSettings(model=str(tiny_llama3_dir), adapter=str(tiny_llama3_lora_dir))
    state = ServeState(load_generator(str(tiny_llama3_dir), adapter=str(tiny_llama3_lora_dir)), settings)
    config = DecodingConfig(max_new_tokens=48, loop_detection=False, end_after_chars=0)
    messages = state.adcopy_messages("类型#裙*颜色#黑色")

    async def scenario():
        before = (await state.scheduler.complete([messages], config))[0].text
        handle = state.scheduler.open_stream([messages], config)
        pieces = []

        async def read():
            async for kind, _i, payload in handle:
                pieces.append(payload.text if kind == "done" else payload)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0)
        with state.adapter_gate.lock:  # no forward can run while the gate is held
            calls = state.health()["model_forward_calls"]
            await asyncio.sleep(0.3)
            assert state.health()["model_forward_calls"] <= calls + 1  # at most the one it was in
        await asyncio.to_thread(state.add_adapter, "brand-b", str(tiny_llama3_lora_b_dir))
        await reader
        tuned_b = (await state.scheduler.complete([messages], config, use_adapter="brand-b"))[0].text
        return before, pieces[-1], tuned_b

    try:
        before, streamed, tuned_b = asyncio.run(scenario())
        assert streamed == before, "the request running while the adapter loaded changed"
        assert tuned_b != before and "brand-b" in state.model_ids()
        with pytest.raises(ConfigError, match="taken"):
            state.add_adapter("brand-b", str(tiny_llama3_lora_b_dir))
    finally:
        state.close()
