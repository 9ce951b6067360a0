"""Supervised fine-tuning: `train(TrainConfig)` (LoRA, QLoRA, DoRA, P-Tuning v2, full SFT).

Modules, one idea each: config (options), collate (packing / padding / data order), loss (logits only
where labels are set), peft_setup (model loading, precision, methods), checkpoint (atomic, resumable),
run_dir (the output directory), plots, report, trainer (the loop).
"""

from adgen.train.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config", "train"]


def train(*args, **kwargs):
    from adgen.train.trainer import train as _train

    return _train(*args, **kwargs)
