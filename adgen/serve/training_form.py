"""What the web UI's training page asks for, checked before anything starts: the data through `adgen data
inspect`'s rules (`read_records`, errors naming file, line and fix) and the settings through `TrainConfig`'s own
validation. The run itself is `adgen train` in its own process (adgen.serve.training_jobs); this module only turns
the form into that command's `--config` and `key=value` overrides, and refuses what the command would refuse.

(The serve layer reaches into `adgen.train.config` and `adgen.recipes` here, for the config only: torch and the
trainer load in the training process, never in the server.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from adgen.data.inspect import inspect_data
from adgen.data.records import read_records
from adgen.errors import DataError
from adgen.recipes import list_recipes, resolve_config_path
from adgen.train.config import Method, TrainConfig, load_train_config

METHODS: tuple[str, ...] = get_args(Method)
DATA_SUFFIXES = (".json", ".jsonl")


def training_recipes() -> list[str]:
    """The shipped SFT recipes' names (`adgen recipes list`; the page trains on AdGen records, not on
    preference pairs), the LoRA ones first."""
    configs = {r.name: recipe_config(r.name) for r in list_recipes() if r.kind == "train"}
    names = [name for name, cfg in configs.items() if cfg.objective == "sft"]
    return sorted(names, key=lambda n: (configs[n].method != "lora", n))


def recipe_config(recipe: str) -> TrainConfig:
    """A recipe's own values (not validated: its train_data may be a path of another machine)."""
    return load_train_config(resolve_config_path(recipe))


@dataclass(frozen=True)
class TrainForm:
    """The training page's settings. `model`: what is trained (a path, alias or hub id); `train_data` /
    `eval_data`: files on the server (an upload is saved first); None / 0 leaves the recipe's value."""

    recipe: str
    model: str
    train_data: str
    eval_data: str | None = None
    method: str | None = None
    lora_r: int | None = None
    lr: float | None = None
    max_minutes: float | None = None
    max_steps: int | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)  # further `key=value` overrides, as `adgen train` takes

    def overrides(self) -> list[str]:
        """The `key=value` overrides of `adgen train --config RECIPE` (strings JSON-quoted: a path is never YAML)."""
        out = [f"model={json.dumps(self.model)}", f"train_data={json.dumps(self.train_data)}"]
        # no eval file: no eval loss and no generation metrics, rather than the recipe's own file
        out += [f"eval_data={json.dumps(self.eval_data)}"] if self.eval_data else ["eval_data=null", "gen_eval_every=0"]
        if self.method:
            out.append(f"method={self.method}")
        if self.lora_r:
            out.append(f"lora.r={int(self.lora_r)}")
        if self.lr:
            out.append(f"lr={float(self.lr)!r}")
        if self.max_minutes:
            out.append(f"max_minutes={float(self.max_minutes)!r}")
        if self.max_steps:
            out.append(f"max_steps={int(self.max_steps)}")
        return out + list(self.extra)


def parse_extra(text: str) -> tuple[str, ...]:
    """The page's "more settings" box: `key=value` per line (or separated by spaces); `#` starts a comment."""
    items = []
    for line in (text or "").splitlines():
        line = line.split("#", 1)[0].strip()
        items.extend(part for part in line.split() if part)
    return tuple(items)


def settings_config(form: TrainForm, output_dir: str | Path) -> TrainConfig:
    """The TrainConfig `adgen train` will run, validated (ConfigError naming the key and the fix)."""
    cfg = load_train_config(resolve_config_path(form.recipe), [*form.overrides(), f"output_dir={json.dumps(str(output_dir))}"])
    return cfg.validate()


def check_data(path: str | Path, role: str) -> str:
    """One line on a data file that passes `adgen data inspect`'s rules (records, duplicates, placeholders);
    a DataError naming file, line and fix otherwise."""
    p = Path(path)
    if not p.exists():  # a missing path here is a typo, never a Hugging Face Hub id to look up
        raise DataError(f"{role}: {path}: no such file on the server. Check the path, or upload the file")
    data = read_records(p, on_error="fail")
    report = inspect_data(data)
    line = f"{role}: {report['records']} records, {report['distinct_contents']} distinct products"
    if report["duplicate_pairs"]:
        line += f", {report['duplicate_pairs']} duplicate pairs"
    placeholders = [ph for ph, c in report["placeholders"].items() if c["records"]]
    if placeholders:
        line += " · placeholders in the copy: " + ", ".join(
            f"{ph} ({report['placeholders'][ph]['records']} records)" for ph in placeholders)
    return line
