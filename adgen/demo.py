"""`adgen demo`: the whole journey on built-in defaults, no hub and no GPU needed (~9 min on 2 cores).

1. data: inspect the train and dev files;
2. zero-shot: evaluate the built-in model on a few dev records (greedy, the field's metrics);
3. fine-tune: a short run (the top 12 layers' weights) on the first train records, as many as the time budget holds (the
   step time is measured on this machine: a CPU without fast bf16 trains ~2-4x slower than one with it);
4. evaluate the fine-tuned model on the same records;
5. compare: a table printed and written as comparison.md + comparison.png;
6. the `adgen serve` command that serves the result beside its base model (the web UI's compare view).

Data: `--data-dir` (a folder with dev.json and train.json); without one, a small built-in sample
written for this project (original text, not AdGen) keeps the demo working anywhere — it then trains
and evaluates on the same few records, which shows the mechanics, not generalisation.
Everything lands in `--output-dir` (default runs/demo); a second run replaces it.
"""

from __future__ import annotations

import json
import shlex
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from adgen.data.inspect import format_inspect_text, inspect_data
from adgen.data.records import read_records
from adgen.demo_config import DemoConfig
from adgen.errors import AdgenError
from adgen.evaluation.compare import compare_runs
from adgen.evaluation.run import resolve_vocab, run_eval
from adgen.generation.config import DecodingConfig
from adgen.generation.loader import load_generator
from adgen.io import atomic_write_text
from adgen.recipes import find_recipe
from adgen.train import train
from adgen.train.config import load_train_config
from adgen.train.trainer import release_memory

__all__ = ["DEMO_RECIPE", "DemoConfig", "builtin_sample_path", "demo_data_paths", "demo_train_config", "run_demo",
           "serve_command", "training_minutes"]


def builtin_sample_path() -> Path:
    return Path(str(resources.files("adgen") / "resources" / "sample_adgen.jsonl"))


def demo_data_paths(data_dir: str | None) -> tuple[Path, Path]:
    """(dev file, train file) from --data-dir, or the built-in sample for both."""
    if data_dir is None:
        sample = builtin_sample_path()
        return sample, sample
    d = Path(data_dir)
    if not d.is_dir():
        raise AdgenError(f"--data-dir {d} is not a directory (expected one holding dev.json and train.json)")
    dev, train = d / "dev.json", d / "train.json"
    for f in (dev, train):
        if not f.is_file():
            raise AdgenError(f"{d} has no {f.name}; pass a folder laid out like ../shared/adgen, or omit --data-dir")
    return dev, train


DEMO_RECIPE = "demo-smollm2-135m"  # adgen/recipes/demo-smollm2-135m.yaml: what the fine-tune trains, and why


def demo_train_config(cfg: DemoConfig, train_path: Path, dev_path: Path, output_dir: Path,
                      minutes: float | None = None):
    """The shipped demo recipe with this demo's data, output, time budget and sizes filled in."""
    return load_train_config(find_recipe(DEMO_RECIPE), {
        "model": cfg.model, "train_data": str(train_path), "eval_data": str(dev_path),
        "max_samples": cfg.train_samples, "max_eval_samples": min(cfg.eval_samples, 8),
        "output_dir": str(output_dir), "max_minutes": minutes, "progress": cfg.progress,
    })


def training_minutes(cfg: DemoConfig, elapsed_s: float, zero_shot_eval_s: float, tuned_max_new_tokens: int) -> float:
    """Minutes left for the fine-tune: the budget less what is spent and what the rest will take (the
    fine-tuned eval: the zero-shot eval's time per token step, for 3/4 of the longer limit; loading,
    the final eval loss and the comparison: ~45 s). At least one minute."""
    per_step = zero_shot_eval_s / max(1, min(cfg.zero_shot_max_new_tokens, cfg.max_new_tokens or 10**9))
    reserve = 0.75 * per_step * tuned_max_new_tokens + 45.0
    return max(1.0, (cfg.minutes * 60 - elapsed_s - reserve) / 60)


def serve_command(tuned_model: str, base_model: str) -> str:
    """The command that serves the fine-tuned model with the model it started from beside it: a full / top-layers
    fine-tune has no adapter to switch off, so the UI's compare view needs the base loaded too (`--base`)."""
    return shlex.join(["adgen", "serve", "--model", tuned_model, "--base", base_model])


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    console = console or Console()
    out = Path(cfg.output_dir)
    dev_path, train_path = demo_data_paths(cfg.data_dir)
    source = "the built-in sample" if cfg.data_dir is None else str(Path(cfg.data_dir))
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    console.rule(f"[bold]1/5 data: {source}")
    paths = [dev_path] if train_path == dev_path else [train_path, dev_path]
    for path in paths:
        console.print(format_inspect_text(inspect_data(read_records(path))), markup=False, highlight=False)
    dev = read_records(dev_path).records[: cfg.eval_samples]

    console.rule(f"[bold]2/5 zero-shot: {cfg.model} on {len(dev)} dev record(s)")
    t = time.perf_counter()
    zero_limit = min(cfg.zero_shot_max_new_tokens, cfg.max_new_tokens or cfg.zero_shot_max_new_tokens)
    zero_decoding = DecodingConfig(max_new_tokens=zero_limit)
    zero, tuned_max = _evaluate(cfg, None, dev, dev_path, out / "eval-zero-shot", console, zero_decoding)
    timings["zero_shot_eval_s"] = time.perf_counter() - t
    release_memory()  # the zero-shot model and its generation heap: the fine-tune starts from what it needs

    minutes = training_minutes(cfg, time.perf_counter() - t_start, timings["zero_shot_eval_s"], tuned_max)
    console.rule(f"[bold]3/5 fine-tune: the top 12 layers, {minutes:.1f} min on the first train records")
    t = time.perf_counter()
    result = train(demo_train_config(cfg, train_path, dev_path, out / "train", minutes), overwrite=True)
    timings["train_s"] = time.perf_counter() - t
    s = result.summary
    console.print(f"{s['steps']} steps, {s['train_examples']} examples, {s['tokens_per_s']:.0f} tokens/s; "
                  f"train loss {s['first_train_loss']:.3f} -> {s['final_train_loss']:.3f}; "
                  f"loss curve {out / 'train' / 'loss.png'}")
    tuned_model = str(Path(s["artefact"]))  # full fine-tuning: a whole model directory

    console.rule(f"[bold]4/5 fine-tuned: the same {len(dev)} dev record(s)")
    t = time.perf_counter()
    tuned, _ = _evaluate(cfg, None, dev, dev_path, out / "eval-fine-tuned", console,
                         DecodingConfig(max_new_tokens=cfg.max_new_tokens), model=tuned_model)
    timings["fine_tuned_eval_s"] = time.perf_counter() - t

    console.rule("[bold]5/5 zero-shot vs fine-tuned")
    comparison = compare_runs([zero.output_dir, tuned.output_dir], out, names=["zero-shot", "fine-tuned"])
    console.print(comparison.markdown, markup=False, highlight=False)
    _print_examples(console, dev, zero.rows, tuned.rows)

    timings["total_s"] = time.perf_counter() - t_start
    serve = serve_command(tuned_model, cfg.model)
    summary = {
        "data": source, "model": cfg.model, "eval_records": len(dev), "train_records": s["train_examples"],
        "zero_shot": zero.metrics["metrics"], "fine_tuned": tuned.metrics["metrics"],
        "fine_tuned_model": tuned_model, "comparison_md": str(comparison.table_path),
        "comparison_png": str(comparison.chart_path), "serve_command": serve,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    console.rule("[bold]done")
    console.print(
        f"in {timings['total_s'] / 60:.1f} min: comparison {comparison.table_path} and {comparison.chart_path}, "
        f"fine-tuned model {tuned_model}, predictions in {out}/eval-*/\n"
        f"try it:  {serve}   (then open http://127.0.0.1:8000/ui and tick 对比基座模型 to see the base model's copy "
        f"beside it, or POST /v1/chat/completions)",
        markup=False, highlight=False,
    )
    return summary


def _evaluate(cfg: DemoConfig, adapter, records, data_path: Path, out: Path, console, decoding, model=None):
    """(the eval result, the max_new_tokens the default decoding gets with this model's tokenizer)."""
    t = time.perf_counter()
    gen = load_generator(model or cfg.model, adapter=adapter, batch_size=cfg.batch_size)
    load_s = time.perf_counter() - t
    vocab, vocab_source = resolve_vocab(None, adapter or model)
    result = run_eval(gen, records, out, decoding, data_path=data_path,
                      vocab=vocab, vocab_source=vocab_source, overwrite=True, progress=cfg.progress,
                      model_load_s=load_s)
    m = result.metrics["metrics"]
    finish = result.metrics["finish_reasons"]
    console.print(
        f"ROUGE-1 {m['rouge-1']:.2f}  ROUGE-L {m['rouge-l']:.2f}  BLEU-4 {m['bleu-4']:.2f}  "
        f"coverage {m['attr_coverage']:.2f}  repetition {m['repetition_rate']:.2f}  "
        f"ended {finish.get('stop', 0)}/{len(records)} (loop {finish.get('loop', 0)}, limit {finish.get('length', 0)}) "
        f"-> {out}", markup=False, highlight=False,
    )
    return result, gen.resolve(DecodingConfig(max_new_tokens=cfg.max_new_tokens)).max_new_tokens


def _print_examples(console, records, zero_rows, tuned_rows, k: int = 2) -> None:
    table = Table(show_lines=True, title="examples (greedy)")
    for col in ("attributes", "zero-shot", "fine-tuned", "reference"):
        table.add_column(col, overflow="fold")
    for rec, z, f in list(zip(records, zero_rows, tuned_rows))[:k]:
        table.add_row(rec.content, z["predict"], f["predict"], rec.summary or "")
    console.print(table)
