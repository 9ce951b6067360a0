"""The training loss, computed only where there is something to learn.

`CausalLMLoss` wraps the (PEFT-)model in one `nn.Module` whose forward returns the *summed* token
cross-entropy of a batch. It asks the model for logits only at positions with a target
(`logits_to_keep` = a boolean mask; transformers >= 5 gathers those hidden states before the LM head),
so with response-only loss the LM head and the largest activation (positions x vocabulary) shrink to
the response tokens. The cross-entropy runs in fp32 chunks. Being one module, it is what
accelerate wraps for DDP / FSDP / DeepSpeed, so gradient synchronisation sees one forward per
micro-batch. Going through the model's own forward (rather than its decoder + lm_head by hand) keeps
model-specific logit processing (soft-capping, logit scaling) and works for every PEFT method,
prefix tuning included (its key/value prefixes are added inside the PEFT forward).

Models whose forward has no `logits_to_keep` (e.g. remote-code checkpoints) get full logits,
gathered afterwards: same loss, more memory.

The trainer normalises by the number of target tokens in the whole optimizer step (over all
micro-batches and processes), so the loss does not depend on how the step is split into
micro-batches, rows or processes.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from adgen.data.chat import IGNORE_INDEX


def chunked_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """sum of CE over rows of logits [N, V] with targets [N] (no -100 expected), in fp32 chunks."""
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], chunk):
        part = logits[start : start + chunk].float()
        total = total + F.cross_entropy(part, targets[start : start + chunk], reduction="sum")
    return total


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model
    # PEFT: PeftModel -> LoraModel/… (base_model) -> the transformers model (.model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class CausalLMLoss(nn.Module):
    """forward(input_ids, targets, position_ids=None, attention_mask=None) -> (loss_sum, n_targets)."""

    def __init__(self, model: nn.Module, *, ce_chunk: int = 2048, select_logits: bool = True) -> None:
        super().__init__()
        self.model = model
        self.ce_chunk = ce_chunk
        self.select_logits = select_logits and _accepts_logits_to_keep(model)
        self._checked = False

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None):
        logits, tgt = self.target_logits(input_ids, targets, position_ids, attention_mask)
        return chunked_cross_entropy_sum(logits, tgt, self.ce_chunk), tgt.numel()

    def decide_logits_selection(self, batch) -> str:
        """Decide once, at setup, whether the model computes logits only at the target positions (it must
        gather by a boolean mask). As a training forward: train mode and grad on (bitsandbytes repacks CPU 4-bit
        layers for inference the first time they run without grad, and no gradient flows through them after;
        the graph is dropped at once), with the random state restored, so training is exactly what it would be
        without the probe. Returns what was decided."""
        if self.select_logits and not self._checked:
            import torch

            devices = [batch.input_ids.device] if batch.input_ids.is_cuda else []
            with torch.random.fork_rng(devices=devices):
                self._probe(batch.targets != IGNORE_INDEX,
                            **self._forward_kwargs(batch.input_ids, batch.position_ids, batch.attention_mask))
        return "target positions only" if self.select_logits else "every position"

    @staticmethod
    def _forward_kwargs(input_ids, position_ids, attention_mask) -> dict:
        kwargs = {"input_ids": input_ids, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return kwargs

    def _probe(self, keep, **kwargs):
        """Logits at the `keep` positions if the model gathers by a boolean mask, else None (and never again)."""
        try:
            logits = self.model(**kwargs, logits_to_keep=keep).logits
        except (IndexError, RuntimeError, TypeError):
            logits = None  # it only slices by an int / a position list
        if logits is not None and tuple(logits.shape[:-1]) != (int(keep.sum()),):
            logits = None
        self.select_logits = logits is not None
        self._checked = True
        return logits

    def target_logits(self, input_ids, targets, position_ids=None, attention_mask=None):
        """(logits [N, V], targets [N]) at the N positions with a target, in row-major order."""
        keep = targets != IGNORE_INDEX  # [B, T] bool
        kwargs = self._forward_kwargs(input_ids, position_ids, attention_mask)
        logits = None
        if self.select_logits and self._checked:
            logits = self.model(**kwargs, logits_to_keep=keep).logits
        elif self.select_logits:  # used outside the trainer, which decides at setup
            logits = self._probe(keep, **kwargs)
        if logits is None:
            logits = self.model(**kwargs).logits[keep]
        return logits, targets[keep]
