"""The training loop: `fit` takes optimizer steps until the schedule ends (its length, the time budget, or
early stopping), and after each one logs, evaluates what is due and checkpoints what is due.

A step's loss is the sum of token cross-entropies (DPO: pair losses) over every micro-batch of every process
divided by their total count (`Batch.num_targets`), so 1 process x batch 4 and 2 processes x batch 2 compute
the same step, and a resumed run the same steps as an uninterrupted one.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft.helpers import disable_input_dtype_casting
from tqdm.auto import tqdm

from adgen.errors import AdgenError
from adgen.io import atomic_write_json
from adgen.train import checkpoint as ckpt_mod
from adgen.train import memory, metrics_log
from adgen.train.collate import Batch
from adgen.train.evaluation import evaluate_loss, maybe_evaluate
from adgen.train.report import summary_base
from adgen.train.schedule import TimeBudget
from adgen.train.setup_stages import LOGITS_AT_FIRST_STEP, record_logits_decision
from adgen.train.state import LogWindow, TrainingDiverged

if TYPE_CHECKING:
    from adgen.train.state import Progress, TrainSetup


def make_batch(s: TrainSetup, idx: list[int]) -> Batch:
    """The micro-batch of training examples `idx`, collated by the objective."""
    return s.objective.collate(s.data.train_examples, idx, s.net.layout)


def lora_inputs_uncast(s: TrainSetup) -> AbstractContextManager:
    """Measured on the LoRA bench recipe (bf16, this Xeon; 8 interleaved forward+backward pairs of one batch): median
    4.92 -> 4.83 s, best 4.64 -> 4.43 s. Only inside the training forward, which always runs under autocast."""
    if not s.net.lora_inputs_uncast:
        return nullcontext()
    return disable_input_dtype_casting(s.net.model)


def train_step(s: TrainSetup, progress: Progress) -> dict[str, Any]:
    """Optimizer step `progress.step` over every micro-batch of every process; the figures the log needs."""
    cfg, run, opt, step = s.cfg, s.run, s.opt, progress.step
    accelerator, wrapped = run.accelerator, opt.wrapped
    t0 = time.perf_counter()
    batches = [make_batch(s, idx) for idx in opt.order.step_indices(step - 1, run.rank)]
    local = [sum(b.num_targets for b in batches), sum(b.num_tokens for b in batches),
             sum(b.num_padded for b in batches), sum(b.num_examples for b in batches)]
    n_targets, n_tokens, n_padded, n_examples = run.sum_over_processes(local) if run.world > 1 else local
    scale = run.world * cfg.grad_accum / max(n_targets, 1)
    loss_local = torch.zeros((), dtype=torch.float64, device=run.device)
    window = progress.window
    for b in batches:
        b = b.to(run.device)
        with accelerator.accumulate(wrapped), lora_inputs_uncast(s):
            loss_sum, _, *extra = wrapped(b.input_ids, b.targets, b.position_ids, b.attention_mask, **b.loss_kwargs())
            accelerator.backward(loss_sum * scale)
        loss_local += loss_sum.detach().double()
        for k, v in (extra[0] if extra else {}).items():  # the objective's own figures (DPO: rewards)
            window.stats[k] = window.stats.get(k, 0.0) + v
    loss = (run.sum_over_processes([float(loss_local)])[0] if run.world > 1 else float(loss_local)) / max(n_targets, 1)
    if not math.isfinite(loss):
        progress.status = "diverged"
        raise TrainingDiverged(
            f"the training loss became {loss} at step {step}; the run stopped without applying that update. "
            f"Last good checkpoint: {progress.last_checkpoint or 'none (no checkpoint was written yet)'}. "
            f"Try a lower lr (now {cfg.lr:g}), precision=bf16 or fp32 instead of fp16, max_grad_norm=1.0, "
            "or check the data; continue from the checkpoint with --resume"
        )
    grad_norm = None
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        gn = accelerator.clip_grad_norm_(opt.params, cfg.max_grad_norm)
        grad_norm = float(gn) if gn is not None else None
    lr_now = opt.schedule.lr
    opt.optimizer.step()
    opt.schedule.step_taken(skipped=opt.optimizer.step_was_skipped)
    opt.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    counters = progress.counters
    counters.tokens += int(n_tokens)
    counters.padded += int(n_padded)
    counters.examples += int(n_examples)
    counters.train_time += dt
    window.loss += loss * n_targets
    window.targets += n_targets
    return {"loss": loss, "grad_norm": grad_norm, "lr": lr_now, "tokens": n_tokens, "padded": n_padded,
            "tokens_per_s": n_tokens / dt if dt > 0 else 0.0}


def log_step(s: TrainSetup, progress: Progress, figures: dict[str, Any], bar: tqdm) -> None:
    """A metrics row every `log_every` steps (mean loss of the window), the progress bar always."""
    cfg, run, step, total = s.cfg, s.run, progress.step, s.opt.schedule.total_steps
    if step % cfg.log_every == 0 or step == total:
        window = progress.window
        row = {
            "step": step, "epoch": round(s.opt.order.epoch_at(step), 4),
            "loss": window.loss / max(window.targets, 1), "lr": figures["lr"],
            "grad_norm": figures["grad_norm"], "tokens": progress.counters.tokens,
            "tokens_per_s": round(figures["tokens_per_s"], 1),
            "padding": round(1 - figures["tokens"] / max(figures["padded"], 1), 4),
            "peak_mem_gb": round(memory.peak_memory_gb(run.device)[0], 3),
            "time": round(progress.counters.train_time, 2),
        }
        # DPO (this process's pairs): share where chosen beat rejected, mean reward margin
        row.update({k: round(v / max(window.targets / run.world, 1), 4) for k, v in window.stats.items()})
        metrics_log.append_row(run, progress.metrics, row)
        progress.window = LogWindow()
        if not cfg.progress:  # plain log lines instead of the bar (CI, log files)
            run.say(f"[adgen] step {step}/{total} loss {row['loss']:.4f} lr {figures['lr']:.2e} "
                    f"tokens/s {figures['tokens_per_s']:.0f} padding {100 * row['padding']:.1f}% "
                    f"peak mem {row['peak_mem_gb']:.2f} GiB")
    bar.set_postfix(loss=f"{figures['loss']:.4f}", lr=f"{figures['lr']:.2e}", tok_s=f"{figures['tokens_per_s']:.0f}",
                    refresh=False)
    bar.update(1)


def maybe_checkpoint(s: TrainSetup, progress: Progress) -> None:
    cfg, step = s.cfg, progress.step
    if cfg.save_every and (step % cfg.save_every == 0 or step == s.opt.schedule.total_steps):
        checkpoint_now(s, progress)


def checkpoint_now(s: TrainSetup, progress: Progress) -> None:
    cfg, run, opt, step = s.cfg, s.run, s.opt, progress.step
    state = progress.trainer_state(examples_per_step=opt.order.examples_per_step, world=run.world, config=asdict(cfg))
    path = ckpt_mod.save_checkpoint(
        run.accelerator, run.out, step, model=s.net.model, wrapped=opt.wrapped, optimizer=opt.optimizer,
        scheduler=opt.schedule.scheduler, trainer_state=state, keep=cfg.keep_checkpoints, is_peft=cfg.is_peft,
    )
    progress.last_checkpoint = str(path)


class TrainingStopped(AdgenError):
    """SIGTERM (the web UI's Stop, `kill PID`): the run checkpointed its last step and stopped; --resume continues."""


class StopSignal:
    """SIGTERM while `fit` runs sets a flag; the loop checkpoints after the current step and stops. Only a single
    process on its main thread: ranks of a launched run would stop at different steps (they keep the default)."""

    def __init__(self, run) -> None:
        self.requested = False
        self._previous = None
        if run.world == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def stop_cleanly(s: TrainSetup, progress: Progress) -> None:
    """After a stop signal: a checkpoint of this step (unless one was just written), the summary, then stop."""
    if progress.last_checkpoint is None or Path(progress.last_checkpoint).name != f"step-{progress.step}":
        checkpoint_now(s, progress)
    progress.status = "stopped"
    if s.run.main:
        summary = {**summary_base(s), "status": "stopped", "steps": progress.step,
                   "last_checkpoint": progress.last_checkpoint}
        atomic_write_json(s.run.out / "summary.json", summary)
    metrics_log.rewrite(s.run, progress.metrics)
    raise TrainingStopped(f"stopped on request (SIGTERM) at step {progress.step}; checkpoint {progress.last_checkpoint}. "
                          f"Continue with: adgen train --resume --output-dir {s.run.out}")


def fit(s: TrainSetup, progress: Progress) -> None:
    """Optimizer steps until the schedule (or the time budget, or early stopping) ends."""
    cfg, run, schedule = s.cfg, s.run, s.opt.schedule
    bar = tqdm(total=schedule.total_steps, initial=progress.start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (run.main and cfg.progress), file=sys.stderr)
    s.opt.wrapped.train()
    trim_heap = memory.heap_trimmer(run.device)
    if cfg.eval_on_start and progress.start_step == 0 and s.data.eval_examples:
        metrics_log.append_row(run, progress.metrics, {"step": 0, "eval_loss": evaluate_loss(s)})
        run.say(f"[adgen] step 0: eval loss {progress.metrics[-1]['eval_loss']:.4f}")
    budget = TimeBudget(cfg, schedule, progress.start_step)
    stop = StopSignal(run)
    try:
        while progress.step < schedule.total_steps:
            progress.step += 1
            figures = train_step(s, progress)
            if run.resolved.get("logits") == LOGITS_AT_FIRST_STEP:
                record_logits_decision(run, s.objective, s.opt.loss_module)
            trim_heap()
            if budget.after_step(progress.step):
                bar.total = schedule.total_steps
                run.say(f"[adgen] time budget {cfg.max_minutes:g} min: {schedule.total_steps} steps fit "
                        f"({s.opt.order.epoch_at(schedule.total_steps):.2f} epochs), warmup {schedule.warmup}")
            log_step(s, progress, figures, bar)
            maybe_evaluate(s, progress)
            maybe_checkpoint(s, progress)
            if stop.requested:
                bar.close()
                stop_cleanly(s, progress)
    except TrainingDiverged:
        bar.close()
        if run.main:
            summary = {**summary_base(s), "status": progress.status, "steps": progress.step - 1,
                       "last_checkpoint": progress.last_checkpoint}
            atomic_write_json(run.out / "summary.json", summary)
        metrics_log.rewrite(run, progress.metrics)
        raise
    finally:
        stop.restore()
    bar.close()
