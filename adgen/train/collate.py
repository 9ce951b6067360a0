"""Batches: padding-free packing, length-grouped padding, and the deterministic data order.

Targets are shifted *per example* before anything is concatenated: `targets[t]` is the label of
token t+1 of the same example, and the last token of every example has no target. So a packed row
never asks one example to predict the first token of the next, and the loss only needs the positions
where `targets != -100` (the LM head runs on those alone, see `adgen.train.loss`).

Packed rows: the `batch_size` examples of a micro-batch are concatenated into one row, with
`position_ids` restarting at 0 for each example and *no* attention mask. transformers (>= 5) reads the
restarts as packed-sequence boundaries: sdpa / eager / flex attention get a block-diagonal causal mask,
flash-attention its varlen kernel, so no token attends across examples (tests/test_gpu_paths_kernels.py
checks the per-token losses equal those of padded batches). For flash-attention the row also carries the
examples' boundaries (`cu_seq_lens`, `Batch.loss_kwargs`), which transformers would otherwise infer from the
positions in every layer with a host sync each. Packing changes the layout only, never which
examples form a step, so `batching` does not change what is optimised.

Data order: an endless stream of per-epoch permutations (seeded by `seed` + epoch); optimizer step s
uses stream positions [s*G, (s+1)*G) with G = batch_size * grad_accum * world_size. The position in
the data is therefore a function of the step alone, which makes resume exact.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from adgen.data.chat import IGNORE_INDEX, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # [rows, T]
    targets: torch.Tensor  # [rows, T], next-token labels, -100 where no loss
    position_ids: torch.Tensor | None  # packed rows: restarts per example (at the shared prefix length)
    attention_mask: torch.Tensor | None  # padded rows: 1 = real token
    num_examples: int
    num_tokens: int  # real (non-pad) tokens of the examples
    num_padded: int  # slots in the tensor (rows * T); for packed rows num_tokens + the fill up to ROW_MULTIPLE
    num_shared: int = 0  # prompt-prefix tokens computed once for several examples (not in the tensor)
    cu_seq_lens: torch.Tensor | None = None  # packed row without a shared prefix: [0, end of each example] (int32)
    max_seq_len: int = 0  # the longest of those examples (with the row's fill)

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device) -> "Batch":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            mv(self.input_ids), mv(self.targets), mv(self.position_ids), mv(self.attention_mask),
            self.num_examples, self.num_tokens, self.num_padded, self.num_shared, mv(self.cu_seq_lens),
            self.max_seq_len,
        )

    def loss_kwargs(self) -> dict:
        """Extra arguments of the loss module for this batch: for SFT, a packed row's `varlen_kwargs` (the loss
        module hands them to the model); for DPO see adgen.train.dpo."""
        return self.varlen_kwargs()

    def varlen_kwargs(self) -> dict:
        """transformers' flash-attention kwargs for a packed row (`FlashAttentionKwargs`): the examples' boundaries,
        so its varlen kernel needs no host sync to find them; other attentions ignore them. {} if not packed."""
        if self.cu_seq_lens is None:
            return {}
        return {"cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_seq_len, "max_length_k": self.max_seq_len}

    def model_inputs(self) -> dict:
        out = {"input_ids": self.input_ids, **self.varlen_kwargs()}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out


def shifted_targets(labels: Sequence[int]) -> list[int]:
    """labels[1:] + [-100]: the target of each position within one example."""
    return list(labels[1:]) + [IGNORE_INDEX]


MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a separate segment


def shared_prefix_length(examples: Sequence[Example]) -> int:
    """Tokens every example starts with, ending strictly inside every prompt (so no target is shared)."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    limit = min(_prompt_length(ex) for ex in examples) - 1
    n = 0
    while n < limit and all(ex.input_ids[n] == first[n] for ex in examples[1:]):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def _prompt_length(ex: Example) -> int:
    """Leading positions without a label (0 with loss_on=all)."""
    n = 0
    for label in ex.labels:
        if label != IGNORE_INDEX:
            break
        n += 1
    return n


# Packed rows are padded to a multiple of this many tokens. oneDNN builds (and caches) matmul kernels per shape:
# at a new row length each of a step's matmuls first paid ~7 ms to build one, and the cache grew the RSS.
ROW_MULTIPLE = 64


def pack(examples: Sequence[Example], share_prefix: bool = False, pad_id: int = 0,
         pad_to_multiple_of: int | None = None) -> Batch:
    """One row holding every example back to back; position ids restart per example; no padding.

    share_prefix: the prompt start that all examples have in common (chat header, system prompt) is
    put in the row once; each example's own tokens then continue its position ids from the prefix
    length, which tells `packed_attention` to let them attend to that prefix. Same logits and loss as
    one copy per example (the prefix sees only itself either way), for 1/n of the prefix's compute.
    Only valid with `adgen.train.packed_attention` active.

    pad_to_multiple_of: the last example is followed by `pad_id` tokens (positions continuing its own, no
    targets) up to a multiple of this length; being causal, no real token attends to them.
    """
    shared = shared_prefix_length(examples) if share_prefix else 0
    ids: list[int] = list(examples[0].input_ids[:shared])
    tgt: list[int] = [IGNORE_INDEX] * shared
    pos: list[int] = list(range(shared))
    for ex in examples:
        ids.extend(ex.input_ids[shared:])
        tgt.extend(shifted_targets(ex.labels)[shared:])
        pos.extend(range(shared, len(ex.input_ids)))
    fill = -len(ids) % pad_to_multiple_of if pad_to_multiple_of else 0
    ids.extend([pad_id] * fill)
    tgt.extend([IGNORE_INDEX] * fill)
    pos.extend(range(pos[-1] + 1, pos[-1] + 1 + fill))
    n = sum(len(ex.input_ids) for ex in examples)  # the examples' tokens, as if each had its own prefix
    ends = list(itertools.accumulate(len(ex.input_ids) for ex in examples))
    ends[-1] += fill  # the fill continues the last example's positions: part of it, as transformers sees it
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        targets=torch.tensor([tgt], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        attention_mask=None,
        num_examples=len(examples),
        num_tokens=n,
        num_padded=n + fill,
        num_shared=shared * (len(examples) - 1),
        # a shared prefix is continued by later examples: no varlen boundaries (only packed_attention handles it)
        cu_seq_lens=None if shared else torch.tensor([0, *ends], dtype=torch.int32),
        max_seq_len=0 if shared else max(b - a for a, b in zip([0, *ends], ends)),
    )


def pad(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int | None = None) -> Batch:
    """Right-padded rows with an attention mask (pad positions have target -100)."""
    longest = max(len(ex.input_ids) for ex in examples)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    rows = len(examples)
    input_ids = torch.full((rows, longest), pad_id, dtype=torch.long)
    targets = torch.full((rows, longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((rows, longest), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids)
        targets[i, :n] = torch.tensor(shifted_targets(ex.labels))
        mask[i, :n] = 1
    tokens = sum(len(ex.input_ids) for ex in examples)
    return Batch(input_ids, targets, None, mask, rows, tokens, rows * longest)


def collate(examples: Sequence[Example], batching: str, pad_id: int, share_prefix: bool = False) -> Batch:
    if batching == "packed":
        return pack(examples, share_prefix, pad_id, ROW_MULTIPLE)
    return pad(examples, pad_id)


class DataOrder:
    """Which examples each optimizer step / micro-batch / process gets; a pure function of the step.

    `grouped` sorts by length inside mega-batches of 64 micro-batches (then shuffles the micro-batches),
    so padded batches hold similar lengths while the order stays random at the batch level.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int,
        grad_accum: int,
        world_size: int = 1,
        seed: int = 0,
        batching: str = "packed",
        group_size: int = 64,
    ) -> None:
        if not lengths:
            raise ValueError("no examples to train on")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self.batching = batching
        self.group_size = group_size
        self._epochs: dict[int, list[int]] = {}

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(self.num_examples))
            rng.shuffle(order)
            if self.batching == "grouped":
                order = self._group(order, rng)
            self._epochs[epoch] = order
            for old in [e for e in self._epochs if e < epoch - 1]:
                del self._epochs[old]
        return self._epochs[epoch]

    def _group(self, order: list[int], rng: random.Random) -> list[int]:
        micro = self.batch_size * self.world_size  # what one micro-step consumes over all processes
        mega = micro * self.group_size
        chunks: list[list[int]] = []
        for start in range(0, len(order), mega):
            block = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            chunks.extend(block[j : j + micro] for j in range(0, len(block), micro))
        full = [c for c in chunks if len(c) == micro]
        rest = [i for c in chunks if len(c) != micro for i in c]
        rng.shuffle(full)
        return [i for c in full for i in c] + rest

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_examples)
        return self.epoch_order(epoch)[offset]

    def step_indices(self, step: int, rank: int = 0) -> list[list[int]]:
        """The micro-batches (lists of example indices) that process `rank` trains on at `step` (0-based)."""
        base = step * self.examples_per_step
        micro = self.batch_size * self.world_size
        out = []
        for m in range(self.grad_accum):
            start = base + m * micro + rank * self.batch_size
            out.append([self.index(p) for p in range(start, start + self.batch_size)])
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.examples_per_step / self.num_examples


def eval_batches(
    examples: Sequence[Example], batch_size: int, batching: str, pad_id: int, rank: int = 0, world: int = 1,
    share_prefix: bool = False,
):
    """Eval micro-batches for this process: length-sorted (least padding), sharded across processes."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    mine = order[rank::world]
    for start in range(0, len(mine), batch_size):
        yield collate([examples[i] for i in mine[start : start + batch_size]], batching, pad_id, share_prefix)
