"""FSDP on CPU processes (gloo): what accelerate leaves out.

accelerate (1.x) switches to FSDP only for GPU-like devices; CPU processes launched with an FSDP config
(`configs/accelerate/fsdp-cpu.yaml`) would silently train as plain DDP. PyTorch's FSDP2 (`fully_shard`)
does run on CPU tensors over gloo, so we turn the accelerate state to FSDP with the plugin that the launch
environment describes; `accelerator.prepare`, `save_state` / `load_state` (sharded checkpoints through
torch.distributed.checkpoint), `get_state_dict` and `clip_grad_norm_` then take their FSDP2 paths.
"""

from __future__ import annotations

import os

from adgen.errors import ConfigError


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Make `accelerator` shard with FSDP2 when FSDP was asked for and the processes run on CPUs.

    Returns True when it did. Call it right after creating the Accelerator, before `prepare`."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

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
    from accelerate.state import PartialState

    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # As accelerate does for GPUs: a later AcceleratorState() copies PartialState's fields over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def full_state_dict(accelerator, wrapped) -> dict:
    """`accelerator.get_state_dict(wrapped)` with every tensor whole, on every process.

    On CPU meshes (torch 2.13, accelerate 1.15) FSDP2's gathered state dict still holds DTensors (which
    safetensors cannot write); `full_tensor()` gathers them. It is a collective: every process calls this,
    with the same keys in the same order."""
    from torch.distributed.tensor import DTensor

    state = accelerator.get_state_dict(wrapped)
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()} if state else state
