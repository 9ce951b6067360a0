"""Loading a LoRA adapter into the running server (the web UI's "load the trained adapter"), beside the ones it
started with (`--adapter NAME=PATH`), without stopping it.

PEFT adds an adapter by inserting modules into the served model, and its mixed-adapter forward walks those same
modules (a hook per LoRA layer). The serving worker runs the model without a lock (it is the only thread that
does), so a `ForwardGate` makes the two take turns: a forward pre-hook takes its lock and a forward hook
(`always_call`: also when the forward raises) gives it back, on the PeftModel (whose forward walks the modules)
and on the model inside it (what `model.generate` calls). An adapter loads between two forwards: running
requests wait one load's time, and none sees a half-inserted adapter. A request can name the new adapter only
once it is in `ServeState.extra_adapters`, after the load.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from adgen.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch


class ForwardGate:
    """A re-entrant lock held for the length of every forward of `model` (and of the model it wraps)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lock = threading.RLock()
        self._handles = []
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        for module in {id(model): model, id(inner): inner}.values():
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, *_args) -> None:
        self.lock.acquire()

    def _leave(self, *_args) -> None:
        self.lock.release()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def can_load_adapters(generator) -> bool:
    """Further adapters load into a PeftModel served with a first (default) LoRA adapter."""
    return generator.adapter is not None and hasattr(generator.model, "load_adapter")


def check_new_adapter(generator, name: str, path: str | Path) -> None:
    """Refuse a name that is taken or unusable in the `model` field, and a directory that holds no adapter."""
    if not can_load_adapters(generator):
        raise ConfigError("this server cannot load adapters while it runs: it serves no LoRA adapter. Restart it with "
                          "the trained one: adgen serve --model MODEL --adapter RUN/adapter")
    if not name or not name.strip() or any(c.isspace() for c in name) or name in ("default", "__base__"):
        raise ConfigError(f"adapter name {name!r} cannot be used: pick a short name without spaces")
    if name in getattr(generator.model, "peft_config", {}):
        raise ConfigError(f"adapter name '{name}' is taken on this server: pick another")
    if not (Path(path) / "adapter_config.json").is_file():
        raise ModelError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")


def load_adapter_live(generator, gate: ForwardGate | None, name: str, path: str | Path) -> None:
    """Load the adapter at `path` as `name` between two forwards; the default adapter stays the active one."""
    check_new_adapter(generator, name, path)
    model = generator.model
    with generator.lock, (gate.lock if gate is not None else threading.RLock()):
        model.load_adapter(str(path), adapter_name=name)
        model.set_adapter("default")  # requests without a name keep the first adapter
