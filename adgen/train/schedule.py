"""How long the run is and the learning rate of each step: `Schedule`, and the time budget that may shorten it.

`Schedule` owns the number of steps (`total_steps`), the warmup and the LR scheduler's multipliers. Nothing
else writes them: the time budget (`TimeBudget`, `max_minutes`) calls `shorten_to(steps)`, which re-plans
the warmup and the LR curve to end there; early stopping calls `stop_at(step)`, which ends the run at that
step and leaves the curve as it was. Everything that reports the run's length (the log lines, summary.json)
reads `total_steps` from here.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from adgen.train.collate import DataOrder
    from adgen.train.config import TrainConfig

BUDGET_PROBE_STEPS = 3  # steps timed before a time budget re-plans the run


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total)


def steps_in_budget(cfg: TrainConfig, step: int, total: int, elapsed: float, per_step: float) -> int:
    """The last step that fits cfg.max_minutes: `elapsed` seconds are spent after `step` steps, and each
    further step takes `per_step` (measured without the first step, which pays one-time costs)."""
    fit = step + int((cfg.max_minutes * 60 - elapsed) / per_step) if per_step > 0 else total
    return max(step, min(total, fit))


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """The LR multiplier per step. Not `transformers.get_scheduler`: after warmup it is the same curve
    (cosine / cosine_with_min_lr / linear / constant_with_warmup; tests/test_lr_schedule.py checks it step by
    step), but its warmup starts at 0, so the first optimizer step trains at lr 0 -- one wasted step of the
    demo's ~15 on a slow CPU (warmup_steps 1) -- and its linear schedule has no floor (min_lr_ratio)."""

    def fn(step: int) -> float:  # `step` = optimizer steps taken so far
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(min_ratio, 1.0 - progress * (1.0 - min_ratio))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


class Schedule:
    """The run's steps and LR curve; `scheduler` is the torch LambdaLR a checkpoint saves and restores."""

    def __init__(self, cfg: TrainConfig, optimizer: Optimizer, total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.warmup = warmup_steps(cfg, total_steps)
        self.scheduler = LambdaLR(optimizer, self._curve())

    @classmethod
    def planned(cls, cfg: TrainConfig, optimizer: Optimizer, order: DataOrder) -> Schedule:
        """max_steps, or the steps that `epochs` passes over the data take."""
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.num_examples / order.examples_per_step))
        return cls(cfg, optimizer, total)

    def _curve(self) -> Callable[[int], float]:
        return lr_lambda(self.cfg.lr_scheduler, self.warmup, self.total_steps, self.cfg.min_lr_ratio)

    @property
    def lr(self) -> float:
        """The learning rate of the step about to be taken."""
        return self.scheduler.get_last_lr()[0]

    def step_taken(self, *, skipped: bool) -> None:
        """After the optimizer's step: the curve advances unless the step was skipped (fp16 overflow)."""
        if not skipped:
            self.scheduler.step()

    def shorten_to(self, steps: int) -> None:
        """End the run after `steps` steps, with the warmup and the LR curve re-planned to end there."""
        self.total_steps = steps
        self.warmup = warmup_steps(self.cfg, steps)
        if self.cfg.warmup_steps is not None:  # a fixed warmup must leave a step to decay in
            self.warmup = min(self.warmup, max(0, steps - 1))
        self.scheduler.lr_lambdas = [self._curve() for _ in self.scheduler.lr_lambdas]

    def stop_at(self, step: int) -> None:
        """End the run at `step` (early stopping decided there); the LR curve is not re-planned."""
        self.total_steps = step


class TimeBudget:
    """`max_minutes`: after BUDGET_PROBE_STEPS steps, shorten the schedule to the steps that fit."""

    def __init__(self, cfg: TrainConfig, schedule: Schedule, start_step: int) -> None:
        self.cfg, self.schedule, self.start_step = cfg, schedule, start_step
        self.t0 = self.first_step_end = time.perf_counter()

    def after_step(self, step: int) -> bool:
        """True when this step's measurement shortened the schedule."""
        if not self.cfg.max_minutes:
            return False
        if step == self.start_step + 1:
            self.first_step_end = time.perf_counter()
        if step != self.start_step + BUDGET_PROBE_STEPS:
            return False
        now = time.perf_counter()
        per_step = (now - self.first_step_end) / (BUDGET_PROBE_STEPS - 1)
        planned = steps_in_budget(self.cfg, step, self.schedule.total_steps, now - self.t0, per_step)
        if planned >= self.schedule.total_steps:
            return False
        self.schedule.shorten_to(planned)
        return True
