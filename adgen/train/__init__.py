"""Fine-tuning: `train(TrainConfig)` (SFT or DPO; LoRA, QLoRA, DoRA, P-Tuning v2, full fine-tuning).

Modules, one idea each: config (options), trainer (the run, top to bottom), setup_stages (the setup stages),
state (the typed pieces they build and the loop's progress), objective (SFT / DPO), schedule (steps, LR, time
budget), loop (the steps, logging, checkpoints), evaluation (eval loss, generation metrics, best/), collate
(packing / padding / data order), loss (logits only where labels are set), dpo, peft_setup (model loading,
precision, methods), checkpoint (atomic, resumable), artefacts (adapter/, model/, best/), metrics_log
(metrics.jsonl), report (the summary), memory (peak, heap trim), run_dir (the output directory), plots.
"""

from adgen.train.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config", "train"]


def train(*args, **kwargs):
    from adgen.train.trainer import train as _train  # torch and accelerate load when a run starts, not with the config

    return _train(*args, **kwargs)
