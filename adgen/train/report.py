"""The run's summary: summary.json's fields (`summary_base`, `final_summary`), rendered once as train_summary.md
(`summary_markdown`) and once for the terminal by `adgen train` (`print_summary`, main process only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from adgen.train.gen_eval import best_so_far
from adgen.train.memory import peak_memory_gb
from adgen.train.run_dir import RUN_FILES

if TYPE_CHECKING:
    from adgen.train.config import TrainConfig
    from adgen.train.state import Progress, TrainSetup


def summary_base(s: TrainSetup) -> dict[str, Any]:
    """The summary fields known before the first step (and the steps the schedule now plans)."""
    cfg, run, data = s.cfg, s.run, s.data
    return {
        "output_dir": str(run.out), "model": cfg.model, "model_path": str(data.resolved_model.path),
        "method": cfg.method, "objective": cfg.objective, "precision": run.precision.name,
        "batching": s.net.layout.batching, "processes": run.world, "device": run.device.type,
        "trainable_parameters": run.resolved["trainable_parameters"], "total_parameters": run.resolved["total_parameters"],
        "train_examples": len(data.train_examples), "eval_examples": len(data.eval_examples),
        "truncated_examples": data.stats.truncated, "dropped_examples": data.stats.dropped,
        "total_steps": s.opt.schedule.total_steps, "notes": s.net.notes, "resolved": run.resolved,
    }


def final_summary(s: TrainSetup, progress: Progress, artefact: Path) -> dict[str, Any]:
    """summary.json of a run that ran to its end (completed or early-stopped)."""
    counters, out, metrics = progress.counters, s.run.out, progress.metrics
    total = s.opt.schedule.total_steps
    peak, peak_kind = peak_memory_gb(s.run.device)
    peak = max([peak] + [r.get("peak_mem_gb", 0.0) for r in metrics if "loss" in r])
    train_rows = [r for r in metrics if "loss" in r]
    return {
        **summary_base(s),
        "status": progress.status,
        "steps": total,
        "epochs": round(s.opt.order.epoch_at(total), 4),
        "train_time_s": round(counters.train_time, 1),
        "tokens": counters.tokens,
        "tokens_per_s": round(counters.tokens / max(counters.train_time, 1e-9), 1),
        "padding_share": round(1 - counters.tokens / max(counters.padded, 1), 4),
        "peak_memory_gb": round(peak, 3),
        "peak_memory_kind": peak_kind,
        "first_train_loss": train_rows[0]["loss"] if train_rows else None,
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "final_eval_loss": progress.last_eval,
        "artefact": str(artefact),
        "last_checkpoint": progress.last_checkpoint,
        **best_summary(s.cfg, metrics, out),
        "files": {k: str(out / k) for k in RUN_FILES if "." in k},
    }


def best_summary(cfg: TrainConfig, metrics: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """best_metric / best_step / best_value / best (the directory), and the last generation figures."""
    extra: dict[str, Any] = {}
    gen_rows = [r for r in metrics if "gen_eval" in r]
    if gen_rows:
        extra["final_gen_eval"] = {k: v for k, v in gen_rows[-1]["gen_eval"].items() if k != "example"}
    if cfg.best_metric:
        step, value, _ = best_so_far(metrics, cfg.best_metric)
        extra.update(best_metric=cfg.best_metric, best_step=step, best_value=value,
                     best=str(out / "best") if (out / "best").is_dir() else None)
    return extra


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def summary_markdown(s: dict[str, Any]) -> str:
    """train_summary.md."""
    lines = [
        f"# Training run: {s['model']} · {s['method']}",
        "",
        f"- status: **{s['status']}**, {s['steps']} steps ({s.get('epochs', '-')} epochs), "
        f"{s['train_examples']} train / {s['eval_examples']} eval examples",
        f"- time: {s.get('train_time_s', '-')} s training; {s.get('tokens_per_s', '-')} tokens/s; "
        f"padding {100 * s.get('padding_share', 0):.1f}% ({s['batching']})",
        f"- peak memory: {_fmt(s.get('peak_memory_gb'), '.2f')} GiB ({s.get('peak_memory_kind', '')})",
        f"- loss: first {_fmt(s.get('first_train_loss'))}, final train {_fmt(s.get('final_train_loss'))}, "
        f"final eval {_fmt(s.get('final_eval_loss'))}",
        f"- precision {s['precision']}; {s['processes']} process(es) on {s['device']}; trainable "
        f"{s['trainable_parameters']:,} of {s['total_parameters']:,} parameters",
        f"- result: `{s.get('artefact', '-')}`; last checkpoint: `{s.get('last_checkpoint') or '-'}`",
        f"- files: config.yaml, metrics.jsonl, loss.png, summary.json, attribute_vocab.json in `{s['output_dir']}`",
    ]
    g = s.get("final_gen_eval")
    if g:
        lines.append(f"- generation on {g['n']} eval records (last evaluation): ROUGE-1 {_fmt(g.get('rouge-1'), '.2f')}, "
                     f"BLEU-4 {_fmt(g.get('bleu-4'), '.2f')}, coverage {_fmt(g.get('attr_coverage'), '.2f')}, "
                     f"ended on end-of-turn {_fmt(g.get('ended_share'), '.0%')}, "
                     f"repetition {_fmt(g.get('repetition_rate'), '.3f')}")
    if s.get("best_metric"):
        lines.append(f"- best {s['best_metric']}: {_fmt(s.get('best_value'))} at step {s.get('best_step')} "
                     f"-> `{s.get('best') or '-'}`")
    for n in s.get("notes") or []:
        lines.append(f"- note: {n}")
    return "\n".join(lines) + "\n"


def print_summary(s: dict[str, Any]) -> None:
    """The summary as a table on stdout, by the main process of a launch only."""
    if os.environ.get("RANK", "0") != "0":
        return
    t = Table(title=f"adgen train: {s['status']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model / method", f"{s['model']} · {s['method']} · {s['precision']} · {s['batching']}")
    t.add_row("steps", f"{s['steps']} ({s.get('epochs', '-')} epochs, {s['train_examples']} examples, "
                       f"{s['processes']} process(es) on {s['device']})")
    t.add_row("time", f"{s.get('train_time_s', '-')} s  ·  {s.get('tokens_per_s', '-')} tokens/s  ·  "
                      f"padding {100 * s.get('padding_share', 0):.1f}%")
    t.add_row("peak memory", f"{_fmt(s.get('peak_memory_gb'), '.2f')} GiB ({s.get('peak_memory_kind', '')})")
    t.add_row("loss", f"first {_fmt(s.get('first_train_loss'))} → final {_fmt(s.get('final_train_loss'))}; "
                      f"eval {_fmt(s.get('final_eval_loss'))}")
    t.add_row("result", str(s.get("artefact", "-")))
    t.add_row("run dir", f"{s['output_dir']} (config.yaml, metrics.jsonl, loss.png, summary.json, "
                         "train_summary.md, attribute_vocab.json, checkpoints/)")
    for n in s.get("notes") or []:
        t.add_row("note", n)
    Console(stderr=False).print(t)
