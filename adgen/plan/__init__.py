"""`adgen plan`: will a recipe fit a GPU? Parameters, trainable parameters and the memory of training and serving,
worked out on the meta device (no weights, no download, no GPU) before a GPU is rented.

    from adgen.plan import plan
    p = plan("llama3-8b-qlora", ["batch_size=4"])      # a dict; p["train_peak_bytes"], p["fits"], ...

The recipe is read by the loader `adgen train` uses; the model is built with `from_config` on the meta device and
the recipe's method is applied by the trainer's own `apply_method`, so the parameter counts are the real ones.
The memory figures are estimates by documented formulas (adgen/plan/memory.py) for one GPU with native bf16.
"""

from __future__ import annotations

from rich.table import Table

from adgen.errors import ConfigError
from adgen.plan.arch import ModelShape, config_summary, model_shape
from adgen.plan.memory import (
    CARDS_GIB,
    GIB,
    kv_bytes_per_token,
    serve_plan,
    train_breakdown,
)
from adgen.train.config import load_train_config

__all__ = ["plan", "plan_config", "kv_bytes_per_token", "model_shape", "ModelShape", "GIB"]


def _load(recipe: str | None, overrides):
    cfg = load_train_config(recipe, overrides)
    if not cfg.train_data and cfg.objective == "sft":
        cfg.train_data = "(not read by adgen plan)"  # validate() wants data; the plan never reads it
    if cfg.objective == "dpo" and not cfg.preference_data:
        cfg.preference_data = "(not read by adgen plan)"
    return cfg.validate()


def plan(recipe: str | None, overrides: list[str] | dict | None = None, *,
         gpu_memory_gib: float | None = None) -> dict:
    """The plan of a recipe (a shipped recipe's name or a YAML path) with `key=value` overrides."""
    return plan_config(_load(recipe, overrides), gpu_memory_gib=gpu_memory_gib, recipe=recipe)


def _cards(gpu_memory_gib: float | None) -> list[float]:
    cards: list[float] = list(CARDS_GIB)
    if gpu_memory_gib is not None:
        if not gpu_memory_gib > 0:
            raise ConfigError(f"--gpu-memory must be a size in GiB > 0 (e.g. 24), got {gpu_memory_gib!r}")
        if gpu_memory_gib not in cards:
            cards.append(gpu_memory_gib)
    return cards


def _card_key(gib: float) -> str:
    return f"{gib:g}"


def plan_config(cfg, *, gpu_memory_gib: float | None = None, recipe: str | None = None) -> dict:
    """The plan of a loaded TrainConfig (see `plan`)."""
    shape = model_shape(cfg)
    chosen = train_breakdown(shape, cfg)
    no_ckpt = train_breakdown(shape, cfg, checkpointing=False)
    ckpt = train_breakdown(shape, cfg, checkpointing=True)
    cards = _cards(gpu_memory_gib)
    serve_length = cfg.max_length
    serving = {_card_key(g): serve_plan(shape, int(g * GIB), serve_length) for g in cards}
    out = {
        "recipe": recipe,
        "model": cfg.model,
        "architecture": config_summary(shape),
        "method": cfg.method,
        "precision": chosen["dtypes"],
        "parameters": shape.parameters,
        "trainable_parameters": shape.trainable,
        "trainable_share": shape.trainable / max(shape.parameters, 1),
        "batch": {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "tokens": chosen["tokens"],
                  "batching": cfg.batching, "objective": cfg.objective},
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "train_peak_bytes": chosen["peak"],
        "train_peak_allocated_bytes": chosen["allocated"],  # comparable with torch.cuda.max_memory_allocated
        "train_breakdown": chosen["parts"],
        "activation_bytes_per_token_per_layer": chosen["activations"]["per_token_per_layer"],
        "train_peak_bytes_without_checkpointing": no_ckpt["peak"],
        "train_peak_bytes_with_checkpointing": ckpt["peak"],
        "fits": {_card_key(g): chosen["peak"] <= g * GIB for g in cards},
        "fits_with_checkpointing": {_card_key(g): ckpt["peak"] <= g * GIB for g in cards},
        "kv_bytes_per_token": kv_bytes_per_token(shape, 2),
        "serve": {"dtype": "bfloat16", "slot_length": serve_length, "cards": serving},
        "gpu_memory_gib": gpu_memory_gib,
        "assumptions": ASSUMPTIONS,
    }
    out["notes"] = _notes(out)
    return out


ASSUMPTIONS = [
    "one GPU with native bf16 (sm80+); precision auto -> bf16 autocast, trainable weights and AdamW state in fp32",
    "every example at max_length (the worst micro-batch; AdGen examples are ~150-300 Llama-3 tokens)",
    "transformers' decoder layers with sdpa on GPUs; the LM head fused with the loss in chunks of <= 96 MiB",
    "+5% caching-allocator slack and 0.5 GiB CUDA context on top of the allocated peak",
    "serving: bf16 weights, bf16 KV cache; each slot holds max_length positions (prompt + copy)",
]


def _notes(p: dict) -> list[str]:
    notes = []
    fits, with_ckpt = p["fits"], p["fits_with_checkpointing"]
    for card, ok in fits.items():
        if not ok and with_ckpt.get(card) and not p["gradient_checkpointing"]:
            notes.append(f"on a {card} GiB card: set gradient_checkpointing=true (peak "
                         f"{p['train_peak_bytes_with_checkpointing'] / GIB:.1f} GiB, ~30% slower steps)")
    if not any(fits.values()) and not any(with_ckpt.values()):
        notes.append("fits none of these cards: try method=qlora, a smaller batch_size / max_length, "
                     "or several GPUs (configs/accelerate/fsdp.yaml)")
    return notes


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def render(p: dict) -> Table:
    """The plan as a rich table (what `adgen plan` prints without --json)."""
    a = p["architecture"]
    t = Table(title=f"adgen plan: {p['recipe'] or p['model']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{p['model']} ({a['model_type']}, {a['layers']} layers, hidden {a['hidden']}, "
                       f"{a['heads']}/{a['kv_heads']} q/kv heads; {a['source']})")
    t.add_row("parameters", f"{p['parameters']:,}")
    t.add_row("trainable", f"{p['trainable_parameters']:,} ({100 * p['trainable_share']:.3f}%, {p['method']})")
    b = p["batch"]
    t.add_row("micro-batch", f"{b['batch_size']} x {b['max_length']} tokens ({b['tokens']} tokens, {b['batching']}"
                             f"{', DPO pairs' if b['objective'] == 'dpo' else ''}), precision {p['precision']}")
    ckpt = "on" if p["gradient_checkpointing"] else "off"
    t.add_row("training peak", f"[bold]{_gib(p['train_peak_bytes'])}[/bold] (gradient checkpointing {ckpt}; "
                               f"allocated {_gib(p['train_peak_allocated_bytes'])})")
    t.add_row("", ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in p["train_breakdown"].items() if v))
    t.add_row("checkpointing", f"off {_gib(p['train_peak_bytes_without_checkpointing'])}, "
                               f"on {_gib(p['train_peak_bytes_with_checkpointing'])}")
    t.add_row("fits", "  ".join(f"{card} GiB: {'yes' if ok else 'no'}" for card, ok in p["fits"].items()))
    t.add_row("KV cache", f"{p['kv_bytes_per_token']:,} bytes per token (bf16)")
    t.add_row("serving", "  ".join(f"{card} GiB: {s['slots']} slots x {s['slot_length']}" if s["fits"] else
                                   f"{card} GiB: does not fit" for card, s in p["serve"]["cards"].items()))
    for note in p["notes"]:
        t.add_row("note", note)
    t.add_row("assumes", "; ".join(p["assumptions"]))
    return t
