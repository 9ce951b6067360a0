"""The settings of `adgen demo` (adgen/demo.py runs it): a module of its own so that the CLI takes the flags'
defaults from here at start-up without importing what the demo runs (torch, the trainer, the evaluation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoConfig:
    data_dir: str | None = None
    model: str = "smollm2-135m"
    output_dir: str = "runs/demo"
    eval_samples: int = 16  # dev records evaluated before and after fine-tuning
    # the whole demo (data, two evals, fine-tune, comparison) aims to end within this many minutes:
    # the fine-tune gets what the evaluations leave, sized from its own measured step time
    minutes: float = 8.8
    train_samples: int = 2000  # at most the first N train records (the time budget usually stops earlier)
    max_new_tokens: int | None = None  # None: sized from the tokenizer (room for ~190 characters)
    zero_shot_max_new_tokens: int = 128  # the untrained model never stops (it recites the system prompt)
    batch_size: int = 16  # generation batch
    progress: bool = True
