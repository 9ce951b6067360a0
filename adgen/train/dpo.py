"""DPO (direct preference optimisation, Rafailov et al. 2023) inside adgen's own training loop.

loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

with log-probabilities summed over each response's tokens (the end-of-turn token included when the
text ended there). The reference is the model as training starts (the SFT model; with LoRA its
adapter starts at zero, so that is the base): its log-probabilities are computed once at setup and
saved in the run directory (`reference_logps.json`), so no second model is held in memory and a
resumed run uses the same reference. `sft_weight` adds the chosen texts' mean token NLL (as RPO does),
which keeps DPO from lowering the chosen copy's own likelihood.

Why not TRL's DPOTrainer: it brings its own Trainer loop, run directory and data collation; adgen's
loop already gives packing with a shared prompt prefix, the time budget, generation metrics during
training, best/ by a generation metric, exact resume and the reports, and the loss itself is a few
lines. The pair batches reuse the SFT collation: chosen examples first, then the rejected ones, so
packed rows and padded rows both work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adgen.data.chat import IGNORE_INDEX, Example
from adgen.io import atomic_write_json
from adgen.train.collate import Batch, collate
from adgen.train.loss import CausalLMLoss

REFERENCE_FILE = "reference_logps.json"


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    line: int = 0

    def __len__(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def _response_example(formatter, content: str, text: str, ended: bool) -> Example | None:
    ex = formatter.encode(content, text)
    if ex is not None and not ended and not ex.truncated:
        # the text was cut by a length limit: there is no end-of-turn token to learn (or unlearn)
        ex = Example(ex.input_ids[:-1], ex.labels[:-1], truncated=True)
    return ex


def encode_pairs(formatter, pairs) -> tuple[list[PairExample], int]:
    """Encoded pairs and how many were dropped (a prompt that alone exceeds max_length)."""
    out, dropped = [], 0
    if formatter.loss_on != "response":
        raise ValueError("DPO compares response log-probabilities: use loss_on=response")
    for p in pairs:
        c = _response_example(formatter, p.content, p.chosen, p.chosen_ended)
        r = _response_example(formatter, p.content, p.rejected, p.rejected_ended)
        if c is None or r is None:
            dropped += 1
            continue
        out.append(PairExample(c, r, p.line))
    return out, dropped


def target_counts(examples: Sequence[Example]) -> list[int]:
    """Positions with a target per example (its response tokens after the shift)."""
    return [sum(1 for x in ex.labels[1:] if x != IGNORE_INDEX) for ex in examples]


@dataclass
class PairBatch(Batch):
    """A micro-batch of k pairs: rows/segments of the k chosen examples, then the k rejected ones."""

    counts: list[int] | None = None  # targets per example, in the batch's order
    ref_logps: torch.Tensor | None = None  # [2k]: reference log-probabilities, same order
    num_pairs: int = 0

    @property
    def num_targets(self) -> int:  # what the trainer normalises the loss by: pairs, not tokens
        return self.num_pairs

    def to(self, device) -> "PairBatch":
        b = super().to(device)
        return PairBatch(**{**b.__dict__, "counts": self.counts, "num_pairs": self.num_pairs,
                            "ref_logps": None if self.ref_logps is None else self.ref_logps.to(device)})

    def loss_kwargs(self) -> dict:
        return {"counts": self.counts, "ref_logps": self.ref_logps}


def collate_pairs(pairs: Sequence[PairExample], batching: str, pad_id: int, share_prefix: bool = False,
                  ref_logps: torch.Tensor | None = None) -> PairBatch:
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    b = collate(examples, batching, pad_id, share_prefix)
    return PairBatch(**b.__dict__, counts=target_counts(examples), ref_logps=ref_logps, num_pairs=len(pairs))


def sequence_logps(lm: CausalLMLoss, batch: Batch, counts: Sequence[int], chunk: int = 2048) -> torch.Tensor:
    """Summed log-probability of each example's targets: [n_examples] (fp32)."""
    logits, tgt = lm.target_logits(batch.input_ids, batch.targets, batch.position_ids, batch.attention_mask,
                                   **batch.varlen_kwargs())  # flash-attention's boundaries: no host sync
    parts = [-F.cross_entropy(logits[s : s + chunk].float(), tgt[s : s + chunk], reduction="none")
             for s in range(0, logits.shape[0], chunk)]
    token_logps = torch.cat(parts)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=token_logps.device),
                                    torch.tensor(counts, device=token_logps.device))
    return token_logps.new_zeros(len(counts)).index_add(0, owner, token_logps)


class DPOLoss(nn.Module):
    """forward(..., counts, ref_logps) -> (sum of the pairs' losses, pairs, {reward sums})."""

    def __init__(self, model: nn.Module, *, beta: float, sft_weight: float = 0.0, select_logits: bool = True,
                 fused_head: bool = True) -> None:
        super().__init__()
        self.lm = CausalLMLoss(model, select_logits=select_logits, fused_head=fused_head)  # its forward: SFT eval loss
        self.beta = beta
        self.sft_weight = sft_weight

    def forward(self, input_ids, targets, position_ids=None, attention_mask=None, *, counts, ref_logps):
        batch = Batch(input_ids, targets, position_ids, attention_mask, len(counts), 0, 0)
        logps = sequence_logps(self.lm, batch, counts)
        k = len(counts) // 2
        chosen_reward = self.beta * (logps[:k] - ref_logps[:k])
        rejected_reward = self.beta * (logps[k:] - ref_logps[k:])
        margin = chosen_reward - rejected_reward
        losses = -F.logsigmoid(margin)
        if self.sft_weight:
            n_chosen = torch.tensor(counts[:k], device=logps.device, dtype=logps.dtype).clamp(min=1)
            losses = losses + self.sft_weight * (-logps[:k] / n_chosen)
        stats = {"reward_accuracy": float((margin > 0).sum()), "reward_margin": float(margin.detach().sum()),
                 "chosen_reward": float(chosen_reward.detach().sum()),
                 "rejected_reward": float(rejected_reward.detach().sum())}
        return losses.sum(), k, stats


@torch.no_grad()
def reference_logps(lm: CausalLMLoss, pairs: Sequence[PairExample], *, batch_size: int, batching: str,
                    pad_id: int, share_prefix: bool, autocast) -> torch.Tensor:
    """[n_pairs, 2] (chosen, rejected) log-probabilities under the model as it is now (eval mode)."""
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for s in range(0, len(pairs), batch_size):
        part = pairs[s : s + batch_size]
        b = collate_pairs(part, batching, pad_id, share_prefix).to(device)
        with autocast():
            logps = sequence_logps(lm, b, b.counts).double().cpu()
        out[s : s + len(part), 0] = logps[: len(part)]
        out[s : s + len(part), 1] = logps[len(part) :]
    lm.train(was_training)
    return out


def save_reference(path: Path, logps: torch.Tensor, pairs: Sequence[PairExample]) -> None:
    atomic_write_json(path, {"pairs": len(pairs), "lines": [p.line for p in pairs], "logps": logps.tolist()})


def load_reference(path: Path, pairs: Sequence[PairExample]) -> torch.Tensor | None:
    """The saved reference when it belongs to these pairs (same count and lines), else None."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("pairs") != len(pairs) or data.get("lines") != [p.line for p in pairs]:
        return None
    return torch.tensor(data["logps"], dtype=torch.float64)


def disable_dropout(model: nn.Module) -> int:
    """p = 0 in every dropout layer (the policy's log-probabilities must be comparable with the
    reference's, computed without dropout; TRL's DPO does the same by default). Returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p:
            m.p = 0.0
            n += 1
    return n
