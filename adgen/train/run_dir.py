"""The training run directory: what a finished run holds, and refusing to clobber another run (adgen.run_dirs).

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

from pathlib import Path

from adgen.run_dirs import RunDirectory, RunDirMessages

RUN_MARKERS = ("config.yaml", "summary.json", "metrics.jsonl", "checkpoints", "adapter", "model")
RUN_FILES = RUN_MARKERS + ("loss.png", "train_summary.md", "attribute_vocab.json")

TRAINING_RUN = RunDirectory(
    # and the partial directories of an interrupted swap (adgen.io.temp_dir_for / replace_dir: .NAME.tmp / .old)
    owned=RUN_FILES + (".*.tmp", ".*.old"),
    markers=RUN_MARKERS,
    messages=RunDirMessages(
        is_file="--output-dir {path} is a file, not a directory",
        missing="--resume: {path} does not exist; nothing to resume",
        foreign="--output-dir {path} is not empty and does not look like an adgen run; refusing to write into it "
                "(choose a new or empty directory)",
        finished="--output-dir {path} already holds a training run ({found}). "
                 "Pass --overwrite to replace it, --resume to continue it, or choose another --output-dir",
        leftovers="--overwrite: {path} also holds files that are not from an adgen run ({leftovers}); "
                  "remove them or choose another --output-dir",
    ),
)


def prepare_output_dir(output_dir: str | Path, *, overwrite: bool, resume: bool) -> Path:
    """Make sure output_dir can take this run; with overwrite, clear a previous adgen run first."""
    out = Path(output_dir)
    TRAINING_RUN.prepare(out, overwrite=overwrite, resume=resume)
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
    return out
