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

Where the model's logits are exactly its output head applied to the last hidden states (checked once on
a real batch at setup: no soft-capping, no scaling, a plain `nn.Linear` head), the head and the
cross-entropy run fused over chunks of positions (`linear_cross_entropy`): no logits are kept at all.
The model's own forward still runs; only the head's own call is skipped while it does.

Models whose forward has no `logits_to_keep` (e.g. remote-code checkpoints) get full logits,
gathered afterwards: same loss, more memory.

The trainer normalises by the number of target tokens in the whole optimizer step (over all
micro-batches and processes), so the loss does not depend on how the step is split into
micro-batches, rows or processes.

End-of-turn weighting (`TrainConfig.end_token_weight`): while training, the targets that are one of the chat
format's stop ids (`ChatFormatter.stop_token_ids`: Llama-3's <|eot_id|>, ChatML's <|im_end|>) count
`end_weight` times in the sum; the normaliser stays the count of target tokens. Weight 1 (the default), eval
mode (the eval loss stays the references' plain token cross-entropy, comparable across weights) and no stop ids
all take the unweighted code path, so they give today's loss and gradients bit for bit.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adgen.data.chat import IGNORE_INDEX
from adgen.train.linear_cross_entropy import linear_cross_entropy_sum


def chunked_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 2048,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum of CE over rows of logits [N, V] with targets [N] (no -100 expected), in fp32 chunks; with `weights`
    [N] (fp32), the sum of weights[i] x CE of row i."""
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], chunk):
        part = logits[start : start + chunk].float()
        if weights is None:
            total = total + F.cross_entropy(part, targets[start : start + chunk], reduction="sum")
        else:
            rows = F.cross_entropy(part, targets[start : start + chunk], reduction="none")
            total = total + (rows * weights[start : start + chunk]).sum()
    return total


def end_token_weights(targets: torch.Tensor, end_ids: Sequence[int], weight: float) -> torch.Tensor:
    """[N] fp32 loss weights of targets [N]: `weight` where the target is one of `end_ids`, else 1."""
    ends = torch.isin(targets, torch.tensor(list(end_ids), dtype=targets.dtype, device=targets.device))
    return torch.ones(targets.shape, dtype=torch.float32, device=targets.device).masked_fill_(ends, weight)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model
    # PEFT: PeftModel -> LoraModel/… (base_model) -> the transformers model (.model)
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _plain_output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head if it is a plain bias-free nn.Linear over an ordinary (unsharded) weight."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or type(head.weight.data) is not torch.Tensor:
        return None  # LoRA / modules_to_save wrappers, biased heads, FSDP's DTensors: the plain path
    return head


def _identity(hidden):
    return hidden


@contextmanager
def _head_returns_hidden(head: nn.Module):
    """While inside, the head's call returns its input: the model's forward yields hidden states as `logits`."""
    before = head.__dict__.get("forward")  # accelerate's hooks live here; put back whatever was there
    head.forward = _identity  # nn.Module.__call__ looks up the instance attribute first
    try:
        yield
    finally:
        if before is None:
            del head.forward
        else:
            head.forward = before


class CausalLMLoss(nn.Module):
    """forward(input_ids, targets, position_ids=None, attention_mask=None, **model_kwargs) -> (loss_sum, n_targets).

    `model_kwargs` go to the model's forward as they are: a packed row's flash-attention boundaries
    (`collate.Batch.loss_kwargs`). In train mode, targets in `end_ids` count `end_weight` times in loss_sum
    (n_targets still counts each target once: the trainer divides by it)."""

    def __init__(self, model: nn.Module, *, ce_chunk: int = 2048, select_logits: bool = True,
                 fused_head: bool = True, end_ids: Sequence[int] = (), end_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.ce_chunk = ce_chunk
        self.end_ids = tuple(end_ids)
        self.end_weight = float(end_weight)
        self.select_logits = select_logits and _accepts_logits_to_keep(model)
        self._checked = False
        self.want_fused = fused_head
        self._fused: tuple[nn.Linear, ...] = ()  # (head,) once decide_logits_selection checked it; a tuple so
        # that nn.Module does not register the head a second time (state_dict keys stay the model's)

    @property
    def fused_head(self) -> nn.Linear | None:
        return self._fused[0] if self._fused else None

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None, **model_kwargs):
        # the normaliser is the number of targets whatever their weights: a weight > 1 makes the end-of-turn
        # token matter more, it does not shrink every other token's share of the step
        if self.fused_head is not None:
            hidden, tgt = self.target_hidden(input_ids, targets, position_ids, attention_mask, **model_kwargs)
            return linear_cross_entropy_sum(hidden, self.fused_head.weight, tgt, self.target_weights(tgt)), tgt.numel()
        logits, tgt = self.target_logits(input_ids, targets, position_ids, attention_mask, **model_kwargs)
        return chunked_cross_entropy_sum(logits, tgt, self.ce_chunk, self.target_weights(tgt)), tgt.numel()

    def target_weights(self, tgt: torch.Tensor) -> torch.Tensor | None:
        """Per-target weights (`end_token_weights`) while training with a weight other than 1; else None: the
        unweighted path, exactly the loss without weighting (and the eval loss stays plain cross-entropy)."""
        if not self.training or self.end_weight == 1.0 or not self.end_ids:
            return None
        return end_token_weights(tgt, self.end_ids, self.end_weight)

    def target_hidden(self, input_ids, targets, position_ids=None, attention_mask=None, **model_kwargs):
        """(last hidden states [N, H], targets [N]) at the N target positions; needs the fused head."""
        with _head_returns_hidden(self.fused_head):
            return self.target_logits(input_ids, targets, position_ids, attention_mask, **model_kwargs)

    def decide_logits_selection(self, batch) -> str:
        """Decide once, at setup, whether the model computes logits only at the target positions (it must
        gather by a boolean mask). As a training forward: train mode and grad on (bitsandbytes repacks CPU 4-bit
        layers for inference the first time they run without grad, and no gradient flows through them after;
        the graph is dropped at once), with the random state restored, so training is exactly what it would be
        without the probe. Returns what was decided."""
        if self.select_logits and not self._checked:
            devices = [batch.input_ids.device] if batch.input_ids.is_cuda else []
            with torch.random.fork_rng(devices=devices):
                logits = self._probe(batch.targets != IGNORE_INDEX,
                                     **self._forward_kwargs(batch.input_ids, batch.position_ids, batch.attention_mask,
                                                            **batch.varlen_kwargs()))
            if logits is not None and self.want_fused:
                with torch.random.fork_rng(devices=devices):  # from the same state: the probe's dropout masks
                    self._fused = self._check_fused_head(batch, logits.detach())
        if self.fused_head is not None:
            return "target positions only, head fused with the loss"
        return "target positions only" if self.select_logits else "every position"

    def _check_fused_head(self, batch, logits) -> tuple[nn.Linear, ...]:
        """(head,) if the model's logits on this batch are its head applied to its last hidden states, else ()."""
        head = _plain_output_head(self.model)
        if head is None:
            return ()
        with _head_returns_hidden(head):
            hidden, _ = self.target_logits(batch.input_ids, batch.targets, batch.position_ids, batch.attention_mask,
                                           **batch.varlen_kwargs())
        if hidden.shape[-1] != head.in_features:
            return ()
        mine = hidden.detach().to(head.weight.dtype) @ head.weight.detach().T
        return (head,) if torch.allclose(mine.float(), logits.float(), rtol=2e-2, atol=2e-2) else ()

    @staticmethod
    def _forward_kwargs(input_ids, position_ids, attention_mask, **model_kwargs) -> dict:
        kwargs = {"input_ids": input_ids, "use_cache": False, **model_kwargs}
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

    def target_logits(self, input_ids, targets, position_ids=None, attention_mask=None, **model_kwargs):
        """(logits [N, V], targets [N]) at the N positions with a target, in row-major order."""
        keep = targets != IGNORE_INDEX  # [B, T] bool
        kwargs = self._forward_kwargs(input_ids, position_ids, attention_mask, **model_kwargs)
        logits = None
        if self.select_logits and self._checked:
            logits = self.model(**kwargs, logits_to_keep=keep).logits
        elif self.select_logits:  # used outside the trainer, which decides at setup
            logits = self._probe(keep, **kwargs)
        if logits is None:
            logits = self.model(**kwargs).logits[keep]
        return logits, targets[keep]
