"""The LR schedule against transformers' own schedules (why adgen keeps its own: the warmup)."""

import pytest
import torch
from transformers import get_scheduler

from adgen.train.schedule import lr_lambda

WARMUP, TOTAL = 5, 40


def _transformers_lrs(name: str, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(name, opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL, **kwargs)
    lrs = []
    for _ in range(TOTAL):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("kind,name,min_ratio,kwargs", [
    ("cosine", "cosine", 0.0, {}),
    ("cosine", "cosine_with_min_lr", 0.1, {"scheduler_specific_kwargs": {"min_lr_rate": 0.1}}),
    ("linear", "linear", 0.0, {}),
    ("constant", "constant_with_warmup", 0.0, {}),
])
def test_schedule_is_transformers_after_warmup_and_never_trains_at_lr_zero(kind, name, min_ratio, kwargs):
    ours = lr_lambda(kind, WARMUP, TOTAL, min_ratio)
    theirs = _transformers_lrs(name, **kwargs)
    for step in range(WARMUP, TOTAL):  # the decay: the library's curve, step for step
        assert ours(step) == pytest.approx(theirs[step], abs=1e-12), step
    # the warmup: transformers' first step runs at lr 0 (a wasted step); ours is one step ahead of it
    assert theirs[0] == 0.0
    for step in range(WARMUP):
        assert ours(step) == pytest.approx(theirs[step + 1]) and ours(step) > 0


def test_linear_schedule_keeps_its_floor():
    ours = lr_lambda("linear", WARMUP, TOTAL, 0.2)
    assert ours(TOTAL - 1) >= 0.2 and ours(TOTAL) == pytest.approx(0.2)
