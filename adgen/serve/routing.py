"""Which model runs a request: the served model's scheduler, or the base model's own one (`adgen serve --base`).

A server started with `--base BASE` holds two whole models (a full or top-layers fine-tune and the model it
started from), each with its own generator and its own `Scheduler`, so both decode with continuous batching. The
request's `model` field names one; `ServeState.use_adapter_for` turns the base model's id into `use_adapter=False`,
the same vocabulary as an adapter switched off, so the API and the UI's compare view work alike for both kinds of
fine-tune. `ModelRouter` is the one front door the endpoints and the UI submit to (`complete`, `open_stream`);
the figures the server reports at start (the KV cache line, /v1/completions' engine check) are the served model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from adgen.serve.jobs import Completion, StreamHandle
from adgen.serve.scheduler import Scheduler

if TYPE_CHECKING:
    from adgen.generation.engine import DecodeEngine
    from adgen.generation.kv_budget import KVPlan


class ModelRouter:
    """The served model's scheduler (`tuned`: adapters included) and, with `--base`, the base model's (`base`)."""

    def __init__(self, tuned: Scheduler, base: Scheduler | None = None) -> None:
        self.tuned = tuned
        self.base = base

    def route(self, use_adapter: bool | str) -> tuple[Scheduler, bool | str]:
        """(the scheduler, the use_adapter it gets): the base model's id goes to the base model's scheduler, whose
        model has no adapter to switch off."""
        if use_adapter is False and self.base is not None:
            return self.base, True
        return self.tuned, use_adapter

    async def complete(self, prompts: list, config, *, use_adapter: bool | str = True, **kwargs: Any) -> list[Completion]:
        scheduler, use_adapter = self.route(use_adapter)
        return await scheduler.complete(prompts, config, use_adapter=use_adapter, **kwargs)

    def open_stream(self, prompts: list, config, *, use_adapter: bool | str = True) -> StreamHandle:
        scheduler, use_adapter = self.route(use_adapter)
        return scheduler.open_stream(prompts, config, use_adapter=use_adapter)

    # ---- the served model's figures ---------------------------------------------------------
    @property
    def engine(self) -> DecodeEngine | None:
        return self.tuned.engine

    @property
    def kv_plan(self) -> KVPlan | None:
        return self.tuned.kv_plan

    def kv_cache_info(self) -> dict[str, Any] | None:
        return self.tuned.kv_cache_info()

    def stats(self) -> dict[str, Any]:
        return self.tuned.stats()

    def close(self) -> None:
        self.tuned.close()
        if self.base is not None:
            self.base.close()


def first_of_two_utilization(utilization: float, device: str | torch.device) -> float:
    """The `--gpu-memory-utilization` the served model's scheduler sizes its KV cache with when a base model shares
    the card: half of what the two models' weights leave under the server's share. Its cache is allocated at once,
    so the base model's scheduler, sized next from what is then free under the full share, gets the other half.
    Elsewhere (a CPU: the cache grows on demand) the setting is unused and returned as it is."""
    device = torch.device(device)
    if device.type != "cuda":
        return utilization
    free, total = torch.cuda.mem_get_info(device)
    used = total - free  # both models' weights (and whatever else runs on the card)
    return min(utilization, (utilization * total + used) / (2 * total))
