"""Training runs started from the web UI: one at a time per server, each `adgen train` in its own process.

A run lives in `<state-dir>/ui-runs/<id>/`: `job.json` (the form, the commands, the state), `train.log` (the
process's stdout and stderr), `data/` (uploaded files) and `run/` (the trainer's own run directory: config.yaml,
metrics.jsonl, checkpoints/, adapter/). The process runs in its own process group, so a crash (or a kill -9) of the
training never reaches the server: the run shows "failed" with the log's tail. Stop sends SIGTERM, which the
training loop answers with a checkpoint of its current step (adgen.train.loop.StopSignal); resume is
`adgen train --resume` on the run directory (optionally with a new step count or time budget).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adgen.errors import AdgenError
from adgen.io import atomic_write_json
from adgen.serve.training_form import TrainForm, check_data, settings_config

log = logging.getLogger(__name__)

LOG_FILE = "train.log"
JOB_FILE = "job.json"
RUN_SUBDIR = "run"
ACTIVE = ("starting", "running", "stopping")
STOP_GRACE_S = 300.0  # a stop the trainer has not answered in this long (a long evaluation, a hang) is a kill
_STEP_LINE = re.compile(r"\[adgen\] step (\d+)/(\d+) loss")
_PLAN_LINE = re.compile(r"(\d+) steps (?:\(|fit)")


class TrainingBusy(AdgenError):
    """A second start (or resume) while a run is going: one run at a time per server."""


@dataclass
class RunStatus:
    """What the page shows of one run."""

    run_id: str
    state: str  # starting | running | stopping | stopped | completed | failed | interrupted
    step: int = 0
    total_steps: int | None = None
    started: float = 0.0  # wall clock of this attempt's start
    ended: float | None = None
    train_time_s: float | None = None  # the trainer's own training time, resumes included
    returncode: int | None = None
    message: str = ""
    log_tail: str = ""
    resumable: bool = False
    adapter_dir: str | None = None  # the trained adapter of a completed LoRA-type run
    pid: int | None = None  # the training process (its process group's id), while it runs
    run_dir: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def elapsed_s(self) -> float:
        return (self.ended or time.time()) - self.started if self.started else 0.0


@dataclass
class _Job:
    run_id: str
    root: Path
    form: dict[str, Any]
    state: str = "starting"
    attempts: list[dict[str, Any]] = field(default_factory=list)  # {"argv", "started", "ended", "returncode"}
    stop_requested: bool = False
    proc: subprocess.Popen | None = None

    @property
    def run_dir(self) -> Path:
        return self.root / RUN_SUBDIR

    def save(self) -> None:
        atomic_write_json(self.root / JOB_FILE, {"run_id": self.run_id, "form": self.form, "state": self.state,
                                                 "attempts": self.attempts, "stop_requested": self.stop_requested})


class TrainingJobs:
    """The server's training runs (under `root`); at most one process at a time."""

    def __init__(self, root: str | Path, *, command: list[str] | None = None, cwd: str | Path | None = None,
                 stop_grace_s: float = STOP_GRACE_S) -> None:
        """`command`: what runs `adgen` (default: this Python's `-m adgen`)."""
        self.root = Path(root)
        self.command = list(command or [sys.executable, "-m", "adgen"])
        self.cwd = str(cwd or os.getcwd())  # relative paths in recipes resolve as they would for `adgen train`
        self.stop_grace_s = stop_grace_s
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._load_previous()

    # ---- starting -----------------------------------------------------------------------------------
    def check(self, form: TrainForm) -> list[str]:
        """The checks a start makes, without starting: one line per data file. Raises DataError / ConfigError."""
        lines = [check_data(form.train_data, "train data")]
        if form.eval_data:
            lines.append(check_data(form.eval_data, "eval data"))
        settings_config(form, self.root / "check" / RUN_SUBDIR)
        return lines

    def start(self, form: TrainForm, uploads: dict[str, str] | None = None) -> tuple[RunStatus, list[str]]:
        """Check the data and settings, then launch `adgen train`: (the run, the data check's lines). `uploads`:
        {"train_data" / "eval_data": the uploaded file}, copied into the run and used instead of the form's paths."""
        with self._lock:
            self._refuse_if_busy()
            run_id = self._new_id()
            root = self.root / run_id
            staged = dict(uploads or {})
            form = _with_paths(form, {k: str(Path(v).resolve()) for k, v in staged.items()},
                               resolve_from=self.cwd)
            checked = self.check(form)  # raises: nothing is created for a refused form
            root.mkdir(parents=True)
            copied = {}
            for key, src in staged.items():
                dest = root / "data" / f"{key.removesuffix('_data')}{Path(src).suffix or '.jsonl'}"
                dest.parent.mkdir(exist_ok=True)
                shutil.copyfile(src, dest)
                copied[key] = str(dest)
            form = _with_paths(form, copied)
            job = _Job(run_id, root, asdict(form))
            argv = [*self.command, "train", "--config", form.recipe, *form.overrides(),
                    "--output-dir", str(job.run_dir), "--no-progress"]
            self._launch(job, argv)
            self._jobs[run_id] = job
            return self._status(job), checked

    def resume(self, run_id: str | None = None, *, max_steps: int | None = None,
               max_minutes: float | None = None) -> RunStatus:
        """`adgen train --resume` on a stopped / failed / interrupted run (the latest by default)."""
        with self._lock:
            self._refuse_if_busy()
            job = self._jobs.get(run_id) if run_id else self._latest()
            if job is None:
                raise AdgenError(f"no training run {run_id or ''} to resume; start one first".replace("  ", " "))
            status = self._status(job)
            if not status.resumable:
                raise AdgenError(f"run {job.run_id} is {status.state} and has no checkpoint to continue from; "
                                 "start a new run")
            argv = [*self.command, "train", "--resume", "--output-dir", str(job.run_dir), "--no-progress"]
            argv += [f"max_steps={int(max_steps)}"] if max_steps else []
            argv += [f"max_minutes={float(max_minutes)!r}"] if max_minutes else []
            job.stop_requested = False
            self._launch(job, argv)
            return self._status(job)

    def _launch(self, job: _Job, argv: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(job.root / LOG_FILE, "ab") as out:
            out.write(f"\n$ adgen {' '.join(argv[len(self.command):])}\n".encode())
            out.flush()
            # its own session (process group): a signal to the server never reaches it, a stop reaches it all
            job.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.cwd, env=env, start_new_session=True)
        job.state = "starting"
        job.attempts.append({"argv": argv[len(self.command):], "started": time.time(), "ended": None, "returncode": None,
                             "pid": job.proc.pid})
        job.save()
        threading.Thread(target=self._watch, args=(job, job.proc), name=f"adgen-train-{job.run_id}",
                         daemon=True).start()

    def _watch(self, job: _Job, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        with self._lock:
            job.attempts[-1].update(ended=time.time(), returncode=rc)
            if job.stop_requested:
                job.state = "stopped"
            else:
                job.state = "completed" if rc == 0 else "failed"
            job.proc = None
            job.save()

    # ---- stopping -----------------------------------------------------------------------------------
    def stop(self) -> RunStatus | None:
        """SIGTERM to the running training: it checkpoints its current step and exits (then: "stopped")."""
        with self._lock:
            job = self._running()
            if job is None:
                return None
            job.stop_requested = True
            job.state = "stopping"
            job.save()
            _signal_group(job.proc, signal.SIGTERM)
            proc = job.proc
        kill = threading.Timer(self.stop_grace_s, _signal_group, args=(proc, signal.SIGKILL))
        kill.daemon = True
        kill.start()
        return self.status(job.run_id)

    def close(self, timeout: float = 30.0) -> None:
        """The server is going down: stop the running training (it keeps a checkpoint to resume from)."""
        job = self._running()
        if job is None or job.proc is None:
            return
        proc = job.proc
        self.stop()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)

    # ---- reading ------------------------------------------------------------------------------------
    def status(self, run_id: str | None = None) -> RunStatus | None:
        """The run `run_id`, else the running one, else the latest; None before the first run."""
        with self._lock:
            job = self._jobs.get(run_id) if run_id else (self._running() or self._latest())
            return self._status(job) if job is not None else None

    def form_of(self, run_id: str) -> dict[str, Any]:
        """The settings run `run_id` was started with (TrainForm's fields; data paths as the run read them)."""
        with self._lock:
            return dict(self._jobs[run_id].form)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running() is not None

    def run_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._jobs, reverse=True)

    def _status(self, job: _Job) -> RunStatus:
        metrics = read_metrics(job.run_dir / "metrics.jsonl")
        tail = log_tail(job.root / LOG_FILE)
        attempt = job.attempts[-1] if job.attempts else {}
        st = RunStatus(job.run_id, job.state, started=attempt.get("started") or 0.0, ended=attempt.get("ended"),
                       returncode=attempt.get("returncode"), log_tail=tail, run_dir=str(job.run_dir), metrics=metrics,
                       pid=job.proc.pid if job.proc is not None else None)
        losses = [r for r in metrics if "loss" in r]
        if losses:
            st.step, st.train_time_s = losses[-1]["step"], losses[-1].get("time")
            if job.state == "starting":
                st.state = job.state = "running"
        st.total_steps = planned_steps(tail)
        has_checkpoint = any((job.run_dir / "checkpoints").glob("step-*/trainer_state.json"))
        st.resumable = not st.active and st.state != "completed" and has_checkpoint
        adapter = job.run_dir / "adapter"
        if st.state == "completed" and (adapter / "adapter_config.json").is_file():
            st.adapter_dir = str(adapter)
        st.message = _state_message(st, has_checkpoint)
        return st

    # ---- bookkeeping --------------------------------------------------------------------------------
    def _running(self) -> _Job | None:
        return next((j for j in self._jobs.values() if j.proc is not None), None)

    def _latest(self) -> _Job | None:
        return self._jobs[max(self._jobs)] if self._jobs else None

    def _refuse_if_busy(self) -> None:
        running = self._running()
        if running is not None:
            raise TrainingBusy(f"run {running.run_id} is still training: one run at a time on this server. "
                               "Stop it first, or wait until it ends")

    def _new_id(self) -> str:
        base = time.strftime("%Y%m%d-%H%M%S")
        run_id, n = base, 1
        while run_id in self._jobs or (self.root / run_id).exists():
            n += 1
            run_id = f"{base}-{n}"
        return run_id

    def _load_previous(self) -> None:
        """Runs of earlier server processes: one that was going when its server went away is "interrupted"."""
        if not self.root.is_dir():
            return
        for path in self.root.glob(f"*/{JOB_FILE}"):
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            job = _Job(saved["run_id"], path.parent, saved.get("form", {}), saved.get("state", "failed"),
                       saved.get("attempts", []), saved.get("stop_requested", False))
            if job.state in ACTIVE:
                job.state = "interrupted"
            self._jobs[job.run_id] = job


def _with_paths(form: TrainForm, paths: dict[str, str], resolve_from: str | None = None) -> TrainForm:
    """The form with `paths` for train_data / eval_data; the others made absolute against `resolve_from`."""
    values = asdict(form)
    for key in ("train_data", "eval_data"):
        if key in paths:
            values[key] = paths[key]
        elif resolve_from and values[key]:
            values[key] = str(Path(resolve_from, Path(values[key]).expanduser()))
    values["extra"] = tuple(values["extra"])
    return TrainForm(**values)


def _signal_group(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _state_message(st: RunStatus, has_checkpoint: bool) -> str:
    if st.state == "failed":
        return f"training failed (exit code {st.returncode}); the log's last lines are below"
    if st.state in ("stopped", "interrupted"):
        return ("stopped at its last checkpoint: Resume continues from there" if has_checkpoint
                else "stopped before its first checkpoint: start a new run")
    if st.state == "completed":
        return "finished" + ("" if st.adapter_dir else " (no LoRA adapter to load: a full fine-tune or prefixes)")
    return ""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a line the trainer is writing right now is left for the next read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def log_tail(path: Path, max_bytes: int = 6000, max_lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    text = text.replace("\r", "\n")  # progress bars redraw with CR
    return "\n".join(line for line in text.splitlines()[-max_lines:])


def planned_steps(tail: str) -> int | None:
    """The run's planned steps from its log: the last `step k/N` line, else the plan it announced."""
    steps = _STEP_LINE.findall(tail)
    if steps:
        return int(steps[-1][1])
    plans = _PLAN_LINE.findall(tail)
    return int(plans[-1]) if plans else None
