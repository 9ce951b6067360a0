"""The run directory: what a finished run holds, refusing to clobber another run, atomic dir swaps.

    output_dir/
      config.yaml          the resolved config (every option, defaults filled in)
      metrics.jsonl        one JSON row per logged step / eval
      loss.png             train + eval loss curves
      summary.json         status (running | completed | diverged), steps, time, tokens/s, memory, losses, paths
      train_summary.md     the same, for people
      attribute_vocab.json attribute key -> values seen in the training data (for faithfulness metrics)
      adapter/             PEFT methods: adapter_config.json + adapter_model.safetensors + tokenizer
      model/               method=full: a standalone transformers model + tokenizer
      checkpoints/step-N/  resumable checkpoints (see adgen.train.checkpoint)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from adgen.errors import AdgenError

RUN_MARKERS = ("config.yaml", "summary.json", "metrics.jsonl", "checkpoints", "adapter", "model")
RUN_FILES = RUN_MARKERS + ("loss.png", "train_summary.md", "attribute_vocab.json")


def _is_partial(name: str) -> bool:
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def holds_run(path: Path) -> bool:
    return any((path / m).exists() for m in RUN_MARKERS)


def prepare_output_dir(output_dir: str | Path, *, overwrite: bool, resume: bool) -> Path:
    """Make sure output_dir can take this run; with overwrite, clear a previous adgen run first."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise AdgenError(f"--output-dir {out} is a file, not a directory")
    if resume:
        if not out.is_dir():
            raise AdgenError(f"--resume: {out} does not exist; nothing to resume")
        return out
    if out.is_dir() and any(out.iterdir()):
        if not holds_run(out):
            raise AdgenError(
                f"--output-dir {out} is not empty and does not look like an adgen run; refusing to write into it "
                "(choose a new or empty directory)"
            )
        if not overwrite:
            raise AdgenError(
                f"--output-dir {out} already holds a training run ({', '.join(m for m in RUN_MARKERS if (out / m).exists())}). "
                "Pass --overwrite to replace it, --resume to continue it, or choose another --output-dir"
            )
        for child in out.iterdir():
            if child.name in RUN_FILES or _is_partial(child.name):
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        leftovers = [c.name for c in out.iterdir()]
        if leftovers:
            raise AdgenError(
                f"--overwrite: {out} also holds files that are not from an adgen run ({', '.join(leftovers[:5])}); "
                "remove them or choose another --output-dir"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out
