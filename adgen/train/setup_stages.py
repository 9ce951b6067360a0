"""The setup stages of a training run, each building one typed piece (adgen.train.state) from the ones before:

    setup_run          -> RunContext     processes and device (accelerate), precision, run directory, resume point
    setup_data         -> TrainData      tokenizer, chat formatter, encoded train (objective's) and eval examples
    setup_model        -> ModelSetup     base model, training method, batching and attention kernel, CPU speedups
    setup_optimization -> Optimization   optimizer, data order, schedule, loss module (logits selection decided
                                         here), accelerate's prepare, the objective's after_prepare (DPO reference)

The decisions they take go to `RunContext.resolved` (summary.json's "resolved"), never switched later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from adgen.config import save_config
from adgen.data.chat import ChatFormatter, encode_records, resolve_system_prompt
from adgen.errors import AdgenError
from adgen.models import load_tokenizer, resolve_model
from adgen.train import checkpoint as ckpt_mod
from adgen.train import packed_attention, tracking
from adgen.train.collate import DataOrder
from adgen.train.fast_dropout import use_fast_dropout
from adgen.train.fsdp_cpu import enable_fsdp_on_cpu, fill_deepspeed_plugin, shards_weights
from adgen.train.lean_layers import make_layers_lean
from adgen.train.objective import read_split
from adgen.train.peft_setup import (
    INITIAL_ADAPTER_DIR,
    add_neftune_noise,
    apply_method,
    count_parameters,
    load_base_model,
    optimizer_groups,
    resolve_device,
    resolve_precision,
    rewrites_base,
    save_initial_adapter,
)
from adgen.train.run_dir import prepare_output_dir
from adgen.train.schedule import Schedule
from adgen.train.state import ModelSetup, Optimization, Printer, RowLayout, RunContext, TrainData

if TYPE_CHECKING:
    from adgen.train.config import TrainConfig
    from adgen.train.objective import Objective
    from adgen.train.peft_setup import Precision

LOGITS_AT_FIRST_STEP = "decided at the first step"


# ---- processes -----------------------------------------------------------------------------------


def launched() -> bool:
    """Started by accelerate launch / torchrun: each process's device comes from LOCAL_RANK."""
    return "LOCAL_RANK" in os.environ


def reset_accelerate_state() -> None:
    """Forget a previous Accelerator's settings (the process group, if any, is kept). A single process also
    forgets its device, so a second train() in one process runs where its own config says."""
    single = not launched() and not (dist.is_available() and dist.is_initialized())
    AcceleratorState._reset_state(reset_partial_state=single)
    GradientState._reset_state()


def make_accelerator(cfg: TrainConfig, device: str, precision: Precision, out: Path) -> Accelerator:
    """The Accelerator for `device` ("cpu", "cuda", "cuda:N"). A single process on cuda:N gets cuda:N as
    `accelerator.device` (accelerate's own default there is plain "cuda"), so that the model is loaded on the
    GPU the steps run on, and accelerate's 4-bit placement check agrees."""
    pinned = device.startswith("cuda:") and not launched()
    if pinned:
        torch.cuda.set_device(torch.device(device))
    before = os.environ.get("ACCELERATE_TORCH_DEVICE")
    if pinned:
        os.environ["ACCELERATE_TORCH_DEVICE"] = device  # read once, when the process state is created
    try:
        return Accelerator(
            cpu=device == "cpu", mixed_precision=precision.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
            **tracking.accelerator_kwargs(cfg, out),
        )
    finally:
        if pinned and before is None:
            os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
        elif pinned:
            os.environ["ACCELERATE_TORCH_DEVICE"] = before


def setup_run(cfg: TrainConfig, *, resume: str | bool | None, overwrite: bool) -> RunContext:
    """Processes, device and precision (accelerate), the run directory, the checkpoint to resume."""
    out = Path(cfg.output_dir)
    device = resolve_device(cfg.device, launched=launched())  # an explicit device that is not there: ConfigError
    precision = resolve_precision(cfg, device)
    reset_accelerate_state()  # a second train() in one process may use another precision / device
    accelerator = make_accelerator(cfg, device, precision, out)
    enable_fsdp_on_cpu(accelerator)  # accelerate would run an FSDP launch on CPUs as plain DDP
    resuming = resume not in (None, False)
    if accelerator.is_main_process:
        prepare_output_dir(out, overwrite=overwrite, resume=resuming)
    accelerator.wait_for_everyone()
    run = RunContext(cfg=cfg, out=out, accelerator=accelerator, say=Printer(accelerator.is_main_process),
                     precision=precision, resume_from=ckpt_mod.resolve_resume(out, resume) if resuming else None)
    if run.main:
        if resuming:
            ckpt_mod.clean_partial(out)
        save_config(cfg, out / "config.yaml")
    tracking.start(accelerator, cfg)
    return run


# ---- data ----------------------------------------------------------------------------------------


def setup_data(run: RunContext, objective: Objective) -> TrainData:
    """Tokenizer, chat formatter, the objective's encoded training examples, eval examples and records."""
    cfg = run.cfg
    with run.accelerator.main_process_first():  # built-in models are converted once, by one process
        resolved_model = resolve_model(cfg.model)
    tokenizer = load_tokenizer(resolved_model, trust_remote_code=cfg.trust_remote_code)
    formatter = ChatFormatter(tokenizer, system_prompt=resolve_system_prompt(cfg.system_prompt),
                              loss_on=cfg.loss_on, max_length=cfg.max_length)
    train_set = objective.read_train_data(cfg, formatter)
    run.say(f"[adgen] {train_set.described}: {train_set.stats.summary()}")
    if not train_set.examples:
        raise AdgenError(f"no training example fits max_length={cfg.max_length}: raise max_length")
    eval_records, eval_examples = [], []
    if cfg.eval_data:
        eval_records = read_split(cfg.eval_data, cfg, cfg.max_eval_samples, "eval")
        eval_examples, estats = encode_records(formatter, eval_records)
        run.say(f"[adgen] eval data: {cfg.eval_data}: {estats.summary()}")
    gen_records = [r for r in eval_records if r.summary][: cfg.gen_eval_samples] if cfg.gen_eval_every else []
    return TrainData(resolved_model, tokenizer, formatter, train_set.records, train_set.examples, train_set.stats,
                     train_source=str(cfg.train_data), eval_records=eval_records, eval_examples=eval_examples,
                     gen_records=gen_records)


# ---- model ---------------------------------------------------------------------------------------


def cpu_speedups(cfg: TrainConfig, device: torch.device, *, sharded: bool) -> dict[str, bool]:
    """Which of the CPU-only speedups this run sets up. Each was written and measured for CPUs (docs/BENCHMARK_NOTES.md section 8);
    a CUDA model keeps transformers' kernels (sdpa / flash-attention with per-sample position_ids for packed
    rows) and CUDA's own dropout. (The heap trim is gated in `memory.heap_trimmer` by the same device test.)"""
    cpu = device.type == "cpu"
    return {"packed_attention": cpu, "lean_layers": cpu and cfg.lean_layers and not sharded,
            "fast_dropout": cpu and cfg.fast_dropout}


def setup_model(run: RunContext, data: TrainData, objective: Objective) -> ModelSetup:
    """The base model, the training method on it, and the batching / attention the run will use."""
    cfg = run.cfg
    set_seed(cfg.seed)
    sharded = shards_weights(run.accelerator)  # FSDP / DeepSpeed: their own placement, hooks and dtype handling
    base = load_base_model(cfg, str(data.resolved_model.path), run.precision, run.device, sharded=sharded)
    model = apply_method(base, cfg, run.precision)
    if rewrites_base(cfg) and run.main and not (run.out / INITIAL_ADAPTER_DIR).is_dir():
        save_initial_adapter(model, run.out / INITIAL_ADAPTER_DIR)  # PiSSA / OLoRA: to convert the result on save
    if cfg.neftune_alpha:
        add_neftune_noise(model, cfg.neftune_alpha)
    objective.prepare_model(model)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise AdgenError("nothing to train: no parameter requires gradients (check the method / target modules)")
    speedups = cpu_speedups(cfg, run.device, sharded=sharded)
    notes: list[str] = []
    layout, attention = choose_batching(cfg, base, data.tokenizer.pad_token_id, notes,
                                        per_example_attention=speedups["packed_attention"])
    uncast = cfg.method == "lora" and run.precision.mixed_precision == "bf16" and not sharded
    if speedups["lean_layers"] and make_layers_lean(base):
        attention += ", lean norm / MLP blocks"
    if speedups["fast_dropout"] and use_fast_dropout(model):
        attention += ", fast adapter dropout"
    for n in notes:
        run.say(f"[adgen] note: {n}")
    run.resolved.update(precision=run.precision.name, batching=layout.batching, attention=attention,
                        trainable_parameters=trainable, total_parameters=total)
    run.say(
        f"[adgen] model {cfg.model} ({data.resolved_model.kind}), method {cfg.method}, precision {run.precision.name}, "
        f"batching {layout.batching}, attention {attention}, {run.world} process(es) on {run.device.type}; trainable "
        f"{trainable:,} / {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)"
    )
    return ModelSetup(model, layout, lora_inputs_uncast=uncast, notes=notes)


def choose_batching(cfg: TrainConfig, base: torch.nn.Module, pad_id: int, notes: list[str], *,
                    per_example_attention: bool = True) -> tuple[RowLayout, str]:
    """Decide packed vs padded rows and the attention kernel once: (the rows' layout, the attention's name);
    why packing was turned off goes to `notes`.

    Packed rows on a CPU go to adgen's per-example attention (`per_example_attention`); elsewhere (GPUs) to the
    model's own attention (sdpa, or flash_attention_2 when set), which transformers keeps within each example
    from the per-sample position_ids (no attention mask is passed for packed rows)."""
    batching = cfg.batching
    if batching == "packed" and cfg.method == "prefix":
        batching = "grouped"
        notes.append(
            "prefix tuning: packing is off (the trained prefix is a key/value cache, and transformers only "
            "separates packed samples without one); using length-grouped padded batches"
        )
    elif batching == "packed" and cfg.trust_remote_code:
        batching = "grouped"
        notes.append("remote-code model: its attention may ignore per-sample position ids, so packing is off; "
                     "using length-grouped padded batches")
    attention = getattr(base.config, "_attn_implementation", None) or "default"
    if batching != "packed":
        return RowLayout(batching, pad_id), attention
    if not per_example_attention or cfg.attn_implementation:
        return RowLayout(batching, pad_id), f"{attention}, packed rows kept apart by per-sample position_ids"
    share_prefix = False  # the common prompt start once per packed row: needs our per-example attention
    if packed_attention.enable_packed_attention(base):
        share_prefix = cfg.share_prompt_prefix and cfg.loss_on == "response"
        attention = "per-example" + (", shared prompt prefix" if share_prefix else "")
    return RowLayout(batching, pad_id, share_prefix), attention


# ---- optimisation --------------------------------------------------------------------------------


def setup_optimization(run: RunContext, data: TrainData, net: ModelSetup, objective: Objective) -> Optimization:
    """Optimizer, data order, schedule, loss module (logits selection decided here), prepare, the objective's start."""
    cfg, model = run.cfg, net.model
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, cfg), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
    )
    order = DataOrder(
        [objective.example_length(e) for e in data.train_examples], batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, world_size=run.world, seed=cfg.seed, batching=net.layout.batching,
    )
    schedule = Schedule.planned(cfg, optimizer, order)
    fill_deepspeed_plugin(run.accelerator, cfg, model)  # before prepare: the prepared loss module has no config
    sharded = shards_weights(run.accelerator)
    fused = cfg.fused_head_loss and not sharded  # the head's weight must be whole
    loss_module = objective.build_loss(model, select_logits=cfg.target_logits_only, fused_head=fused)
    if sharded and run.device.type != "cpu":
        # the weights wait on the CPU (FSDP rank > 0: on meta) for prepare to shard them onto the GPUs: the first
        # training forward decides (CausalLMLoss probes there), and the loop records what it decided
        run.resolved["logits"] = LOGITS_AT_FIRST_STEP
    else:
        probe = objective.collate(data.train_examples, order.step_indices(0, run.rank)[0][:1], net.layout)
        run.resolved["logits"] = objective.lm_loss(loss_module).decide_logits_selection(probe.to(run.device))
    wrapped, optimizer = run.accelerator.prepare(loss_module, optimizer)
    params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP2 swapped in sharded parameters
    # before a resume loads trained weights: the DPO reference is the starting model
    objective.after_prepare(run, loss_module, data.train_examples, net.layout)
    return Optimization(loss_module, wrapped, objective.eval_loss_module(loss_module, wrapped), optimizer, params,
                        order, schedule)


def record_logits_decision(run: RunContext, objective: Objective, loss_module: torch.nn.Module) -> None:
    """After the first step of a sharded GPU run: what its first forward decided, for `resolved`."""
    lm = objective.lm_loss(loss_module)
    if lm._checked or not lm.select_logits:  # decided: no batch needed to say what
        run.resolved["logits"] = lm.decide_logits_selection(None)
