"""The evaluations during a run: the eval loss, generation metrics, best/ and early stopping.

`maybe_evaluate` runs what is due after a step; early stopping ends the run through the schedule
(`Schedule.stop_at`). The final evaluations are the trainer's `finish`, with the same functions.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from adgen.train import gen_eval, metrics_log
from adgen.train.artefacts import save_final
from adgen.train.collate import eval_batches

if TYPE_CHECKING:
    from torch import nn

    from adgen.train.state import Progress, TrainSetup


def eval_mode(module: nn.Module, *, keep_4bit_training: bool) -> None:
    """module.eval(), except bitsandbytes' 4-bit layers on CPU.

    bitsandbytes (0.50) repacks a CPU Linear4bit's weights into an inference-only layout the first time
    it runs in eval mode without grad, and from then on no gradient flows back through that layer:
    every LoRA / prefix weight before it silently stops training. Those layers have no dropout, so
    leaving their `training` flag set changes nothing else.
    """
    module.eval()
    if not keep_4bit_training:
        return
    try:
        import bitsandbytes as bnb  # optional extra (adgen[qlora])
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.training = True


def evaluate_loss(s: TrainSetup) -> float | None:
    """Token-weighted eval loss of the references over every process's share of the eval examples."""
    if not s.data.eval_examples:
        return None
    run, layout = s.run, s.net.layout
    eval_mode(s.opt.wrapped, keep_4bit_training=s.cfg.quantized and run.device.type == "cpu")
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for b in eval_batches(s.data.eval_examples, s.cfg.batch_size, layout.batching, layout.pad_id, run.rank,
                              run.world, layout.share_prefix):
            b = b.to(run.device)
            part, n = s.opt.eval_loss_module(b.input_ids, b.targets, b.position_ids, b.attention_mask,
                                             **b.varlen_kwargs())
            loss_sum += float(part)
            count += n
    s.opt.wrapped.train()
    loss_sum, count = run.sum_over_processes([loss_sum, count])
    return loss_sum / max(count, 1)


def log_eval_loss(s: TrainSetup, progress: Progress, step: int) -> None:
    """The eval loss at `step`, as a metrics row and `progress.last_eval`."""
    progress.last_eval = evaluate_loss(s)
    metrics_log.append_row(s.run, progress.metrics, {"step": step, "eval_loss": progress.last_eval})


def gen_evaluate(s: TrainSetup, progress: Progress, step: int) -> None:
    """Generation metrics on the first eval records (every process generates: the same greedy text,
    so each one takes the same best / early-stopping decision)."""
    vocab = s.data.vocab  # built once, before the clock starts
    t = time.perf_counter()
    figures = gen_eval.generation_metrics(s.net.model, s.data.tokenizer, s.data.formatter, s.data.gen_records, vocab,
                                          max_new_tokens=s.cfg.gen_max_new_tokens)  # puts the model back in train mode
    row = {"step": step, "gen_eval": figures, "gen_eval_s": round(time.perf_counter() - t, 1)}
    metrics_log.append_row(s.run, progress.metrics, row)
    s.run.say(f"[adgen] step {step}: generation on {figures['n']} eval records: ROUGE-1 {figures['rouge-1']:.2f} "
              f"BLEU-4 {figures['bleu-4']:.2f} coverage {figures['attr_coverage'] or 0:.2f} "
              f"ended {figures['ended_share']:.0%} never stopped {figures['never_stopped_share']:.0%} "
              f"repetition {figures['repetition_rate']:.2f}")


def track_best(s: TrainSetup, progress: Progress, step: int) -> bool:
    """Save best/ when `step` is the best evaluation so far; True when early stopping ends the run."""
    cfg, run = s.cfg, s.run
    if not cfg.best_metric:
        return False
    best_step, best, since = gen_eval.best_so_far(progress.metrics, cfg.best_metric)
    if best_step == step:
        save_final(run.accelerator, cfg, run.out, s.net.model, s.opt.wrapped, s.data.tokenizer, name="best")
        run.say(f"[adgen] step {step}: new best {cfg.best_metric} {best:.4f} -> {run.out / 'best'}")
    return bool(cfg.early_stopping_patience) and since >= cfg.early_stopping_patience


def maybe_evaluate(s: TrainSetup, progress: Progress) -> None:
    """The loss / generation evaluations due at this step, best/, and early stopping (ends the schedule)."""
    cfg, step, schedule = s.cfg, progress.step, s.opt.schedule
    evaluated = False
    if cfg.eval_every and step % cfg.eval_every == 0 and step != schedule.total_steps and s.data.eval_examples:
        log_eval_loss(s, progress, step)
        s.run.say(f"[adgen] step {step}: eval loss {progress.last_eval:.4f}")
        evaluated = True
    if cfg.gen_eval_every and step % cfg.gen_eval_every == 0 and step != schedule.total_steps and s.data.gen_records:
        gen_evaluate(s, progress, step)
        evaluated = True
    if evaluated and track_best(s, progress, step):
        progress.status = "early_stopped"
        s.run.say(f"[adgen] step {step}: early stopping, no better {cfg.best_metric} in "
                  f"{cfg.early_stopping_patience} evaluation(s); the best is in {s.run.out / 'best'}")
        schedule.stop_at(step)
