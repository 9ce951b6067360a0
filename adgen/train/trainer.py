"""A training run (SFT or DPO) on top of accelerate, top to bottom:

    train(cfg) = setup_run -> setup_data -> setup_model -> setup_optimization   (adgen.train.setup_stages)
                 -> restore_checkpoint -> announce -> fit                         (adgen.train.loop)
                 -> finish (final evaluations, the trained weights, loss.png, the summary)

The setup stages build typed pieces that never change afterwards (adgen.train.state: RunContext, TrainData,
ModelSetup, Optimization, together a TrainSetup); the loop changes only `Progress` (what a checkpoint saves)
and, through its public methods, the `Schedule`. What differs between SFT and DPO is the `Objective`, chosen
once (adgen.train.objective).

accelerate supplies the process group (DDP over gloo/NCCL, FSDP, DeepSpeed), device placement, mixed precision
and no-sync gradient accumulation; everything else (data order, packing, loss, checkpoints) is adgen's so that
it can be exact: 1 process x batch 4 and 2 processes x batch 2 compute the same steps, and a resumed run the
same steps as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from adgen.config import dict_diff
from adgen.io import atomic_write_json, atomic_write_text
from adgen.train import checkpoint as ckpt_mod
from adgen.train import metrics_log
from adgen.train.artefacts import save_final
from adgen.train.config import RESUME_MUTABLE_KEYS, TrainConfig
from adgen.train.evaluation import gen_evaluate, log_eval_loss, track_best
from adgen.train.loop import fit
from adgen.train.memory import release_memory
from adgen.train.objective import make_objective
from adgen.train.plots import plot_losses
from adgen.train.report import final_summary, summary_markdown
from adgen.train.setup_stages import setup_data, setup_model, setup_optimization, setup_run
from adgen.train.state import ModelSetup, Optimization, Progress, RunContext, TrainResult, TrainSetup

__all__ = ["TrainResult", "release_memory", "train"]


def train(cfg: TrainConfig, *, resume: str | bool | None = None, overwrite: bool = False) -> TrainResult:
    """Set up (processes, run directory, data, model, optimisation, resume), fit, finish."""
    cfg.validate()
    t_setup = time.perf_counter()
    run = setup_run(cfg, resume=resume, overwrite=overwrite)
    objective = make_objective(cfg)
    data = setup_data(run, objective)
    net = setup_model(run, data, objective)
    opt = setup_optimization(run, data, net, objective)
    progress = restore_checkpoint(run, net, opt)
    setup = TrainSetup(run, data, net, opt, objective)
    announce(setup, time.perf_counter() - t_setup)
    fit(setup, progress)
    result = finish(setup, progress)
    del setup, run, data, net, opt, objective  # the model, optimizer and accelerator go before the heap is trimmed
    release_memory()
    return result


def restore_checkpoint(run: RunContext, net: ModelSetup, opt: Optimization) -> Progress:
    """Resume: weights, optimizer, schedule, counters and metrics of the checkpoint; or a fresh start."""
    info = run.resume_from
    progress = Progress()
    if info is not None:
        state = ckpt_mod.load_checkpoint(run.accelerator, info, model=net.model, wrapped=opt.wrapped,
                                         optimizer=opt.optimizer, scheduler=opt.schedule.scheduler)
        progress = Progress.resumed(state, info.path)
        diff = dict_diff(state.get("config", {}), asdict(run.cfg), ignore=RESUME_MUTABLE_KEYS)
        if diff:
            run.say("[adgen] warning: the config differs from the checkpoint's; the result will differ from an "
                    "uninterrupted run: " + "; ".join(diff[:8]))
        run.say(f"[adgen] resumed from {info.path} at step {progress.start_step}/{opt.schedule.total_steps}")
    metrics_log.rewrite(run, progress.metrics)
    return progress


def announce(s: TrainSetup, setup_s: float) -> None:
    """The run's plan in one line."""
    cfg, order, schedule = s.cfg, s.opt.order, s.opt.schedule
    s.run.say(
        f"[adgen] {len(s.data.train_examples)} examples, {order.examples_per_step} per step "
        f"({cfg.batch_size} x {cfg.grad_accum} accum x {s.run.world} proc), {schedule.total_steps} steps "
        f"({order.epoch_at(schedule.total_steps):.2f} epochs), warmup {schedule.warmup}, setup {setup_s:.1f}s"
    )


def finish(s: TrainSetup, progress: Progress) -> TrainResult:
    """Final evaluations, the trained weights, loss.png, attribute_vocab.json and the summary."""
    cfg, run, total = s.cfg, s.run, s.opt.schedule.total_steps
    if progress.status != "early_stopped":  # (an early stop was decided on this step's evaluation)
        if s.data.eval_examples:
            log_eval_loss(s, progress, total)
        if s.data.gen_records:
            gen_evaluate(s, progress, total)
        track_best(s, progress, total)
    artefact = save_final(run.accelerator, cfg, run.out, s.net.model, s.opt.wrapped, s.data.tokenizer)
    summary = final_summary(s, progress, artefact)
    metrics_log.rewrite(run, progress.metrics)
    if run.main:
        if cfg.plot:
            plot_losses(progress.metrics, run.out / "loss.png", **s.objective.plot_labels(cfg))
        s.data.vocab.save(run.out / "attribute_vocab.json")
        atomic_write_text(run.out / "train_summary.md", summary_markdown(summary))
        atomic_write_json(run.out / "summary.json", summary)
    run.accelerator.wait_for_everyone()
    if run.world > 1 or cfg.report_to:
        run.accelerator.end_training()  # closes the trackers; destroys the process group
    return TrainResult(run.out, progress.status, total, summary, progress.metrics)
