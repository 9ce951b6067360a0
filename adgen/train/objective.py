"""What the run optimises, chosen once at setup (`make_objective`): `SFTObjective` or `DPOObjective`.

An objective answers every question on which SFT and DPO differ, so the stages and the loop ask it and never
test the config: which examples it trains on (`read_train_data`), an example's length for the data order,
what it does to the model first (DPO: dropout off), the loss module and the language-model loss inside it
(logits selection, eval loss), what it computes before training (DPO: the reference log-probabilities),
a micro-batch's collation, and loss.png's labels. A new objective is a subclass, chosen in `make_objective`.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from adgen.data.chat import EncodeStats, encode_records
from adgen.data.records import Record, parse_columns, read_records
from adgen.errors import AdgenError
from adgen.train.collate import Batch, collate
from adgen.train.dpo import (
    REFERENCE_FILE,
    DPOLoss,
    PairExample,
    collate_pairs,
    disable_dropout,
    encode_pairs,
    load_reference,
    reference_logps,
    save_reference,
)
from adgen.train.loss import CausalLMLoss
from adgen.train.pairs import read_pairs

if TYPE_CHECKING:
    from adgen.data.chat import ChatFormatter, Example
    from adgen.train.config import TrainConfig
    from adgen.train.state import RowLayout, RunContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSet:
    records: list[Record]  # the records behind the examples (the attribute vocabulary comes from them)
    examples: Sequence[Example] | Sequence[PairExample]
    stats: EncodeStats
    described: str  # "train data: PATH" / "preference pairs: PATH", for the setup message


def read_split(path: str, cfg: TrainConfig, limit: int | None, what: str) -> list[Record]:
    """The records of a train / eval file, the first `limit` of them; skipped lines are logged."""
    columns = parse_columns(cfg.columns) if cfg.columns else None
    data = read_records(path, encoding=cfg.encoding, on_error=cfg.on_error, columns=columns)
    if data.skipped:
        log.warning("%s: %s", path, data.skip_summary())
    records = data.records[:limit] if limit else data.records
    if not records:
        raise AdgenError(f"{what} file {path} has no usable records")
    return records


class Objective(ABC):
    @abstractmethod
    def read_train_data(self, cfg: TrainConfig, formatter: ChatFormatter) -> TrainSet:
        """The encoded training examples."""

    @abstractmethod
    def example_length(self, example) -> int:
        """Tokens of one training example (the data order groups by it)."""

    def prepare_model(self, model: nn.Module) -> None:
        """Changes to the model before training (after its method is applied)."""

    @abstractmethod
    def build_loss(self, model: nn.Module, *, select_logits: bool, fused_head: bool) -> nn.Module:
        """The module accelerate prepares and the loop trains: forward(batch tensors, **batch.loss_kwargs()) ->
        (loss sum, normaliser, optionally {figure: sum} for the log)."""

    @abstractmethod
    def lm_loss(self, loss_module: nn.Module) -> CausalLMLoss:
        """The language-model loss in `loss_module`: it decides the logits selection."""

    @abstractmethod
    def eval_loss_module(self, loss_module: nn.Module, wrapped: nn.Module) -> nn.Module:
        """What computes the eval loss (the references' token cross-entropy)."""

    def after_prepare(self, run: RunContext, loss_module: nn.Module, examples: Sequence, layout: RowLayout) -> None:
        """After `prepare`, before a resume loads trained weights: what needs the starting model."""

    @abstractmethod
    def collate(self, examples: Sequence, idx: list[int], layout: RowLayout) -> Batch:
        """The micro-batch of `examples[i] for i in idx`."""

    @abstractmethod
    def plot_labels(self, cfg: TrainConfig) -> dict[str, str]:
        """loss.png's title (and y label)."""


class SFTObjective(Objective):
    """Token cross-entropy of the reference copy; the end-of-turn / stop-token targets count `end_token_weight`
    times (the chat format's stop ids, taken from the formatter the training data is encoded with)."""

    def __init__(self, end_token_weight: float = 1.0) -> None:
        self.end_token_weight = end_token_weight
        self.end_ids: tuple[int, ...] = ()  # set by read_train_data (the formatter's stop ids)

    def read_train_data(self, cfg: TrainConfig, formatter: ChatFormatter) -> TrainSet:
        records = read_split(cfg.train_data, cfg, cfg.max_samples, "training")
        examples, stats = encode_records(formatter, records)
        self.end_ids = tuple(formatter.stop_token_ids)
        described = f"train data: {cfg.train_data}"
        if self.end_token_weight != 1.0:
            names = ", ".join(formatter.tokenizer.convert_ids_to_tokens(list(self.end_ids)))
            described += f" (end-of-turn targets {names} weigh {self.end_token_weight:g}x in the loss)"
        return TrainSet(records, examples, stats, described)

    def example_length(self, example: Example) -> int:
        return len(example.input_ids)

    def build_loss(self, model: nn.Module, *, select_logits: bool, fused_head: bool) -> CausalLMLoss:
        if self.end_token_weight != 1.0 and not self.end_ids:
            raise RuntimeError("SFTObjective.build_loss before read_train_data: the stop ids to weight are unknown")
        return CausalLMLoss(model, select_logits=select_logits, fused_head=fused_head, end_ids=self.end_ids,
                            end_weight=self.end_token_weight)

    def lm_loss(self, loss_module: CausalLMLoss) -> CausalLMLoss:
        return loss_module

    def eval_loss_module(self, loss_module: nn.Module, wrapped: nn.Module) -> nn.Module:
        return wrapped

    def collate(self, examples: Sequence[Example], idx: list[int], layout: RowLayout) -> Batch:
        return collate([examples[i] for i in idx], layout.batching, layout.pad_id, layout.share_prefix)

    def plot_labels(self, cfg: TrainConfig) -> dict[str, str]:
        return {"title": f"{cfg.model} · {cfg.method}"}


class DPOObjective(Objective):
    """DPO on preference pairs (adgen.train.dpo), against the starting model's log-probabilities."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.beta, self.sft_weight = cfg.dpo_beta, cfg.dpo_sft_weight
        self.reference: torch.Tensor | None = None  # [pairs, 2], set by `after_prepare`

    def read_train_data(self, cfg: TrainConfig, formatter: ChatFormatter) -> TrainSet:
        pairs = read_pairs(cfg.preference_data)[: cfg.max_samples]
        examples, dropped = encode_pairs(formatter, pairs)
        truncated = sum(p.chosen.truncated for p in examples)  # (a rejected loop is cut by design)
        records = [Record(p.content, p.chosen, p.line) for p in pairs]
        stats = EncodeStats(total=len(pairs), truncated=truncated, dropped=dropped)
        return TrainSet(records, examples, stats, f"preference pairs: {cfg.preference_data}")

    def example_length(self, example: PairExample) -> int:
        return len(example)

    def prepare_model(self, model: nn.Module) -> None:
        disable_dropout(model)  # policy and reference log-probabilities must be computed alike

    def build_loss(self, model: nn.Module, *, select_logits: bool, fused_head: bool) -> DPOLoss:
        return DPOLoss(model, beta=self.beta, sft_weight=self.sft_weight, select_logits=select_logits,
                       fused_head=fused_head)

    def lm_loss(self, loss_module: DPOLoss) -> CausalLMLoss:
        return loss_module.lm

    def eval_loss_module(self, loss_module: DPOLoss, wrapped: nn.Module) -> nn.Module:
        return loss_module.lm  # the SFT eval loss, through the plain LM loss inside the DPO module

    def after_prepare(self, run: RunContext, loss_module: DPOLoss, examples: Sequence[PairExample],
              layout: RowLayout) -> None:
        """[pairs, 2] reference log-probabilities: computed from the starting model and saved with the run,
        or read back on resume (the model has trained since, so it can no longer give them)."""
        path = run.out / REFERENCE_FILE
        self.reference = load_reference(path, examples)
        if self.reference is not None:
            return
        if run.resume_from is not None:
            raise AdgenError(f"{path}: missing or made for other pairs, so this DPO run cannot resume with its "
                             "reference. Start the run afresh (--overwrite) or restore that file")
        t = time.perf_counter()
        self.reference = reference_logps(loss_module.lm, examples, batch_size=run.cfg.batch_size,
                                         batching=layout.batching, pad_id=layout.pad_id,
                                         share_prefix=layout.share_prefix, autocast=run.accelerator.autocast)
        if run.main:
            save_reference(path, self.reference, examples)
        run.say(f"[adgen] DPO reference: log-probabilities of {len(examples)} pairs from the starting model "
                f"({time.perf_counter() - t:.1f}s) -> {path}")

    def collate(self, examples: Sequence[PairExample], idx: list[int], layout: RowLayout) -> Batch:
        ref = None
        if self.reference is not None:
            ref = torch.cat([self.reference[idx, 0], self.reference[idx, 1]]).float()
        return collate_pairs([examples[i] for i in idx], layout.batching, layout.pad_id, layout.share_prefix, ref)

    def plot_labels(self, cfg: TrainConfig) -> dict[str, str]:
        return {"title": f"{cfg.model} · {cfg.method} · DPO",
                "ylabel": "train: DPO loss (+ sft_weight x NLL); eval: token cross-entropy"}


def make_objective(cfg: TrainConfig) -> Objective:
    # (DPO refuses end_token_weight != 1 in TrainConfig.validate: its loss compares whole-response log-probabilities)
    return DPOObjective(cfg) if cfg.objective == "dpo" else SFTObjective(cfg.end_token_weight)
