"""Sharded training (FSDP / DeepSpeed): what accelerate leaves out.

- `shards_weights`: whether this run's weights are sharded (FSDP / DeepSpeed).
- `fill_deepspeed_plugin` / `fill_deepspeed_config`: the DeepSpeed JSON's "auto" values, including the ones
  accelerate fills from `model.config.hidden_size`, which it cannot find on the loss module the trainer prepares.
- `gather_trainable`: the trainable (adapter) weights whole, without gathering the full state dict.
- FSDP on CPU processes (gloo), below.

accelerate (1.x) switches to FSDP only for GPU-like devices; CPU processes launched with an FSDP config
(`configs/accelerate/fsdp-cpu.yaml`) would silently train as plain DDP. PyTorch's FSDP2 (`fully_shard`)
does run on CPU tensors over gloo, so we turn the accelerate state to FSDP with the plugin that the launch
environment describes; `accelerator.prepare`, `save_state` / `load_state` (sharded checkpoints through
torch.distributed.checkpoint), `get_state_dict` and `clip_grad_norm_` then take their FSDP2 paths.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

from adgen.errors import ConfigError

if TYPE_CHECKING:
    from adgen.train.config import TrainConfig


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Make `accelerator` shard with FSDP2 when FSDP was asked for and the processes run on CPUs.

    Returns True when it did. Call it right after creating the Accelerator, before `prepare`."""
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested():
        return False
    plugin = FullyShardedDataParallelPlugin()  # fsdp_* settings from the launch environment
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU processes needs FSDP2: set fsdp_version: 2 in the accelerate config "
                          "(configs/accelerate/fsdp-cpu.yaml)")
    if plugin.cpu_ram_efficient_loading:
        # rank 0 loads, the others get empty weights and a broadcast: not wired for adgen's own loader
        raise ConfigError("fsdp_cpu_ram_efficient_loading: true is for GPUs; set it to false for CPU processes "
                          "(configs/accelerate/fsdp-cpu.yaml)")
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # As accelerate does for GPUs: a later AcceleratorState() copies PartialState's fields over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def full_state_dict(accelerator, wrapped) -> dict:
    """`accelerator.get_state_dict(wrapped)` with every tensor whole, under the model's own names (the loss
    module's "model." prefix removed); {} where accelerate returns nothing (DeepSpeed's other processes).

    On CPU meshes (torch 2.13, accelerate 1.15) FSDP2's gathered state dict still holds DTensors (which
    safetensors cannot write); `full_tensor()` gathers them. It is a collective: every process calls this,
    with the same keys in the same order."""
    state = accelerator.get_state_dict(wrapped) or {}
    return {k.removeprefix("model."): v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def shards_weights(accelerator) -> bool:
    """FSDP / DeepSpeed: each process holds a part of the weights (ZeRO-1/2: of the optimizer state)."""
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


# accelerate's `_prepare_deepspeed` fills these from `model.config.hidden_size` when they are "auto"
# (the values HF uses): hidden^2, 0.9 hidden^2, 10 hidden
DEEPSPEED_HIDDEN_SIZE_KEYS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def hidden_size_of(model) -> int | None:
    """The hidden size accelerate would read: config.hidden_size, else the largest of config.hidden_sizes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "hidden_size", None):
        return int(config.hidden_size)
    sizes = getattr(config, "hidden_sizes", None)
    return int(max(sizes)) if sizes else None


def fill_deepspeed_config(ds: dict[str, Any], *, batch_size: int, grad_accum: int, max_grad_norm: float,
                          num_processes: int, hidden_size: int | None) -> list[str]:
    """Replace the "auto" values of a DeepSpeed config in place: batch size, accumulation and clipping from the
    adgen config, and the bucket sizes from the base model's hidden size (accelerate would look for
    `model.config` on the prepared module, the loss wrapper, and raise). Returns the keys filled."""
    filled = []
    for key, value in {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
                       "gradient_clipping": max_grad_norm,
                       "train_batch_size": batch_size * grad_accum * num_processes}.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
            filled.append(key)
    zero = ds.get("zero_optimization") or {}
    auto = [k for k in DEEPSPEED_HIDDEN_SIZE_KEYS if zero.get(k) == "auto"]
    if auto and not hidden_size:
        raise ConfigError(f"the DeepSpeed config leaves zero_optimization {auto} as \"auto\" and this model's config "
                          "names no hidden_size: put integers there (e.g. hidden_size^2 for reduce_bucket_size)")
    for key in auto:
        zero[key] = DEEPSPEED_HIDDEN_SIZE_KEYS[key](hidden_size)
        filled.append(f"zero_optimization.{key}")
    return filled


def fill_deepspeed_plugin(accelerator, cfg: TrainConfig, model) -> list[str]:
    """A DeepSpeed launch: fill its config's "auto" values from `cfg` and `model` (call before `prepare`); DeepSpeed
    reads batch size / accumulation / clipping from its JSON. Returns the keys filled ([] without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return []
    return fill_deepspeed_config(plugin.deepspeed_config, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                 max_grad_norm=cfg.max_grad_norm, num_processes=accelerator.num_processes,
                                 hidden_size=hidden_size_of(model))


def _zero3_gathered(params: list):
    """DeepSpeed ZeRO-3 partitions parameters (they carry a ds_id): gather just these, read-only."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def gather_trainable(accelerator, model) -> dict:
    """name -> the whole trainable parameter on the CPU, on the main process (empty dict elsewhere).

    What a PEFT checkpoint / adapter needs, without `accelerator.get_state_dict`, which gathers every weight
    of the model (16 GB for an 8B model, to save an adapter of a few MB): FSDP2's DTensors are gathered one
    parameter at a time, DeepSpeed ZeRO-3 gathers just these parameters, and ZeRO-1/2 keep them whole anyway.
    A collective: every process calls it; the names are the model's own (`model.named_parameters()`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    main = accelerator.is_main_process
    out = {}
    with _zero3_gathered([p for _, p in named]):
        for name, p in named:
            t = p.detach()
            if isinstance(t, DTensor):
                t = t.full_tensor()  # every process takes part
            if main:
                out[name] = t.to("cpu", copy=True).contiguous()
    return out
