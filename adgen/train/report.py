"""The end-of-run summary printed by `adgen train` (main process only)."""

from __future__ import annotations

import os


def print_summary(s: dict) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    from rich.console import Console
    from rich.table import Table

    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    t = Table(title=f"adgen train: {s['status']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model / method", f"{s['model']} · {s['method']} · {s['precision']} · {s['batching']}")
    t.add_row("steps", f"{s['steps']} ({s.get('epochs', '-')} epochs, {s['train_examples']} examples, "
                       f"{s['processes']} process(es) on {s['device']})")
    t.add_row("time", f"{s.get('train_time_s', '-')} s  ·  {s.get('tokens_per_s', '-')} tokens/s  ·  "
                      f"padding {100 * s.get('padding_share', 0):.1f}%")
    t.add_row("peak memory", f"{f(s.get('peak_memory_gb'), '.2f')} GiB ({s.get('peak_memory_kind', '')})")
    t.add_row("loss", f"first {f(s.get('first_train_loss'))} → final {f(s.get('final_train_loss'))}; "
                      f"eval {f(s.get('final_eval_loss'))}")
    t.add_row("result", str(s.get("artefact", "-")))
    t.add_row("run dir", f"{s['output_dir']} (config.yaml, metrics.jsonl, loss.png, summary.json, "
                         "train_summary.md, attribute_vocab.json, checkpoints/)")
    for n in s.get("notes") or []:
        t.add_row("note", n)
    Console(stderr=False).print(t)
