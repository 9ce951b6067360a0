"""The typed pieces of a training run, one job each.

What the setup stages build, in order, never replaced afterwards:
    RunContext    setup_run: config, run directory, accelerate's processes, precision, the checkpoint to resume,
                  and `resolved` (the decisions each stage takes, as summary.json reports them)
    TrainData     setup_data: tokenizer, chat formatter, encoded train / eval examples, generation records
    ModelSetup    setup_model: the model with its method applied, how examples become rows (`RowLayout`)
    Optimization  setup_optimization: loss module (as accelerate prepared it), optimizer, data order, schedule
    TrainSetup    all of the above and the objective (SFT / DPO): what the loop and the evaluations read

What the loop changes: `Progress` (step, counters, metrics rows, the log window, last checkpoint and eval),
which is what a checkpoint saves (`trainer_state`) and a resume restores (`Progress.resumed`).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from tqdm.auto import tqdm

from adgen.errors import AdgenError
from adgen.metrics import AttributeVocab

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from adgen.data.chat import ChatFormatter, EncodeStats, Example
    from adgen.data.records import Record
    from adgen.models import ResolvedModel
    from adgen.train.checkpoint import CheckpointInfo
    from adgen.train.collate import DataOrder
    from adgen.train.config import TrainConfig
    from adgen.train.dpo import PairExample
    from adgen.train.objective import Objective
    from adgen.train.peft_setup import Precision
    from adgen.train.schedule import Schedule


class TrainingDiverged(AdgenError):
    """The loss became NaN/inf; the run stopped and kept its last good checkpoint."""


@dataclass
class TrainResult:
    output_dir: Path
    status: str
    steps: int
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.metrics if "loss" in r]


class Printer:
    """Messages for people: main process only, on stderr, above the progress bar."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg, file=sys.stderr)


@dataclass(frozen=True)
class RunContext:
    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    say: Printer
    precision: Precision
    resume_from: CheckpointInfo | None = None
    resolved: dict[str, Any] = field(default_factory=dict)  # precision, batching, attention, parameters, logits

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def sum_over_processes(self, values: list[float]) -> list[float]:
        """`values` summed element-wise over every process (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()


@dataclass(frozen=True)
class TrainData:
    resolved_model: ResolvedModel
    tokenizer: PreTrainedTokenizerBase
    formatter: ChatFormatter
    train_records: list[Record]
    train_examples: Sequence[Example] | Sequence[PairExample]  # what the objective trains on
    stats: EncodeStats  # truncated / dropped training examples
    train_source: str  # where the attribute vocabulary comes from (summary, attribute_vocab.json)
    eval_records: list[Record] = field(default_factory=list)
    eval_examples: list[Example] = field(default_factory=list)
    gen_records: list[Record] = field(default_factory=list)  # the first eval records, for generation metrics

    @cached_property
    def vocab(self) -> AttributeVocab:
        """The attribute vocabulary of the training records (generation metrics, attribute_vocab.json), built once."""
        return AttributeVocab.from_records(self.train_records, source=self.train_source)


@dataclass(frozen=True)
class RowLayout:
    """How a micro-batch's examples become rows, decided once in setup_model."""

    batching: str  # packed | grouped | padded
    pad_id: int
    share_prefix: bool = False  # the common prompt start once per packed row (adgen's per-example attention)


@dataclass(frozen=True)
class ModelSetup:
    model: nn.Module  # the model with its method applied (PeftModel or the model itself)
    layout: RowLayout
    # LoRA under bf16 autocast: PEFT's cast of each adapter's input to the adapter's fp32 (which autocast casts right
    # back to bf16) is switched off for the training forward; same values, two fewer activation copies per adapter
    lora_inputs_uncast: bool = False
    notes: list[str] = field(default_factory=list)  # what setup changed from the config, and why


@dataclass(frozen=True)
class Optimization:
    loss_module: nn.Module  # CausalLMLoss or DPOLoss, as built
    wrapped: nn.Module  # the loss module as accelerate prepared it (what trains)
    eval_loss_module: nn.Module  # the token cross-entropy of the references (DPO runs too)
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # trainable parameters, for clipping (FSDP2: the sharded ones)
    order: DataOrder
    schedule: Schedule


@dataclass(frozen=True)
class TrainSetup:
    run: RunContext
    data: TrainData
    net: ModelSetup
    opt: Optimization
    objective: Objective

    @property
    def cfg(self) -> TrainConfig:
        return self.run.cfg


@dataclass
class Counters:
    tokens: int = 0
    padded: int = 0
    examples: int = 0
    train_time: float = 0.0


@dataclass
class LogWindow:
    """Sums since the last metrics row: target-weighted loss, targets, the objective's extra figures (DPO)."""

    loss: float = 0.0
    targets: float = 0
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Progress:
    step: int = 0
    start_step: int = 0
    status: str = "completed"  # | early_stopped | diverged
    metrics: list[dict[str, Any]] = field(default_factory=list)  # the rows of metrics.jsonl
    counters: Counters = field(default_factory=Counters)
    window: LogWindow = field(default_factory=LogWindow)
    last_checkpoint: str | None = None
    last_eval: float | None = None

    @classmethod
    def resumed(cls, state: dict[str, Any], checkpoint: Path) -> Progress:
        """From a checkpoint's trainer_state.json."""
        return cls(step=state["step"], start_step=state["step"], metrics=state["metrics"],
                   counters=Counters(**state["counters"]), last_checkpoint=str(checkpoint))

    def trainer_state(self, *, examples_per_step: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint saves (trainer_state.json); the data position is a function of the step."""
        return {"step": self.step, "data_position": self.step * examples_per_step, "world_size": world,
                "counters": asdict(self.counters), "metrics": self.metrics, "config": config}
