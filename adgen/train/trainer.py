"""The training loop (SFT and DPO) on top of accelerate, in named pieces a reader can find:

    train(cfg) = setup_run (processes, precision, run dir) -> setup_data -> setup_model (method,
                 batching, attention) -> setup_optimization (optimizer, schedule, loss, logits selection)
                 -> restore_checkpoint -> fit: for each step train_step, log_step, maybe_evaluate,
                 maybe_checkpoint -> finish (final eval, artefacts, summary)

accelerate supplies the process group (DDP over gloo/NCCL, FSDP, DeepSpeed), device placement,
mixed precision and no-sync gradient accumulation; everything else (data order, packing, loss,
checkpoints) is here so that it can be exact: the loss of a step is the sum of token cross-entropies
over every micro-batch of every process divided by their total target-token count, so 1 process x
batch 4 and 2 processes x batch 2 compute the same step, and a resumed run the same steps as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adgen.config import dict_diff
from adgen.errors import AdgenError
from adgen.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from adgen.train import checkpoint as ckpt_mod
from adgen.train import tracking
from adgen.train.config import RESUME_MUTABLE_KEYS, TrainConfig
from adgen.io import replace_dir, temp_dir_for
from adgen.train.run_dir import RUN_FILES, prepare_output_dir

log = logging.getLogger(__name__)


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


# ---- small helpers ---------------------------------------------------------------------------


TRIM_GROWTH = 0.05  # trim the heap once the RSS between steps has grown this much over a step's working set


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    """glibc's malloc_trim (hands freed heap pages back to the OS), or None where there is no glibc."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Free what a finished run left (model, optimizer state, the heap glibc keeps mapped after its last step):
    whatever the process does next — the demo loads the tuned model and generates — starts from what it needs,
    not from the run's working set (the demo's peak RSS was in its evaluation after training: docs/BENCHMARK_NOTES.md section 8)."""
    import gc

    from adgen.train.linear_cross_entropy import release_buffers

    release_buffers()
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _heap_trimmer(device):
    """On Linux CPUs: give freed memory back to the OS when it piles up between steps, not every step.

    glibc keeps a step's freed activations mapped, so the RSS between steps is one step's working set
    plus whatever fragmentation has added since. Trimming after every step held the RSS down but made
    every next step fault its working set in again (~0.5 M page faults a step, ~9% of the demo's CPU
    time in the kernel). So the RSS right after the first step that follows a trim is the reference (a
    whole step's working set), and the heap is trimmed only when the RSS between steps exceeds it by
    TRIM_GROWTH. (The faster creep seen before 2026-12-03 was PyTorch's per-shape kernel caches, now
    bounded by rounding row and segment lengths: collate.ROW_MULTIPLE, packed_attention.SEGMENT_MULTIPLE.)
    docs/BENCHMARK_NOTES.md section 8.
    """
    trim = _malloc_trim()
    if device.type != "cpu" or trim is None or not os.path.exists("/proc/self/statm"):
        return lambda: None
    reference: list[int] = []  # the RSS after the first step since the last trim

    def maybe_trim() -> None:
        rss = _rss_bytes()
        if not reference:
            reference.append(rss)
        elif rss > reference[0] * (1 + TRIM_GROWTH):
            trim(0)
            reference.clear()

    return maybe_trim


def _peak_memory_gb(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kb / 2**20, "process RSS"


BUDGET_PROBE_STEPS = 3  # steps timed before a time budget re-plans the run


def _warmup_steps(cfg, total: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total)


def _steps_in_budget(cfg, step: int, total: int, elapsed: float, per_step: float) -> int:
    """The last step that fits cfg.max_minutes: `elapsed` seconds are spent after `step` steps, and each
    further step takes `per_step` (measured without the first step, which pays one-time costs)."""
    fit = step + int((cfg.max_minutes * 60 - elapsed) / per_step) if per_step > 0 else total
    return max(step, min(total, fit))


def _lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
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


def _launched() -> bool:
    """Started by accelerate launch / torchrun: each process's device comes from LOCAL_RANK."""
    return "LOCAL_RANK" in os.environ


def _reset_accelerate_state() -> None:
    """Forget a previous Accelerator's settings (the process group, if any, is kept). A single process also
    forgets its device, so a second train() in one process runs where its own config says."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    single = not _launched() and not (dist.is_available() and dist.is_initialized())
    AcceleratorState._reset_state(reset_partial_state=single)
    GradientState._reset_state()


def _make_accelerator(cfg: TrainConfig, device: str, precision, out: Path):
    """The Accelerator for `device` ("cpu", "cuda", "cuda:N"). A single process on cuda:N gets cuda:N as
    `accelerator.device` (accelerate's own default there is plain "cuda"), so that the model is loaded on the
    GPU the steps run on, and accelerate's 4-bit placement check agrees."""
    import torch
    from accelerate import Accelerator

    pinned = device.startswith("cuda:") and not _launched()
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


def _eval_mode(module, *, keep_4bit_training: bool) -> None:
    """module.eval(), except bitsandbytes' 4-bit layers on CPU.

    bitsandbytes (0.50) repacks a CPU Linear4bit's weights into an inference-only layout the first time
    it runs in eval mode without grad, and from then on no gradient flows back through that layer:
    every LoRA / prefix weight before it silently stops training. Those layers have no dropout, so
    leaving their `training` flag set changes nothing else.
    """
    module.eval()
    if not keep_4bit_training:
        return
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.training = True


def _shards_weights(accelerator) -> bool:
    from adgen.train.fsdp_cpu import shards_weights

    return shards_weights(accelerator)


def _fill_deepspeed_config(accelerator, cfg: TrainConfig, model) -> None:
    """DeepSpeed reads batch size / accumulation / clipping from its JSON, and accelerate fills the bucket sizes from
    `model.config`, which the prepared loss module lacks: every "auto" is filled here, before `prepare`."""
    from adgen.train.fsdp_cpu import fill_deepspeed_config, hidden_size_of

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    fill_deepspeed_config(plugin.deepspeed_config, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                          max_grad_norm=cfg.max_grad_norm, num_processes=accelerator.num_processes,
                          hidden_size=hidden_size_of(model))


def _cpu_speedups(cfg: TrainConfig, device, *, sharded: bool) -> dict[str, bool]:
    """Which of the CPU-only speedups this run sets up. Each was written and measured for CPUs (docs/BENCHMARK_NOTES.md section 8);
    a CUDA model keeps transformers' kernels (sdpa / flash-attention with per-sample position_ids for packed
    rows) and CUDA's own dropout. (The heap trim is gated in `_heap_trimmer` by the same device test.)"""
    cpu = device.type == "cpu"
    return {"packed_attention": cpu, "lean_layers": cpu and cfg.lean_layers and not sharded,
            "fast_dropout": cpu and cfg.fast_dropout}


def _read(path: str, cfg: TrainConfig, limit: int | None, what: str):
    from adgen.data.records import parse_columns, read_records

    columns = parse_columns(cfg.columns) if cfg.columns else None
    data = read_records(path, encoding=cfg.encoding, on_error=cfg.on_error, columns=columns)
    if data.skipped:
        log.warning("%s: %s", path, data.skip_summary())
    records = data.records[:limit] if limit else data.records
    if not records:
        raise AdgenError(f"{what} file {path} has no usable records")
    return records


def _read_pairs(cfg: TrainConfig, formatter):
    """objective=dpo: (records for the attribute vocabulary, encoded pairs, encode stats)."""
    from adgen.data.chat import EncodeStats
    from adgen.data.records import Record
    from adgen.train.dpo import encode_pairs
    from adgen.train.pairs import read_pairs

    pairs = read_pairs(cfg.preference_data)[: cfg.max_samples]
    examples, dropped = encode_pairs(formatter, pairs)
    truncated = sum(p.chosen.truncated for p in examples)  # (a rejected loop is cut by design)
    records = [Record(p.content, p.chosen, p.line) for p in pairs]
    return records, examples, EncodeStats(total=len(pairs), truncated=truncated, dropped=dropped)


def _dpo_reference(cfg: TrainConfig, out: Path, accelerator, loss_module, pairs, batching: str, pad_id: int,
                   share_prefix: bool, *, resuming: bool, say):
    """[pairs, 2] reference log-probabilities: computed from the starting model and saved with the run,
    or read back on resume (the model has trained since, so it can no longer give them)."""
    from adgen.train.dpo import REFERENCE_FILE, load_reference, reference_logps, save_reference

    path = out / REFERENCE_FILE
    saved = load_reference(path, pairs)
    if saved is not None:
        return saved
    if resuming:
        raise AdgenError(f"{path}: missing or made for other pairs, so this DPO run cannot resume with its reference. "
                         "Start the run afresh (--overwrite) or restore that file")
    t = time.perf_counter()
    ref = reference_logps(loss_module.lm, pairs, batch_size=cfg.batch_size, batching=batching, pad_id=pad_id,
                          share_prefix=share_prefix, autocast=accelerator.autocast)
    if accelerator.is_main_process:
        save_reference(path, ref, pairs)
    say(f"[adgen] DPO reference: log-probabilities of {len(pairs)} pairs from the starting model "
        f"({time.perf_counter() - t:.1f}s) -> {path}")
    return ref


class _Printer:
    """Messages for people: main process only, on stderr, above the progress bar."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)


# ---- the recipe --------------------------------------------------------------------------------


@dataclass
class TrainRun:
    """Everything a training run's loop reads and writes, built once by the `setup_*` functions.

    The decisions taken at setup (precision, batching, attention kernel, logits selection, steps) live
    here and in `resolved` (written to summary.json), never switched later inside the loop.
    """

    cfg: TrainConfig
    out: Path
    accelerator: Any
    say: "_Printer"
    precision: Any
    ckpt_info: Any = None
    dpo: bool = False
    # data
    resolved_model: Any = None  # adgen.models.ResolvedModel
    tokenizer: Any = None
    formatter: Any = None  # adgen.data.chat.ChatFormatter
    train_records: list = field(default_factory=list)
    train_examples: list = field(default_factory=list)  # Example, or PairExample for DPO
    stats: Any = None  # encoding stats: truncated / dropped
    eval_records: list = field(default_factory=list)
    eval_examples: list = field(default_factory=list)
    gen_records: list = field(default_factory=list)  # the first eval records, for generation metrics
    gen_vocab: Any = None
    # model and optimisation
    model: Any = None  # the model with its method applied (PeftModel or the model itself)
    wrapped: Any = None  # the loss module as accelerate prepared it
    loss_module: Any = None  # CausalLMLoss or DPOLoss
    eval_loss_module: Any = None
    params: list = field(default_factory=list)  # trainable parameters (for clipping)
    optimizer: Any = None
    scheduler: Any = None
    order: Any = None
    reference: Any = None  # DPO: the starting model's log-probabilities of every pair
    batching: str = "packed"
    share_prefix: bool = False
    # LoRA under bf16 autocast: PEFT's cast of each adapter's input to the adapter's fp32 (which autocast casts right
    # back to bf16) is switched off for the training forward; same values, two fewer activation copies per adapter
    lora_inputs_uncast: bool = False
    pad_id: int | None = None
    total_steps: int = 0
    warmup: int = 0
    resolved: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    # progress
    start_step: int = 0
    step: int = 0
    status: str = "completed"
    metrics: list = field(default_factory=list)
    counters: dict = field(default_factory=lambda: {"tokens": 0, "padded": 0, "examples": 0, "train_time": 0.0})
    window: dict = field(default_factory=lambda: {"loss": 0.0, "targets": 0})
    window_stats: dict = field(default_factory=dict)  # DPO: reward accuracy / margins over the log window
    last_ckpt: str | None = None
    last_eval: float | None = None
    summary_base: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self):
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def train(cfg: TrainConfig, *, resume: str | bool | None = None, overwrite: bool = False) -> TrainResult:
    """Set up (processes, run directory, data, model, optimisation, resume), fit, finish."""
    cfg.validate()
    t_setup = time.perf_counter()
    run = setup_run(cfg, resume=resume, overwrite=overwrite)
    setup_data(run)
    setup_model(run)
    setup_optimization(run)
    restore_checkpoint(run)
    announce(run, time.perf_counter() - t_setup)
    fit(run)
    result = finish(run)
    del run
    release_memory()
    return result


# ---- setup -----------------------------------------------------------------------------------------
def setup_run(cfg: TrainConfig, *, resume, overwrite: bool) -> TrainRun:
    """Processes, device and precision (accelerate), the run directory, the checkpoint to resume."""
    from adgen.train.fsdp_cpu import enable_fsdp_on_cpu
    from adgen.train.peft_setup import resolve_device, resolve_precision

    out = Path(cfg.output_dir)
    device = resolve_device(cfg.device, launched=_launched())  # an explicit device that is not there: ConfigError
    precision = resolve_precision(cfg, device)
    _reset_accelerate_state()  # a second train() in one process may use another precision / device
    accelerator = _make_accelerator(cfg, device, precision, out)
    enable_fsdp_on_cpu(accelerator)  # accelerate would run an FSDP launch on CPUs as plain DDP
    run = TrainRun(cfg=cfg, out=out, accelerator=accelerator, say=_Printer(accelerator.is_main_process),
                   precision=precision, dpo=cfg.objective == "dpo")
    resuming = resume not in (None, False)
    if run.main:
        prepare_output_dir(out, overwrite=overwrite, resume=resuming)
    accelerator.wait_for_everyone()
    run.ckpt_info = ckpt_mod.resolve_resume(out, resume) if resuming else None
    if run.main:
        from adgen.config import save_config

        if resuming:
            ckpt_mod.clean_partial(out)
        save_config(cfg, out / "config.yaml")
    tracking.start(accelerator, cfg)
    return run


def setup_data(run: TrainRun) -> None:
    """Tokenizer, chat formatter, encoded train (or preference) and eval examples."""
    from adgen.data.chat import ChatFormatter, encode_records, resolve_system_prompt
    from adgen.models import load_tokenizer, resolve_model

    cfg, say = run.cfg, run.say
    with run.accelerator.main_process_first():  # built-in models are converted once, by one process
        run.resolved_model = resolve_model(cfg.model)
    run.tokenizer = load_tokenizer(run.resolved_model, trust_remote_code=cfg.trust_remote_code)
    run.formatter = ChatFormatter(run.tokenizer, system_prompt=resolve_system_prompt(cfg.system_prompt),
                                  loss_on=cfg.loss_on, max_length=cfg.max_length)
    if run.dpo:
        run.train_records, run.train_examples, run.stats = _read_pairs(cfg, run.formatter)
        say(f"[adgen] preference pairs: {cfg.preference_data}: {run.stats.summary()}")
    else:
        run.train_records = _read(cfg.train_data, cfg, cfg.max_samples, "training")
        run.train_examples, run.stats = encode_records(run.formatter, run.train_records)
        say(f"[adgen] train data: {cfg.train_data}: {run.stats.summary()}")
    if not run.train_examples:
        raise AdgenError(f"no training example fits max_length={cfg.max_length}: raise max_length")
    if cfg.eval_data:
        run.eval_records = _read(cfg.eval_data, cfg, cfg.max_eval_samples, "eval")
        run.eval_examples, estats = encode_records(run.formatter, run.eval_records)
        say(f"[adgen] eval data: {cfg.eval_data}: {estats.summary()}")
    if cfg.gen_eval_every:
        run.gen_records = [r for r in run.eval_records if r.summary][: cfg.gen_eval_samples]
    run.pad_id = run.tokenizer.pad_token_id


def setup_model(run: TrainRun) -> None:
    """The base model, the training method on it, and the batching / attention the run will use."""
    from accelerate.utils import set_seed

    from adgen.train.dpo import disable_dropout
    from adgen.train.peft_setup import (
        add_neftune_noise,
        apply_method,
        count_parameters,
        load_base_model,
        rewrites_base,
        save_initial_adapter,
    )

    cfg = run.cfg
    set_seed(cfg.seed)
    sharded = _shards_weights(run.accelerator)  # FSDP / DeepSpeed: their own placement, hooks and dtype handling
    base = load_base_model(cfg, str(run.resolved_model.path), run.precision, run.device, sharded=sharded)
    run.model = apply_method(base, cfg, run.precision)
    if rewrites_base(cfg) and run.main and not (run.out / LORA_INIT).is_dir():
        save_initial_adapter(run.model, run.out / LORA_INIT)  # PiSSA / OLoRA: to convert the result on save
    if cfg.neftune_alpha:
        add_neftune_noise(run.model, cfg.neftune_alpha)
    if run.dpo:
        disable_dropout(run.model)  # policy and reference log-probabilities must be computed alike
    trainable, total = count_parameters(run.model)
    if trainable == 0:
        raise AdgenError("nothing to train: no parameter requires gradients (check the method / target modules)")
    speedups = _cpu_speedups(cfg, run.device, sharded=sharded)
    attention = _choose_batching(run, base, per_example_attention=speedups["packed_attention"])
    run.lora_inputs_uncast = cfg.method == "lora" and run.precision.mixed_precision == "bf16" and not sharded
    if speedups["lean_layers"]:
        from adgen.train.lean_layers import make_layers_lean

        if make_layers_lean(base):
            attention += ", lean norm / MLP blocks"
    if speedups["fast_dropout"]:
        from adgen.train.fast_dropout import use_fast_dropout

        if use_fast_dropout(run.model):
            attention += ", fast adapter dropout"
    for n in run.notes:
        run.say(f"[adgen] note: {n}")
    run.resolved.update(precision=run.precision.name, batching=run.batching, attention=attention,
                        trainable_parameters=trainable, total_parameters=total)
    run.say(
        f"[adgen] model {cfg.model} ({run.resolved_model.kind}), method {cfg.method}, precision {run.precision.name}, "
        f"batching {run.batching}, attention {attention}, {run.world} process(es) on {run.device.type}; trainable "
        f"{trainable:,} / {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)"
    )


def _choose_batching(run: TrainRun, base, *, per_example_attention: bool = True) -> str:
    """Decide packed vs padded rows and the attention kernel once; returns the attention's name.

    Packed rows on a CPU go to adgen's per-example attention (`per_example_attention`); elsewhere (GPUs) to the
    model's own attention (sdpa, or flash_attention_2 when set), which transformers keeps within each example
    from the per-sample position_ids (no attention mask is passed for packed rows)."""
    cfg = run.cfg
    run.batching = cfg.batching
    if run.batching == "packed" and cfg.method == "prefix":
        run.batching = "grouped"
        run.notes.append(
            "prefix tuning: packing is off (the trained prefix is a key/value cache, and transformers only "
            "separates packed samples without one); using length-grouped padded batches"
        )
    elif run.batching == "packed" and cfg.trust_remote_code:
        run.batching = "grouped"
        run.notes.append("remote-code model: its attention may ignore per-sample position ids, so packing is off; "
                         "using length-grouped padded batches")
    attention = getattr(base.config, "_attn_implementation", None) or "default"
    run.share_prefix = False  # the common prompt start once per packed row: needs our per-example attention
    if run.batching != "packed":
        return attention
    if not per_example_attention or cfg.attn_implementation:
        return f"{attention}, packed rows kept apart by per-sample position_ids"
    from adgen.train.packed_attention import enable_packed_attention

    if enable_packed_attention(base):
        run.share_prefix = cfg.share_prompt_prefix and cfg.loss_on == "response"
        attention = "per-example" + (", shared prompt prefix" if run.share_prefix else "")
    return attention


def setup_optimization(run: TrainRun) -> None:
    """Optimizer, data order, schedule, loss module (logits selection decided here), DPO reference."""
    import torch

    from adgen.train.collate import DataOrder
    from adgen.train.dpo import DPOLoss
    from adgen.train.loss import CausalLMLoss
    from adgen.train.peft_setup import optimizer_groups

    cfg, model = run.cfg, run.model
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, cfg), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
    )
    run.order = DataOrder(
        [len(e) if run.dpo else len(e.input_ids) for e in run.train_examples], batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, world_size=run.world, seed=cfg.seed, batching=run.batching,
    )
    run.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * run.order.num_examples / run.order.examples_per_step))
    run.warmup = _warmup_steps(cfg, run.total_steps)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.lr_scheduler, run.warmup, run.total_steps, cfg.min_lr_ratio)
    )
    _fill_deepspeed_config(run.accelerator, cfg, model)
    sharded = _shards_weights(run.accelerator)
    fused = cfg.fused_head_loss and not sharded  # the head's weight must be whole
    if run.dpo:
        run.loss_module = DPOLoss(model, beta=cfg.dpo_beta, sft_weight=cfg.dpo_sft_weight,
                                  select_logits=cfg.target_logits_only, fused_head=fused)
    else:
        run.loss_module = CausalLMLoss(model, select_logits=cfg.target_logits_only, fused_head=fused)
    if sharded and run.device.type != "cpu":
        # the weights wait on the CPU (FSDP rank > 0: on meta) for prepare to shard them onto the GPUs: the first
        # training forward decides (CausalLMLoss probes there), and `fit` records what it decided
        run.resolved["logits"] = LOGITS_AT_FIRST_STEP
    else:
        probe = make_batch(run, run.order.step_indices(0, run.rank)[0][:1])
        run.resolved["logits"] = _logits_lm(run).decide_logits_selection(probe.to(run.device))
    run.wrapped, run.optimizer = run.accelerator.prepare(run.loss_module, optimizer)
    run.params = [p for p in run.wrapped.parameters() if p.requires_grad]  # FSDP2 swapped in sharded parameters
    # SFT eval loss (of the references) also for DPO runs: through the plain LM loss inside the DPO module
    run.eval_loss_module = run.loss_module.lm if run.dpo else run.wrapped
    if run.dpo:  # before a resume loads trained weights: the reference is the starting model
        run.reference = _dpo_reference(cfg, run.out, run.accelerator, run.loss_module, run.train_examples,
                                       run.batching, run.pad_id, run.share_prefix,
                                       resuming=run.ckpt_info is not None, say=run.say)


LOGITS_AT_FIRST_STEP = "decided at the first step"


def _logits_lm(run: TrainRun):
    """The CausalLMLoss that decides the logits selection (DPO: the one inside DPOLoss)."""
    return run.loss_module.lm if run.dpo else run.loss_module


def _record_logits_decision(run: TrainRun) -> None:
    """After the first step of a sharded GPU run: what its first forward decided, for `resolved`."""
    lm = _logits_lm(run)
    if lm._checked or not lm.select_logits:  # decided: no batch needed to say what
        run.resolved["logits"] = lm.decide_logits_selection(None)


def restore_checkpoint(run: TrainRun) -> None:
    """Resume: weights, optimizer, schedule, counters and metrics of the checkpoint (or start afresh)."""
    info = run.ckpt_info
    if info is not None:
        state = ckpt_mod.load_checkpoint(run.accelerator, info, model=run.model, wrapped=run.wrapped,
                                         optimizer=run.optimizer, scheduler=run.scheduler)
        run.start_step, run.metrics = state["step"], state["metrics"]
        run.counters.update(state["counters"])
        run.last_ckpt = str(info.path)
        diff = dict_diff(state.get("config", {}), asdict(run.cfg), ignore=RESUME_MUTABLE_KEYS)
        if diff:
            run.say("[adgen] warning: the config differs from the checkpoint's; the result will differ from an "
                    "uninterrupted run: " + "; ".join(diff[:8]))
        run.say(f"[adgen] resumed from {info.path} at step {run.start_step}/{run.total_steps}")
    run.step = run.start_step
    if run.main:
        atomic_write_jsonl(run.out / "metrics.jsonl", run.metrics)


def announce(run: TrainRun, setup_s: float) -> None:
    """The run's plan in one line, and the summary fields known before the first step."""
    cfg, order = run.cfg, run.order
    run.say(
        f"[adgen] {len(run.train_examples)} examples, {order.examples_per_step} per step "
        f"({cfg.batch_size} x {cfg.grad_accum} accum x {run.world} proc), {run.total_steps} steps "
        f"({order.epoch_at(run.total_steps):.2f} epochs), warmup {run.warmup}, setup {setup_s:.1f}s"
    )
    run.summary_base = {
        "output_dir": str(run.out), "model": cfg.model, "model_path": str(run.resolved_model.path),
        "method": cfg.method, "objective": cfg.objective, "precision": run.precision.name, "batching": run.batching,
        "processes": run.world, "device": run.device.type,
        "trainable_parameters": run.resolved["trainable_parameters"], "total_parameters": run.resolved["total_parameters"],
        "train_examples": len(run.train_examples), "eval_examples": len(run.eval_examples),
        "truncated_examples": run.stats.truncated, "dropped_examples": run.stats.dropped,
        "total_steps": run.total_steps, "notes": run.notes, "resolved": run.resolved,
    }


# ---- the steps -------------------------------------------------------------------------------------
def make_batch(run: TrainRun, idx: list[int]):
    from adgen.train.collate import collate
    from adgen.train.dpo import collate_pairs

    if run.dpo:
        import torch

        ref = None
        if run.reference is not None:
            ref = torch.cat([run.reference[idx, 0], run.reference[idx, 1]]).float()
        return collate_pairs([run.train_examples[i] for i in idx], run.batching, run.pad_id, run.share_prefix, ref)
    return collate([run.train_examples[i] for i in idx], run.batching, run.pad_id, run.share_prefix)


def reduce_sum(run: TrainRun, values: list[float]) -> list[float]:
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=run.device)
    if run.world > 1:
        t = run.accelerator.reduce(t, reduction="sum")
    return t.tolist()


def _lora_inputs_uncast(run: TrainRun):
    """Measured on the LoRA bench recipe (bf16, this Xeon; 8 interleaved forward+backward pairs of one batch): median
    4.92 -> 4.83 s, best 4.64 -> 4.43 s. Only inside the training forward, which always runs under autocast."""
    from contextlib import nullcontext

    if not run.lora_inputs_uncast:
        return nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(run.model)


def train_step(run: TrainRun, step: int) -> dict:
    """One optimizer step over every micro-batch of every process; the figures the log needs."""
    import torch

    cfg, accelerator, wrapped = run.cfg, run.accelerator, run.wrapped
    t0 = time.perf_counter()
    batches = [make_batch(run, idx) for idx in run.order.step_indices(step - 1, run.rank)]
    local = [sum(b.num_targets for b in batches), sum(b.num_tokens for b in batches),
             sum(b.num_padded for b in batches), sum(b.num_examples for b in batches)]
    n_targets, n_tokens, n_padded, n_examples = reduce_sum(run, local) if run.world > 1 else local
    scale = run.world * cfg.grad_accum / max(n_targets, 1)
    loss_local = torch.zeros((), dtype=torch.float64, device=run.device)
    for b in batches:
        b = b.to(run.device)
        with accelerator.accumulate(wrapped), _lora_inputs_uncast(run):
            loss_sum, _, *extra = wrapped(b.input_ids, b.targets, b.position_ids, b.attention_mask, **b.loss_kwargs())
            accelerator.backward(loss_sum * scale)
        loss_local += loss_sum.detach().double()
        for k, v in (extra[0] if extra else {}).items():
            run.window_stats[k] = run.window_stats.get(k, 0.0) + v
    loss = (reduce_sum(run, [float(loss_local)])[0] if run.world > 1 else float(loss_local)) / max(n_targets, 1)
    if not math.isfinite(loss):
        run.status = "diverged"
        raise TrainingDiverged(
            f"the training loss became {loss} at step {step}; the run stopped without applying that update. "
            f"Last good checkpoint: {run.last_ckpt or 'none (no checkpoint was written yet)'}. "
            f"Try a lower lr (now {cfg.lr:g}), precision=bf16 or fp32 instead of fp16, max_grad_norm=1.0, "
            "or check the data; continue from the checkpoint with --resume"
        )
    grad_norm = None
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        gn = accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
        grad_norm = float(gn) if gn is not None else None
    lr_now = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    if not run.optimizer.step_was_skipped:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    for key, value in (("tokens", n_tokens), ("padded", n_padded), ("examples", n_examples)):
        run.counters[key] += int(value)
    run.counters["train_time"] += dt
    run.window["loss"] += loss * n_targets
    run.window["targets"] += n_targets
    return {"loss": loss, "grad_norm": grad_norm, "lr": lr_now, "tokens": n_tokens, "padded": n_padded,
            "tokens_per_s": n_tokens / dt if dt > 0 else 0.0}


class _TimeBudget:
    """`max_minutes`: after BUDGET_PROBE_STEPS steps, shorten the schedule to the steps that fit."""

    def __init__(self, run: TrainRun) -> None:
        self.t0 = self.first_step_end = time.perf_counter()

    def after_step(self, run: TrainRun, bar) -> None:
        cfg, step = run.cfg, run.step
        if not cfg.max_minutes:
            return
        if step == run.start_step + 1:
            self.first_step_end = time.perf_counter()
        if step != run.start_step + BUDGET_PROBE_STEPS:
            return
        now = time.perf_counter()
        per_step = (now - self.first_step_end) / (BUDGET_PROBE_STEPS - 1)
        planned = _steps_in_budget(cfg, step, run.total_steps, now - self.t0, per_step)
        if planned >= run.total_steps:
            return
        run.total_steps = planned
        run.warmup = _warmup_steps(cfg, planned)
        if cfg.warmup_steps is not None:  # a fixed warmup must leave a step to decay in
            run.warmup = min(run.warmup, max(0, planned - 1))
        run.scheduler.lr_lambdas = [_lr_lambda(cfg.lr_scheduler, run.warmup, planned, cfg.min_lr_ratio)
                                    for _ in run.scheduler.lr_lambdas]
        run.summary_base["total_steps"] = planned
        bar.total = planned
        run.say(f"[adgen] time budget {cfg.max_minutes:g} min: {planned} steps fit "
                f"({run.order.epoch_at(planned):.2f} epochs), warmup {run.warmup}")


def log_step(run: TrainRun, figures: dict, bar) -> None:
    """A metrics row every `log_every` steps (mean loss of the window), the progress bar always."""
    cfg, step = run.cfg, run.step
    if step % cfg.log_every == 0 or step == run.total_steps:
        row = {
            "step": step, "epoch": round(run.order.epoch_at(step), 4),
            "loss": run.window["loss"] / max(run.window["targets"], 1), "lr": figures["lr"],
            "grad_norm": figures["grad_norm"], "tokens": run.counters["tokens"],
            "tokens_per_s": round(figures["tokens_per_s"], 1),
            "padding": round(1 - figures["tokens"] / max(figures["padded"], 1), 4),
            "peak_mem_gb": round(_peak_memory_gb(run.device)[0], 3),
            "time": round(run.counters["train_time"], 2),
        }
        # DPO (this process's pairs): share where chosen beat rejected, mean reward margin
        row.update({k: round(v / max(run.window["targets"] / run.world, 1), 4) for k, v in run.window_stats.items()})
        write_metrics_row(run, row)
        run.window, run.window_stats = {"loss": 0.0, "targets": 0}, {}
        if not cfg.progress:  # plain log lines instead of the bar (CI, log files)
            run.say(f"[adgen] step {step}/{run.total_steps} loss {row['loss']:.4f} lr {figures['lr']:.2e} "
                    f"tokens/s {figures['tokens_per_s']:.0f} padding {100 * row['padding']:.1f}% "
                    f"peak mem {row['peak_mem_gb']:.2f} GiB")
    bar.set_postfix(loss=f"{figures['loss']:.4f}", lr=f"{figures['lr']:.2e}", tok_s=f"{figures['tokens_per_s']:.0f}",
                    refresh=False)
    bar.update(1)


def write_metrics_row(run: TrainRun, row: dict) -> None:
    tracking.log(run.accelerator, run.cfg, row)
    run.metrics.append(row)
    if run.main:
        with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---- evaluation, best/, checkpoints ------------------------------------------------------------------
def evaluate(run: TrainRun) -> float | None:
    """Token-weighted eval loss of the references over every process's share of the eval examples."""
    import torch

    from adgen.train.collate import eval_batches

    if not run.eval_examples:
        return None
    cfg = run.cfg
    _eval_mode(run.wrapped, keep_4bit_training=cfg.quantized and run.device.type == "cpu")
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for b in eval_batches(run.eval_examples, cfg.batch_size, run.batching, run.pad_id, run.rank, run.world,
                              run.share_prefix):
            b = b.to(run.device)
            s, n = run.eval_loss_module(b.input_ids, b.targets, b.position_ids, b.attention_mask,
                                        **b.varlen_kwargs())
            loss_sum += float(s)
            count += n
    run.wrapped.train()
    loss_sum, count = reduce_sum(run, [loss_sum, count])
    return loss_sum / max(count, 1)


def gen_evaluate(run: TrainRun, step: int) -> None:
    """Generation metrics on the first eval records (every process generates: the same greedy text,
    so each one takes the same best / early-stopping decision)."""
    from adgen.metrics import AttributeVocab
    from adgen.train.gen_eval import generation_metrics

    if run.gen_vocab is None:
        run.gen_vocab = AttributeVocab.from_records(run.train_records, source=str(run.cfg.train_data))
    t = time.perf_counter()
    figures = generation_metrics(run.model, run.tokenizer, run.formatter, run.gen_records, run.gen_vocab,
                                 max_new_tokens=run.cfg.gen_max_new_tokens)  # puts the model back in train mode
    write_metrics_row(run, {"step": step, "gen_eval": figures, "gen_eval_s": round(time.perf_counter() - t, 1)})
    run.say(f"[adgen] step {step}: generation on {figures['n']} eval records: ROUGE-1 {figures['rouge-1']:.2f} "
            f"BLEU-4 {figures['bleu-4']:.2f} coverage {figures['attr_coverage'] or 0:.2f} "
            f"ended {figures['ended_share']:.0%} never stopped {figures['never_stopped_share']:.0%} "
            f"repetition {figures['repetition_rate']:.2f}")


def track_best(run: TrainRun, step: int) -> bool:
    """Save best/ when `step` is the best evaluation so far; True when early stopping ends the run."""
    cfg = run.cfg
    if not cfg.best_metric:
        return False
    from adgen.train.gen_eval import best_so_far

    best_step, best, since = best_so_far(run.metrics, cfg.best_metric)
    if best_step == step:
        save_final(run.accelerator, cfg, run.out, run.model, run.wrapped, run.tokenizer, name="best")
        run.say(f"[adgen] step {step}: new best {cfg.best_metric} {best:.4f} -> {run.out / 'best'}")
    return bool(cfg.early_stopping_patience) and since >= cfg.early_stopping_patience


def maybe_evaluate(run: TrainRun) -> None:
    """The loss / generation evaluations due at this step, best/, and early stopping (ends the schedule)."""
    cfg, step = run.cfg, run.step
    evaluated = False
    if cfg.eval_every and step % cfg.eval_every == 0 and step != run.total_steps and run.eval_examples:
        run.last_eval = evaluate(run)
        write_metrics_row(run, {"step": step, "eval_loss": run.last_eval})
        run.say(f"[adgen] step {step}: eval loss {run.last_eval:.4f}")
        evaluated = True
    if cfg.gen_eval_every and step % cfg.gen_eval_every == 0 and step != run.total_steps and run.gen_records:
        gen_evaluate(run, step)
        evaluated = True
    if evaluated and track_best(run, step):
        run.status = "early_stopped"
        run.say(f"[adgen] step {step}: early stopping, no better {cfg.best_metric} in "
                f"{cfg.early_stopping_patience} evaluation(s); the best is in {run.out / 'best'}")
        run.total_steps = step
        run.summary_base["total_steps"] = step


def maybe_checkpoint(run: TrainRun) -> None:
    cfg, step = run.cfg, run.step
    if cfg.save_every and (step % cfg.save_every == 0 or step == run.total_steps):
        trainer_state = {"step": step, "data_position": step * run.order.examples_per_step, "world_size": run.world,
                         "counters": dict(run.counters), "metrics": run.metrics, "config": asdict(cfg)}
        path = ckpt_mod.save_checkpoint(
            run.accelerator, run.out, step, model=run.model, wrapped=run.wrapped, optimizer=run.optimizer,
            scheduler=run.scheduler, trainer_state=trainer_state, keep=cfg.keep_checkpoints, is_peft=cfg.is_peft,
        )
        run.last_ckpt = str(path)


# ---- the loop and the end --------------------------------------------------------------------------
def fit(run: TrainRun) -> None:
    """Optimizer steps until the schedule (or the time budget, or early stopping) ends."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (run.main and cfg.progress), file=sys.stderr)
    run.wrapped.train()
    trim_heap = _heap_trimmer(run.device)
    if cfg.eval_on_start and run.start_step == 0 and run.eval_examples:
        write_metrics_row(run, {"step": 0, "eval_loss": evaluate(run)})
        run.say(f"[adgen] step 0: eval loss {run.metrics[-1]['eval_loss']:.4f}")
    budget = _TimeBudget(run)
    try:
        while run.step < run.total_steps:
            run.step += 1
            figures = train_step(run, run.step)
            if run.resolved.get("logits") == LOGITS_AT_FIRST_STEP:
                _record_logits_decision(run)
            trim_heap()
            budget.after_step(run, bar)
            log_step(run, figures, bar)
            maybe_evaluate(run)
            maybe_checkpoint(run)
    except TrainingDiverged:
        bar.close()
        if run.main:
            summary = {**run.summary_base, "status": run.status, "steps": run.step - 1, "last_checkpoint": run.last_ckpt}
            atomic_write_json(run.out / "summary.json", summary)
            atomic_write_jsonl(run.out / "metrics.jsonl", run.metrics)
        raise
    bar.close()


def finish(run: TrainRun) -> TrainResult:
    """Final evaluations, the trained weights, loss.png, attribute_vocab.json and the summary."""
    cfg, out = run.cfg, run.out
    if run.status != "early_stopped":  # (an early stop was decided on this step's evaluation)
        if run.eval_examples:
            run.last_eval = evaluate(run)
            write_metrics_row(run, {"step": run.total_steps, "eval_loss": run.last_eval})
        if run.gen_records:
            gen_evaluate(run, run.total_steps)
        track_best(run, run.total_steps)
    artefact = save_final(run.accelerator, cfg, out, run.model, run.wrapped, run.tokenizer)
    summary = _final_summary(run, artefact)
    if run.main:
        atomic_write_jsonl(out / "metrics.jsonl", run.metrics)
        if cfg.plot:
            from adgen.train.plots import plot_losses

            plot_losses(run.metrics, out / "loss.png", title=f"{cfg.model} · {cfg.method}" + (" · DPO" if run.dpo else ""),
                        **({"ylabel": "train: DPO loss (+ sft_weight x NLL); eval: token cross-entropy"} if run.dpo else {}))
        _save_vocab(run.train_records, out / "attribute_vocab.json", cfg.train_data, run.say, vocab=run.gen_vocab)
        atomic_write_text(out / "train_summary.md", summary_markdown(summary))
        atomic_write_json(out / "summary.json", summary)
    run.accelerator.wait_for_everyone()
    if run.world > 1 or cfg.report_to:
        run.accelerator.end_training()  # closes the trackers; destroys the process group
    return TrainResult(out, run.status, run.total_steps, summary, run.metrics)


def _final_summary(run: TrainRun, artefact: Path) -> dict:
    counters, out = run.counters, run.out
    peak, peak_kind = _peak_memory_gb(run.device)
    peak = max([peak] + [r.get("peak_mem_gb", 0.0) for r in run.metrics if "loss" in r])
    train_rows = [r for r in run.metrics if "loss" in r]
    return {
        **run.summary_base,
        "status": run.status,
        "steps": run.total_steps,
        "epochs": round(run.order.epoch_at(run.total_steps), 4),
        "train_time_s": round(counters["train_time"], 1),
        "tokens": counters["tokens"],
        "tokens_per_s": round(counters["tokens"] / max(counters["train_time"], 1e-9), 1),
        "padding_share": round(1 - counters["tokens"] / max(counters["padded"], 1), 4),
        "peak_memory_gb": round(peak, 3),
        "peak_memory_kind": peak_kind,
        "first_train_loss": train_rows[0]["loss"] if train_rows else None,
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "final_eval_loss": run.last_eval,
        "artefact": str(artefact),
        "last_checkpoint": run.last_ckpt,
        **_best_summary(run.cfg, run.metrics, out),
        "files": {k: str(out / k) for k in RUN_FILES if "." in k},
    }


LORA_INIT = "lora_init"  # PiSSA / OLoRA: the initial adapter, for converting the result to a plain LoRA


def save_final(accelerator, cfg: TrainConfig, out: Path, model, wrapped, tokenizer, name: str | None = None) -> Path:
    """adapter/ (PEFT) or model/ (full), or `name`/ (best/): complete directories, moved into place at once."""
    final = out / (name or ("adapter" if cfg.is_peft else "model"))
    state_dict = None
    if _shards_weights(accelerator):  # every process takes part in gathering the weights
        from adgen.train.fsdp_cpu import full_state_dict, gather_trainable

        if cfg.is_peft:  # the adapter's weights only, not the whole model's
            state_dict = gather_trainable(accelerator, model) or None
        else:
            state_dict = full_state_dict(accelerator, wrapped) or None  # FSDP2 on CPUs: DTensors otherwise
    if accelerator.is_main_process:
        tmp = temp_dir_for(final)
        kw = {"state_dict": state_dict} if state_dict is not None else {}
        from adgen.train.peft_setup import rewrites_base

        if rewrites_base(cfg):  # a plain LoRA of the original base (PiSSA / OLoRA changed the base weights)
            kw["path_initial_model_for_weight_conversion"] = str(out / LORA_INIT)
        model.save_pretrained(str(tmp), safe_serialization=True, **kw)
        tokenizer.save_pretrained(str(tmp))
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _best_summary(cfg: TrainConfig, metrics: list[dict], out: Path) -> dict:
    """best_metric / best_step / best_value / best (the directory), and the last generation figures."""
    extra: dict = {}
    gen_rows = [r for r in metrics if "gen_eval" in r]
    if gen_rows:
        extra["final_gen_eval"] = {k: v for k, v in gen_rows[-1]["gen_eval"].items() if k != "example"}
    if cfg.best_metric:
        from adgen.train.gen_eval import best_so_far

        step, value, _ = best_so_far(metrics, cfg.best_metric)
        extra.update(best_metric=cfg.best_metric, best_step=step, best_value=value,
                     best=str(out / "best") if (out / "best").is_dir() else None)
    return extra


def _save_vocab(records, path: Path, source: str, say, vocab=None) -> None:
    """attribute_vocab.json; `vocab` is the one generation metrics already built from the same records."""
    if vocab is not None:
        vocab.save(path)
        return
    try:
        from adgen.metrics import AttributeVocab
    except ImportError:  # adgen.metrics is optional for training
        say("[adgen] note: adgen.metrics is unavailable; attribute_vocab.json not written")
        return
    AttributeVocab.from_records(records, source=str(source)).save(path)


def summary_markdown(s: dict) -> str:
    def fmt(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    lines = [
        f"# Training run: {s['model']} · {s['method']}",
        "",
        f"- status: **{s['status']}**, {s['steps']} steps ({s.get('epochs', '-')} epochs), "
        f"{s['train_examples']} train / {s['eval_examples']} eval examples",
        f"- time: {s.get('train_time_s', '-')} s training; {s.get('tokens_per_s', '-')} tokens/s; "
        f"padding {100 * s.get('padding_share', 0):.1f}% ({s['batching']})",
        f"- peak memory: {fmt(s.get('peak_memory_gb'), '.2f')} GiB ({s.get('peak_memory_kind', '')})",
        f"- loss: first {fmt(s.get('first_train_loss'))}, final train {fmt(s.get('final_train_loss'))}, "
        f"final eval {fmt(s.get('final_eval_loss'))}",
        f"- precision {s['precision']}; {s['processes']} process(es) on {s['device']}; trainable "
        f"{s['trainable_parameters']:,} of {s['total_parameters']:,} parameters",
        f"- result: `{s.get('artefact', '-')}`; last checkpoint: `{s.get('last_checkpoint') or '-'}`",
        f"- files: config.yaml, metrics.jsonl, loss.png, summary.json, attribute_vocab.json in `{s['output_dir']}`",
    ]
    g = s.get("final_gen_eval")
    if g:
        lines.append(f"- generation on {g['n']} eval records (last evaluation): ROUGE-1 {fmt(g.get('rouge-1'), '.2f')}, "
                     f"BLEU-4 {fmt(g.get('bleu-4'), '.2f')}, coverage {fmt(g.get('attr_coverage'), '.2f')}, "
                     f"ended on end-of-turn {fmt(g.get('ended_share'), '.0%')}, repetition {fmt(g.get('repetition_rate'), '.3f')}")
    if s.get("best_metric"):
        lines.append(f"- best {s['best_metric']}: {fmt(s.get('best_value'))} at step {s.get('best_step')} "
                     f"-> `{s.get('best') or '-'}`")
    for n in s.get("notes") or []:
        lines.append(f"- note: {n}")
    return "\n".join(lines) + "\n"
