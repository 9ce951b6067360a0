"""The SFT loop: one readable function on top of accelerate.

    train(cfg) = prepare run dir -> tokenize data -> load model + method -> optimizer, schedule
                 -> [resume] -> for each optimizer step: grad_accum micro-batches, clip, step,
                    log / eval / NaN guard / checkpoint -> final eval -> artefacts + summary

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
from adgen.train.run_dir import prepare_output_dir, replace_dir, temp_dir_for

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


def _heap_trimmer(device):
    """On Linux CPUs: give freed activation memory back to the OS after each step.

    Packed rows change length every step; glibc keeps the freed blocks of each size around, and the
    process RSS crept up by GiBs within tens of steps (5.1 -> 9.0 GiB over 32 steps of 8 records).
    """
    if device.type != "cpu":
        return lambda: None
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


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


def _reset_accelerate_state() -> None:
    """Forget a previous Accelerator's settings (the process group, if any, is kept)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


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


def _fill_deepspeed_config(accelerator, cfg: TrainConfig) -> None:
    """DeepSpeed reads batch size / accumulation / clipping from its JSON: fill the "auto" ones from cfg."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    fill = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value


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


def train(cfg: TrainConfig, *, resume: str | bool | None = None, overwrite: bool = False) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from adgen.data.chat import ChatFormatter, encode_records, resolve_system_prompt
    from adgen.models import load_tokenizer, resolve_model
    from adgen.train.collate import DataOrder, collate, eval_batches
    from adgen.train.dpo import DPOLoss, collate_pairs, disable_dropout
    from adgen.train.loss import CausalLMLoss
    from adgen.train.packed_attention import enable_packed_attention
    from adgen.train.peft_setup import (
        add_neftune_noise,
        apply_method,
        count_parameters,
        load_base_model,
        optimizer_groups,
        resolve_precision,
        rewrites_base,
        save_initial_adapter,
    )

    cfg.validate()
    t_setup = time.perf_counter()
    out = Path(cfg.output_dir)

    # -- processes, device, precision ----------------------------------------------------------
    want_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if not want_cpu and cfg.device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(torch.device(cfg.device))
    precision = resolve_precision(cfg, "cpu" if want_cpu else "cuda")
    _reset_accelerate_state()  # a second train() in one process may use another precision
    accelerator = Accelerator(
        cpu=want_cpu, mixed_precision=precision.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        **tracking.accelerator_kwargs(cfg, out),
    )
    from adgen.train.fsdp_cpu import enable_fsdp_on_cpu

    enable_fsdp_on_cpu(accelerator)  # accelerate would run an FSDP launch on CPUs as plain DDP
    main = accelerator.is_main_process
    say = _Printer(main)
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index

    # -- run directory -------------------------------------------------------------------------
    resuming = resume not in (None, False)
    if main:
        prepare_output_dir(out, overwrite=overwrite, resume=resuming)
    accelerator.wait_for_everyone()
    ckpt_info = ckpt_mod.resolve_resume(out, resume) if resuming else None
    if main and resuming:
        ckpt_mod.clean_partial(out)
    if main:
        from adgen.config import save_config

        save_config(cfg, out / "config.yaml")
    tracking.start(accelerator, cfg)

    # -- data ----------------------------------------------------------------------------------
    with accelerator.main_process_first():  # built-in models are converted once, by one process
        resolved = resolve_model(cfg.model)
    tokenizer = load_tokenizer(resolved, trust_remote_code=cfg.trust_remote_code)
    formatter = ChatFormatter(tokenizer, system_prompt=resolve_system_prompt(cfg.system_prompt), loss_on=cfg.loss_on, max_length=cfg.max_length)
    dpo = cfg.objective == "dpo"
    if dpo:
        train_records, train_examples, stats = _read_pairs(cfg, formatter)
        say(f"[adgen] preference pairs: {cfg.preference_data}: {stats.summary()}")
    else:
        train_records = _read(cfg.train_data, cfg, cfg.max_samples, "training")
        train_examples, stats = encode_records(formatter, train_records)
        say(f"[adgen] train data: {cfg.train_data}: {stats.summary()}")
    if not train_examples:
        raise AdgenError(f"no training example fits max_length={cfg.max_length}: raise max_length")
    eval_examples, eval_records = [], []
    if cfg.eval_data:
        eval_records = _read(cfg.eval_data, cfg, cfg.max_eval_samples, "eval")
        eval_examples, estats = encode_records(formatter, eval_records)
        say(f"[adgen] eval data: {cfg.eval_data}: {estats.summary()}")

    # -- model + method ------------------------------------------------------------------------
    set_seed(cfg.seed)
    base = load_base_model(cfg, str(resolved.path), precision, device, local_rank=accelerator.local_process_index)
    model = apply_method(base, cfg, precision)
    if rewrites_base(cfg) and main and not (out / LORA_INIT).is_dir():
        save_initial_adapter(model, out / LORA_INIT)  # PiSSA / OLoRA: to convert the result on save
    if cfg.neftune_alpha:
        add_neftune_noise(model, cfg.neftune_alpha)
    if dpo:
        disable_dropout(model)  # policy and reference log-probabilities must be computed alike
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise AdgenError("nothing to train: no parameter requires gradients (check the method / target modules)")

    batching = cfg.batching
    notes: list[str] = []
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
    share_prefix = False  # the common prompt start once per packed row: needs our per-example attention
    if batching == "packed" and not cfg.attn_implementation and enable_packed_attention(base):
        share_prefix = cfg.share_prompt_prefix and cfg.loss_on == "response"
        attention = "per-example" + (", shared prompt prefix" if share_prefix else "")
    for n in notes:
        say(f"[adgen] note: {n}")
    say(
        f"[adgen] model {cfg.model} ({resolved.kind}), method {cfg.method}, precision {precision.name}, "
        f"batching {batching}, attention {attention}, {world} process(es) on {device.type}; trainable {trainable:,} / {total:,} parameters "
        f"({100 * trainable / max(total, 1):.3f}%)"
    )

    # -- optimisation --------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, cfg), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
    )
    order = DataOrder(
        [len(e) if dpo else len(e.input_ids) for e in train_examples], batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        world_size=world, seed=cfg.seed, batching=batching,
    )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.num_examples / order.examples_per_step))
    warmup = _warmup_steps(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.lr_scheduler, warmup, total_steps, cfg.min_lr_ratio)
    )
    _fill_deepspeed_config(accelerator, cfg)
    if dpo:
        loss_module = DPOLoss(model, beta=cfg.dpo_beta, sft_weight=cfg.dpo_sft_weight,
                              select_logits=cfg.target_logits_only)
    else:
        loss_module = CausalLMLoss(model, select_logits=cfg.target_logits_only)
    wrapped, optimizer = accelerator.prepare(loss_module, optimizer)
    params = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP2 swapped in sharded parameters
    pad_id = tokenizer.pad_token_id
    # SFT eval loss (of the references) also for DPO runs: through the plain LM loss inside the DPO module
    eval_loss_module = loss_module.lm if dpo else wrapped
    reference = None
    if dpo:  # before a resume loads trained weights: the reference is the starting model
        reference = _dpo_reference(cfg, out, accelerator, loss_module, train_examples, batching, pad_id,
                                   share_prefix, resuming=ckpt_info is not None, say=say)

    # -- resume --------------------------------------------------------------------------------
    start_step, metrics = 0, []
    counters = {"tokens": 0, "padded": 0, "examples": 0, "train_time": 0.0}
    last_ckpt: str | None = None
    if ckpt_info is not None:
        state = ckpt_mod.load_checkpoint(
            accelerator, ckpt_info, model=model, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler
        )
        start_step, metrics = state["step"], state["metrics"]
        counters.update(state["counters"])
        last_ckpt = str(ckpt_info.path)
        diff = dict_diff(state.get("config", {}), asdict(cfg), ignore=RESUME_MUTABLE_KEYS)
        if diff:
            say("[adgen] warning: the config differs from the checkpoint's; the result will differ from an "
                "uninterrupted run: " + "; ".join(diff[:8]))
        say(f"[adgen] resumed from {ckpt_info.path} at step {start_step}/{total_steps}")
    if main:
        atomic_write_jsonl(out / "metrics.jsonl", metrics)
    say(
        f"[adgen] {len(train_examples)} examples, {order.examples_per_step} per step "
        f"({cfg.batch_size} x {cfg.grad_accum} accum x {world} proc), {total_steps} steps "
        f"({order.epoch_at(total_steps):.2f} epochs), warmup {warmup}, setup {time.perf_counter() - t_setup:.1f}s"
    )

    summary_base = {
        "output_dir": str(out), "model": cfg.model, "model_path": str(resolved.path), "method": cfg.method,
        "objective": cfg.objective,
        "precision": precision.name, "batching": batching, "processes": world, "device": device.type,
        "trainable_parameters": trainable, "total_parameters": total, "train_examples": len(train_examples),
        "eval_examples": len(eval_examples), "truncated_examples": stats.truncated, "dropped_examples": stats.dropped,
        "total_steps": total_steps, "notes": notes,
    }

    def state_for_checkpoint(step: int) -> dict:
        return {"step": step, "data_position": step * order.examples_per_step, "world_size": world,
                "counters": dict(counters), "metrics": metrics, "config": asdict(cfg)}

    def reduce_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            t = accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def evaluate() -> float | None:
        if not eval_examples:
            return None
        _eval_mode(wrapped, keep_4bit_training=cfg.quantized and device.type == "cpu")
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for b in eval_batches(eval_examples, cfg.batch_size, batching, pad_id, rank, world, share_prefix):
                b = b.to(device)
                s, n = eval_loss_module(b.input_ids, b.targets, b.position_ids, b.attention_mask)
                loss_sum += float(s)
                count += n
        wrapped.train()
        loss_sum, count = reduce_sum([loss_sum, count])
        return loss_sum / max(count, 1)

    def write_metrics_row(row: dict) -> None:
        tracking.log(accelerator, cfg, row)
        metrics.append(row)
        if main:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    gen_records = [r for r in eval_records if r.summary][: cfg.gen_eval_samples] if cfg.gen_eval_every else []
    gen_vocab = None

    def gen_evaluate(step: int) -> None:
        """Generation metrics on the first eval records (every process generates: the same greedy text,
        so each one takes the same best / early-stopping decision)."""
        nonlocal gen_vocab
        from adgen.metrics import AttributeVocab
        from adgen.train.gen_eval import generation_metrics

        if gen_vocab is None:
            gen_vocab = AttributeVocab.from_records(train_records, source=str(cfg.train_data))
        t = time.perf_counter()
        figures = generation_metrics(model, tokenizer, formatter, gen_records, gen_vocab,
                                     max_new_tokens=cfg.gen_max_new_tokens)  # puts the model back in train mode
        write_metrics_row({"step": step, "gen_eval": figures, "gen_eval_s": round(time.perf_counter() - t, 1)})
        say(f"[adgen] step {step}: generation on {figures['n']} eval records: ROUGE-1 {figures['rouge-1']:.2f} "
            f"BLEU-4 {figures['bleu-4']:.2f} coverage {figures['attr_coverage'] or 0:.2f} "
            f"ended {figures['ended_share']:.0%} never stopped {figures['never_stopped_share']:.0%} "
            f"repetition {figures['repetition_rate']:.2f}")

    def track_best(step: int) -> bool:
        """Save best/ when `step` is the best evaluation so far; True when early stopping ends the run."""
        if not cfg.best_metric:
            return False
        from adgen.train.gen_eval import best_so_far

        best_step, best, since = best_so_far(metrics, cfg.best_metric)
        if best_step == step:
            save_final(accelerator, cfg, out, model, wrapped, tokenizer, name="best")
            say(f"[adgen] step {step}: new best {cfg.best_metric} {best:.4f} -> {out / 'best'}")
        return bool(cfg.early_stopping_patience) and since >= cfg.early_stopping_patience

    # -- the loop ------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (main and cfg.progress), file=sys.stderr)
    wrapped.train()
    trim_heap = _heap_trimmer(device)
    window = {"loss": 0.0, "targets": 0}
    window_stats: dict[str, float] = {}  # DPO: reward accuracy / margins, summed over the window's pairs

    def make_batch(idx: list[int]):
        if dpo:
            ref = torch.cat([reference[idx, 0], reference[idx, 1]]).float()
            return collate_pairs([train_examples[i] for i in idx], batching, pad_id, share_prefix, ref)
        return collate([train_examples[i] for i in idx], batching, pad_id, share_prefix)

    tokens_per_s = 0.0
    last_eval = None
    status = "completed"
    step = start_step
    if cfg.eval_on_start and start_step == 0 and eval_examples:
        write_metrics_row({"step": 0, "eval_loss": evaluate()})
        say(f"[adgen] step 0: eval loss {metrics[-1]['eval_loss']:.4f}")
    loop_t0 = first_step_end = time.perf_counter()
    try:
        while step < total_steps:
            step += 1
            t0 = time.perf_counter()
            batches = [make_batch(idx) for idx in order.step_indices(step - 1, rank)]
            local = [sum(b.num_targets for b in batches), sum(b.num_tokens for b in batches),
                     sum(b.num_padded for b in batches), sum(b.num_examples for b in batches)]
            n_targets, n_tokens, n_padded, n_examples = reduce_sum(local) if world > 1 else local
            scale = world * cfg.grad_accum / max(n_targets, 1)
            loss_local = torch.zeros((), dtype=torch.float64, device=device)
            for b in batches:
                b = b.to(device)
                with accelerator.accumulate(wrapped):
                    loss_sum, _, *extra = wrapped(b.input_ids, b.targets, b.position_ids, b.attention_mask,
                                                  **b.loss_kwargs())
                    accelerator.backward(loss_sum * scale)
                loss_local += loss_sum.detach().double()
                for k, v in (extra[0] if extra else {}).items():
                    window_stats[k] = window_stats.get(k, 0.0) + v
            loss = (reduce_sum([float(loss_local)])[0] if world > 1 else float(loss_local)) / max(n_targets, 1)
            if not math.isfinite(loss):
                status = "diverged"
                raise TrainingDiverged(
                    f"the training loss became {loss} at step {step}; the run stopped without applying that update. "
                    f"Last good checkpoint: {last_ckpt or 'none (no checkpoint was written yet)'}. "
                    f"Try a lower lr (now {cfg.lr:g}), precision=bf16 or fp32 instead of fp16, max_grad_norm=1.0, "
                    "or check the data; continue from the checkpoint with --resume"
                )
            grad_norm = None
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                gn = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                grad_norm = float(gn) if gn is not None else None
            lr_now = scheduler.get_last_lr()[0]
            optimizer.step()
            if not optimizer.step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            trim_heap()
            dt = time.perf_counter() - t0
            counters["tokens"] += int(n_tokens)
            counters["padded"] += int(n_padded)
            counters["examples"] += int(n_examples)
            counters["train_time"] += dt
            tokens_per_s = n_tokens / dt if dt > 0 else 0.0
            window["loss"] += loss * n_targets
            window["targets"] += n_targets
            if cfg.max_minutes and step == start_step + 1:
                first_step_end = time.perf_counter()
            if cfg.max_minutes and step == start_step + BUDGET_PROBE_STEPS:
                now = time.perf_counter()
                per_step = (now - first_step_end) / (BUDGET_PROBE_STEPS - 1)
                planned = _steps_in_budget(cfg, step, total_steps, now - loop_t0, per_step)
                if planned < total_steps:
                    total_steps = planned
                    warmup = _warmup_steps(cfg, total_steps)
                    if cfg.warmup_steps is not None:  # a fixed warmup must leave a step to decay in
                        warmup = min(warmup, max(0, total_steps - 1))
                    scheduler.lr_lambdas = [_lr_lambda(cfg.lr_scheduler, warmup, total_steps, cfg.min_lr_ratio)
                                            for _ in scheduler.lr_lambdas]
                    summary_base["total_steps"] = total_steps
                    bar.total = total_steps
                    say(f"[adgen] time budget {cfg.max_minutes:g} min: {total_steps} steps fit "
                        f"({order.epoch_at(total_steps):.2f} epochs), warmup {warmup}")

            if step % cfg.log_every == 0 or step == total_steps:
                row = {
                    "step": step, "epoch": round(order.epoch_at(step), 4),
                    "loss": window["loss"] / max(window["targets"], 1), "lr": lr_now,
                    "grad_norm": grad_norm, "tokens": counters["tokens"],
                    "tokens_per_s": round(tokens_per_s, 1),
                    "padding": round(1 - n_tokens / max(n_padded, 1), 4),
                    "peak_mem_gb": round(_peak_memory_gb(device)[0], 3),
                    "time": round(counters["train_time"], 2),
                }
                # DPO (this process's pairs): share where chosen beat rejected, mean reward margin
                row.update({k: round(v / max(window["targets"] / world, 1), 4) for k, v in window_stats.items()})
                write_metrics_row(row)
                window, window_stats = {"loss": 0.0, "targets": 0}, {}
                if not cfg.progress:  # plain log lines instead of the bar (CI, log files)
                    say(f"[adgen] step {step}/{total_steps} loss {row['loss']:.4f} lr {lr_now:.2e} "
                        f"tokens/s {tokens_per_s:.0f} padding {100 * row['padding']:.1f}% "
                        f"peak mem {row['peak_mem_gb']:.2f} GiB")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            bar.update(1)

            evaluated = False
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps and eval_examples:
                last_eval = evaluate()
                write_metrics_row({"step": step, "eval_loss": last_eval})
                say(f"[adgen] step {step}: eval loss {last_eval:.4f}")
                evaluated = True
            if cfg.gen_eval_every and step % cfg.gen_eval_every == 0 and step != total_steps and gen_records:
                gen_evaluate(step)
                evaluated = True
            if evaluated and track_best(step):
                status = "early_stopped"
                say(f"[adgen] step {step}: early stopping, no better {cfg.best_metric} in "
                    f"{cfg.early_stopping_patience} evaluation(s); the best is in {out / 'best'}")
                total_steps = step
                summary_base["total_steps"] = step
            if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
                path = ckpt_mod.save_checkpoint(
                    accelerator, out, step, model=model, wrapped=wrapped, optimizer=optimizer,
                    scheduler=scheduler, trainer_state=state_for_checkpoint(step), keep=cfg.keep_checkpoints,
                    is_peft=cfg.is_peft,
                )
                last_ckpt = str(path)
    except TrainingDiverged:
        bar.close()
        if main:
            summary = {**summary_base, "status": status, "steps": step - 1, "last_checkpoint": last_ckpt}
            atomic_write_json(out / "summary.json", summary)
            atomic_write_jsonl(out / "metrics.jsonl", metrics)
        raise
    bar.close()

    # -- final eval and artefacts --------------------------------------------------------------
    if status != "early_stopped":  # (an early stop was decided on this step's evaluation)
        if eval_examples:
            last_eval = evaluate()
            write_metrics_row({"step": total_steps, "eval_loss": last_eval})
        if gen_records:
            gen_evaluate(total_steps)
        track_best(total_steps)
    artefact = save_final(accelerator, cfg, out, model, wrapped, tokenizer)
    peak, peak_kind = _peak_memory_gb(device)
    peak = max([peak] + [r.get("peak_mem_gb", 0.0) for r in metrics if "loss" in r])
    train_rows = [r for r in metrics if "loss" in r]
    summary = {
        **summary_base,
        "status": status,
        "steps": total_steps,
        "epochs": round(order.epoch_at(total_steps), 4),
        "train_time_s": round(counters["train_time"], 1),
        "tokens": counters["tokens"],
        "tokens_per_s": round(counters["tokens"] / max(counters["train_time"], 1e-9), 1),
        "padding_share": round(1 - counters["tokens"] / max(counters["padded"], 1), 4),
        "peak_memory_gb": round(peak, 3),
        "peak_memory_kind": peak_kind,
        "first_train_loss": train_rows[0]["loss"] if train_rows else None,
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "final_eval_loss": last_eval,
        "artefact": str(artefact),
        "last_checkpoint": last_ckpt,
        **_best_summary(cfg, metrics, out),
        "files": {k: str(out / k) for k in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json",
                                            "train_summary.md", "attribute_vocab.json")},
    }
    if main:
        atomic_write_jsonl(out / "metrics.jsonl", metrics)
        if cfg.plot:
            from adgen.train.plots import plot_losses

            plot_losses(metrics, out / "loss.png", title=f"{cfg.model} · {cfg.method}" + (" · DPO" if dpo else ""),
                        **({"ylabel": "train: DPO loss (+ sft_weight x NLL); eval: token cross-entropy"} if dpo else {}))
        _save_vocab(train_records, out / "attribute_vocab.json", cfg.train_data, say, vocab=gen_vocab)
        atomic_write_text(out / "train_summary.md", summary_markdown(summary))
        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    if world > 1 or cfg.report_to:
        accelerator.end_training()  # closes the trackers; destroys the process group
    return TrainResult(out, status, total_steps, summary, metrics)


LORA_INIT = "lora_init"  # PiSSA / OLoRA: the initial adapter, for converting the result to a plain LoRA


def save_final(accelerator, cfg: TrainConfig, out: Path, model, wrapped, tokenizer, name: str | None = None) -> Path:
    """adapter/ (PEFT) or model/ (full), or `name`/ (best/): complete directories, moved into place at once."""
    final = out / (name or ("adapter" if cfg.is_peft else "model"))
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    state_dict = None
    if sharded:  # every process takes part in gathering the full weights
        from adgen.train.fsdp_cpu import full_state_dict  # FSDP2 on CPUs: DTensors otherwise

        state_dict = full_state_dict(accelerator, wrapped)
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()} if state_dict else None
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
