"""`adgen demo`: the main job on built-in defaults, no hub and no GPU needed.

Today: inspect the data, load the built-in model, write ad copy for a few dev records and save them.
Data: `--data-dir` (a folder with dev.json, optionally train.json); without one, a small built-in
sample written for this project (original text, not AdGen) keeps the demo working anywhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from adgen.errors import AdgenError


@dataclass
class DemoConfig:
    data_dir: str | None = None
    model: str = "smollm2-135m"
    output_dir: str = "runs/demo"
    num_examples: int = 3
    max_new_tokens: int = 96


def builtin_sample_path() -> Path:
    return Path(str(resources.files("adgen") / "resources" / "sample_adgen.jsonl"))


def demo_data_paths(data_dir: str | None) -> tuple[Path, Path | None]:
    """(eval file, train file or None) from --data-dir, or the built-in sample."""
    if data_dir is None:
        return builtin_sample_path(), None
    d = Path(data_dir)
    if not d.is_dir():
        raise AdgenError(f"--data-dir {d} is not a directory (expected one holding dev.json and train.json)")
    dev = d / "dev.json"
    if not dev.is_file():
        raise AdgenError(f"{d} has no dev.json; pass a folder laid out like ../shared/adgen, or omit --data-dir")
    train = d / "train.json"
    return dev, (train if train.is_file() else None)


def run_demo(cfg: DemoConfig, console=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    from adgen.data.inspect import format_inspect_text, inspect_data
    from adgen.data.records import read_records
    from adgen.generation import DecodingConfig, load_generator
    from adgen.io import atomic_write_jsonl

    console = console or Console()
    out = Path(cfg.output_dir)
    dev_path, train_path = demo_data_paths(cfg.data_dir)
    source = "built-in sample" if cfg.data_dir is None else str(dev_path)

    console.rule("[bold]1. data")
    for path in [p for p in (train_path, dev_path) if p is not None]:
        data = read_records(path)
        console.print(format_inspect_text(inspect_data(data)), markup=False, highlight=False)
    records = read_records(dev_path).records[: cfg.num_examples]

    console.rule(f"[bold]2. model: {cfg.model}")
    t0 = time.perf_counter()
    gen = load_generator(cfg.model)
    console.print(f"loaded on {gen.device} in {time.perf_counter() - t0:.1f}s")

    console.rule(f"[bold]3. ad copy for {len(records)} record(s) of the {source} (zero-shot, greedy)")
    t0 = time.perf_counter()
    outputs = gen.generate([r.content for r in records], DecodingConfig(max_new_tokens=cfg.max_new_tokens))
    secs = time.perf_counter() - t0
    rows = []
    table = Table(show_lines=True)
    for col in ("attributes", "generated", "reference"):
        table.add_column(col, overflow="fold")
    for rec, g in zip(records, outputs):
        rows.append({"line": rec.line, "content": rec.content, "label": rec.summary, "predict": g.text,
                     "finish_reason": g.finish_reason, "completion_tokens": g.completion_tokens})
        table.add_row(rec.content, g.text, rec.summary or "")
    console.print(table)
    atomic_write_jsonl(out / "predictions.jsonl", rows)
    tokens = sum(g.completion_tokens for g in outputs)
    summary = {"model": cfg.model, "data": source, "records": len(rows), "seconds": round(secs, 2),
               "generated_tokens": tokens, "tokens_per_s": round(tokens / max(secs, 1e-9), 1),
               "predictions": str(out / "predictions.jsonl")}
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    console.rule("[bold]summary")
    console.print(
        f"{len(rows)} ad(s) written in {secs:.1f}s ({summary['tokens_per_s']} tokens/s) -> {summary['predictions']}\n"
        f"next: adgen train --config configs/smollm2-135m.yaml, then adgen eval / adgen serve"
    )
    return summary
