"""The trained weights as a run hands them on: adapter/ (PEFT), model/ (full fine-tuning) or best/.

Each is a complete directory (weights + tokenizer) written beside its place and moved there at once. Sharded
runs (FSDP / DeepSpeed) gather the weights first, every process taking part; a PEFT run gathers the adapter's
weights only. PiSSA / OLoRA adapters are converted to a plain LoRA of the original base (`lora_init/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adgen.io import replace_dir, temp_dir_for
from adgen.train.fsdp_cpu import full_state_dict, gather_trainable, shards_weights
from adgen.train.peft_setup import INITIAL_ADAPTER_DIR, rewrites_base

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from adgen.train.config import TrainConfig


def save_final(accelerator: Accelerator, cfg: TrainConfig, out: Path, model: nn.Module, wrapped: nn.Module,
               tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> Path:
    """adapter/ (PEFT) or model/ (full), or `name`/ (best/): complete directories, moved into place at once."""
    final = out / (name or ("adapter" if cfg.is_peft else "model"))
    state_dict = None
    if shards_weights(accelerator):  # every process takes part in gathering the weights
        if cfg.is_peft:  # the adapter's weights only, not the whole model's
            state_dict = gather_trainable(accelerator, model) or None
        else:
            state_dict = full_state_dict(accelerator, wrapped) or None  # FSDP2 on CPUs: DTensors otherwise
    if accelerator.is_main_process:
        tmp = temp_dir_for(final)
        kw = {"state_dict": state_dict} if state_dict is not None else {}
        if rewrites_base(cfg):  # a plain LoRA of the original base (PiSSA / OLoRA changed the base weights)
            kw["path_initial_model_for_weight_conversion"] = str(out / INITIAL_ADAPTER_DIR)
        model.save_pretrained(str(tmp), safe_serialization=True, **kw)
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final
