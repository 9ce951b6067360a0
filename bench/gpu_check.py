"""One run that checks adgen's CUDA paths on a Llama-3-8B-shaped model with random weights (no download).

    bench/gpu_check.sh            # GPU: the shipped Llama-3-8B config, bf16 on cuda (<= 8 min on one H100)
    bench/gpu_check.sh --dry      # CPU: the same code on a 2-layer, hidden-64 model of the same family (< 1 min)

Phases (each in try/except: one failing phase reports `error` and the others still run; exit status 1):
1. model: `from_config(shipped config)` on the device in bf16, random weights, saved with the real Llama-3
   tokenizer (../shared/llama3-tokenizer) to a temporary directory (/dev/shm where it has room), so that
   every later phase loads it as a user's model directory, through the product's own loaders.
2. LoRA and QLoRA (recipes llama3-8b-lora / llama3-8b-qlora, first records of ../shared/adgen/train.json):
   adgen's trainer (`adgen.train.train`) vs the plain HF Trainer + PEFT baseline (what bench/train_throughput.py
   runs on CPUs), each: tokens/s over the steps after the first (no warm-up in the figure), peak
   `torch.cuda.max_memory_allocated` (and reserved), the loss finite; adgen's run also against `adgen plan`'s
   estimate for the same config (allocated peak). QLoRA needs bitsandbytes on CUDA: skipped in --dry.
3. generation: adgen's continuous-batching engine at 32 slots vs `model.generate` on left-padded batches of 32
   (the same HFGenerator with continuous=False), plain greedy, the same prompts: generated tokens/s.
4. serving: `adgen.serve`'s app in a thread (ServerThread) on the generator: 32 concurrent streams
   (bench/serve_load.py's check: complete, one id each, no mix-ups) and one seeded sampling request sent
   twice (same text = seeded_ok).
Ends with ONE line `gpu_check: gpu=... lora_tok_s=... ...` and writes every figure to a JSON file.
The GPU and --dry modes differ only in `Mode` (model size, device, step and token counts).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "llama3-tokenizer"
TRAIN_DATA = SHARED / "adgen" / "train.json"
API_KEY = "gpu-check-key-0123456789"
SUMMARY_KEYS = ("gpu", "lora_tok_s", "baseline_tok_s", "lora_peak_gib", "baseline_peak_gib", "plan_peak_gib",
                "qlora_tok_s", "qlora_baseline_tok_s", "qlora_peak_gib", "qlora_baseline_peak_gib",
                "qlora_plan_peak_gib", "gen_tok_s", "generate_tok_s", "gen_speedup", "serve_ok",
                "serve_ttft_p95_s", "seeded_ok")


@dataclass(frozen=True)
class Mode:
    name: str
    device: str
    tiny: bool  # 2 layers, hidden 64 (the family's vocabulary and head layout kept)
    train_steps: int  # optimizer steps per training run (the first is left out of tokens/s)
    gen_tokens: int
    serve_tokens: int
    qlora: bool
    prompts: int = 32  # generation prompts and concurrent serving streams (32 slots)
    train_overrides: tuple = ()  # (key, value) on top of the recipe: smaller steps for the CPU


GPU = Mode("gpu", "cuda", tiny=False, train_steps=6, gen_tokens=64, serve_tokens=32, qlora=True)
# The CPU run keeps the recipe's code path with less data per step: the baseline's full 128k-vocabulary logits
# dominate a tiny model's step on 2 cores.
DRY = Mode("dry", "cpu", tiny=True, train_steps=2, gen_tokens=8, serve_tokens=8, qlora=False, prompts=16,
           train_overrides=(("grad_accum", 1), ("max_length", 256)))


# ---- helpers ----------------------------------------------------------------------------------------
def free_memory(mode: Mode) -> None:
    import torch

    gc.collect()
    if mode.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(mode: Mode, before: int = 0) -> dict:
    """torch's allocated / reserved peak since the last `free_memory` (None on CPU); `before`: what an earlier
    phase left allocated (it counts in the peak too, and is reported)."""
    import torch

    if mode.device != "cuda":
        return {"peak_gib": None, "reserved_gib": None}
    torch.cuda.synchronize()
    return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
            "left_before_gib": round(before / 2**30, 3)}


def allocated(mode: Mode) -> int:
    import torch

    return torch.cuda.memory_allocated() if mode.device == "cuda" else 0


def steady_tokens_per_s(points: list[tuple[float, float]]) -> float | None:
    """(seconds, tokens) at the end of each step, cumulative: tokens/s from the end of step 1 to the last."""
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return round((points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0]), 1)


def model_config(mode: Mode):
    from transformers import AutoConfig

    from adgen.plan.arch import shipped_config_path

    config = AutoConfig.from_pretrained(str(shipped_config_path("llama3-8b-instruct")))
    # the family kept: Llama-3's vocabulary and tokenizer, grouped K/V heads (4 query, 2 KV), SwiGLU; every size a
    # multiple of 64 (bitsandbytes' 4-bit blocks: its CPU kernel refuses an intermediate size of 224)
    if mode.tiny:
        config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 256,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    return config


def work_dir(bytes_needed: int) -> Path:
    """/dev/shm when it has room (writing and re-reading 16 GB there takes seconds), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.3 * bytes_needed:
        return Path(tempfile.mkdtemp(prefix="adgen-gpu-check-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="adgen-gpu-check-"))


def build_model_dir(mode: Mode, out: Path) -> dict:
    """Random weights of the config's shape, made on the device in bf16, saved as a HF model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = model_config(mode)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(mode.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos).save_pretrained(out)
    del model
    free_memory(mode)
    return {"parameters": params, "seconds": round(time.perf_counter() - t0, 1), "dir": str(out)}


# ---- training ----------------------------------------------------------------------------------------
def train_config(recipe: str, mode: Mode, model_dir: Path, out: Path):
    from adgen.train.config import load_train_config

    overrides = {"model": str(model_dir), "train_data": str(TRAIN_DATA), "eval_data": None,
                 "max_steps": mode.train_steps, "output_dir": str(out), "save_every": 0, "eval_every": 0,
                 "log_every": 1, "progress": False, "plot": False, "device": mode.device, "gen_eval_every": 0,
                 "report_to": [], **dict(mode.train_overrides)}
    probe = load_train_config(recipe, overrides)
    records = mode.train_steps * probe.batch_size * probe.grad_accum  # one epoch of exactly train_steps steps
    return load_train_config(recipe, {**overrides, "max_samples": records})


def longest_micro_batch(cfg) -> int:
    """The most tokens one micro-batch of the run holds: the trainer's own data order over the same examples."""
    from adgen.train.collate import DataOrder

    examples = encode(cfg, _tokenizer(cfg.model))
    order = DataOrder([len(e.input_ids) for e in examples], batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                      world_size=1, seed=cfg.seed, batching=cfg.batching)
    return max(sum(len(examples[i].input_ids) for i in micro)
               for step in range(cfg.max_steps) for micro in order.step_indices(step, 0))


def plan_estimates(cfg) -> dict:
    """`adgen plan` for the run: at the longest micro-batch it actually trains on (what the measured peak is
    compared with), and at the recipe's worst case (every example at max_length)."""
    import copy

    from adgen.plan import plan_config

    worst = plan_config(cfg)
    actual_cfg = copy.deepcopy(cfg)
    actual_cfg.max_length = max(8, math.ceil(longest_micro_batch(cfg) / cfg.batch_size))
    actual = plan_config(actual_cfg)
    return {"plan_peak_gib": round(actual["train_peak_allocated_bytes"] / 2**30, 3),
            "plan_device_peak_gib": round(actual["train_peak_bytes"] / 2**30, 3),
            "plan_tokens": actual["batch"]["tokens"],
            "plan_recipe_peak_gib": round(worst["train_peak_allocated_bytes"] / 2**30, 3),
            "plan_breakdown_gib": {k: round(v / 2**30, 3) for k, v in actual["train_breakdown"].items()}}


def run_adgen(cfg, mode: Mode) -> dict:
    """adgen's trainer on the recipe, and `adgen plan`'s estimate of the same run."""
    from adgen.train.trainer import train

    free_memory(mode)
    before = allocated(mode)
    train(cfg, overwrite=True)
    figures = peak_gib(mode, before)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    losses = [r["loss"] for r in rows]
    return {**figures, "tok_s": steady_tokens_per_s([(r["time"], r["tokens"]) for r in rows]),
            "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses), "losses": losses,
            **plan_estimates(cfg)}


def _baseline_model(cfg, mode: Mode):
    """The reference projects' model: from_pretrained in bf16 (NF4 via BitsAndBytesConfig for qlora), PEFT LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.bfloat16}
    if mode.device == "cuda":
        kwargs["device_map"] = {"": 0}
    if cfg.quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    model.config.use_cache = False
    if cfg.quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lc = cfg.lora
    return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=lc.target_modules, task_type="CAUSAL_LM"))


def run_baseline(cfg, mode: Mode) -> dict:
    """HF Trainer + PEFT on the same records, batch and steps (padded batches, full logits)."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    free_memory(mode)
    before = allocated(mode)
    model = _baseline_model(cfg, mode)
    tok = _tokenizer(cfg.model)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encode(cfg, tok)]
    points: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if mode.device == "cuda":
                torch.cuda.synchronize()
            points.append((time.perf_counter(), float(state.num_input_tokens_seen)))

    targs = TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "trainer"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_steps=cfg.max_steps, learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        logging_steps=1, save_strategy="no",
        report_to=[], seed=cfg.seed, remove_unused_columns=False, disable_tqdm=True, bf16=True,
        use_cpu=mode.device == "cpu", dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
        gradient_checkpointing=cfg.gradient_checkpointing and not cfg.quantized,
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_grad_norm=cfg.max_grad_norm,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[StepClock()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    figures = peak_gib(mode, before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del trainer, model
    free_memory(mode)
    return {**figures, "tok_s": steady_tokens_per_s(points),
            "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses), "losses": losses}


def encode(cfg, tokenizer):
    """The records as adgen's trainer encodes them (default system prompt, response-only labels, max_length)."""
    from adgen.data.chat import ChatFormatter, encode_records
    from adgen.data.records import read_records

    formatter = ChatFormatter(tokenizer, max_length=cfg.max_length)
    return encode_records(formatter, read_records(cfg.train_data).records[: cfg.max_samples])[0]


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ---- generation and serving ---------------------------------------------------------------------------
def run_generation(mode: Mode, model_dir: Path):
    """(figures, generator): the engine at `mode.prompts` slots vs model.generate on batches of as many."""
    from adgen.generation import DecodingConfig, load_generator
    from serve_load import prompts

    free_memory(mode)
    gen = load_generator(str(model_dir), batch_size=mode.prompts, device=mode.device)
    contents = prompts(mode.prompts)
    config = DecodingConfig.plain(max_new_tokens=mode.gen_tokens)
    figures: dict = {"uses_engine": gen.uses_engine, "dtype": str(next(gen.model.parameters()).dtype)}
    for name, continuous in (("engine", True), ("generate", False)):
        gen.continuous = continuous
        gen.generate(contents[:2], DecodingConfig.plain(max_new_tokens=4))  # warm-up: kernels, allocations
        t0 = time.perf_counter()
        outs = gen.generate(contents, config)
        seconds = time.perf_counter() - t0
        tokens = sum(o.completion_tokens for o in outs)
        figures[name] = {"seconds": round(seconds, 3), "tokens": tokens, "tok_s": round(tokens / seconds, 1)}
    gen.continuous = True
    figures["speedup"] = round(figures["engine"]["tok_s"] / max(figures["generate"]["tok_s"], 1e-9), 2)
    figures.update(peak_gib(mode))
    return figures, gen


def _seeded_request(url: str, model_id: str) -> dict:
    import httpx

    body = {"model": model_id, "messages": [{"role": "user", "content": "类型#裙*颜色#黑色*风格#简约"}],
            "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    texts = []
    for _ in range(2):
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
        r.raise_for_status()
        texts.append(r.json()["choices"][0]["message"]["content"])
    return {"seeded_ok": texts[0] == texts[1] and bool(texts[0]), "seeded_texts": texts}


def run_serve(mode: Mode, generator, model_dir: Path) -> dict:
    """The app in a thread over the generator; 32 streams at once, then a seeded request twice."""
    import asyncio

    from adgen.serve.api import create_app
    from adgen.serve.server import ServerThread
    from adgen.serve.service import ServeState
    from adgen.serve.settings import ServeSettings
    from serve_load import check, run_load

    settings = ServeSettings(model=str(model_dir), api_key=API_KEY, batch_size=mode.prompts, ui=False,
                             device=mode.device)
    state = ServeState(generator, settings)
    with ServerThread(create_app(state, ui=False), state=state) as srv:
        run = asyncio.run(run_load(srv.url, API_KEY, state.model_id, mode.prompts, mode.serve_tokens, 300.0))
        # random bf16 weights: batched and one-at-a-time texts may part by rounding; lost / mixed-up streams fail
        problems, figures = check(run, max_differ_share=1.0)
        seeded = _seeded_request(srv.url, state.model_id)
    return {"serve_ok": not problems, "problems": problems[:5], **figures, **seeded}


# ---- driver -------------------------------------------------------------------------------------------
DEADLINE = [float("inf")]  # perf_counter() after which no further phase starts (--budget-s)


def phase(results: dict, name: str, fn, *args):
    """Run one phase; its failure is recorded (and printed), not fatal to the others."""
    t0 = time.perf_counter()
    if t0 > DEADLINE[0]:
        results[name] = {"error": "not run: the time budget (--budget-s) was spent"}
        print(f"[gpu_check] {name}: not run, time budget spent", flush=True)
        return None
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        value = fn(*args)
    except Exception as e:  # noqa: BLE001 - report every phase's outcome
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        return None
    figures = value[0] if isinstance(value, tuple) else value
    results[name] = {**figures, "phase_s": round(time.perf_counter() - t0, 1)}
    print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.0f}s", flush=True)
    return value


def summary(results: dict, gpu: str) -> dict:
    def get(name, key):
        r = results.get(name)
        if r is None:
            return "skipped"
        return "error" if "error" in r else r.get(key)

    gen = results.get("generation", {})
    return {
        "gpu": gpu.replace(" ", "_"),
        "lora_tok_s": get("lora", "tok_s"), "baseline_tok_s": get("lora_baseline", "tok_s"),
        "lora_peak_gib": get("lora", "peak_gib"), "baseline_peak_gib": get("lora_baseline", "peak_gib"),
        "plan_peak_gib": get("lora", "plan_peak_gib"),
        "qlora_tok_s": get("qlora", "tok_s"), "qlora_baseline_tok_s": get("qlora_baseline", "tok_s"),
        "qlora_peak_gib": get("qlora", "peak_gib"), "qlora_baseline_peak_gib": get("qlora_baseline", "peak_gib"),
        "qlora_plan_peak_gib": get("qlora", "plan_peak_gib"),
        "gen_tok_s": gen.get("engine", {}).get("tok_s") if "error" not in gen else "error",
        "generate_tok_s": gen.get("generate", {}).get("tok_s") if "error" not in gen else "error",
        "gen_speedup": get("generation", "speedup"),
        "serve_ok": get("serve", "serve_ok"), "serve_ttft_p95_s": get("serve", "ttft_p95_s"),
        "seeded_ok": get("serve", "seeded_ok"),
    }


def failed(results: dict) -> bool:
    bad_loss = any(isinstance(r, dict) and r.get("loss_finite") is False for r in results.values())
    serve = results.get("serve", {})
    return any("error" in r for r in results.values() if isinstance(r, dict)) or bad_loss \
        or serve.get("serve_ok") is False or serve.get("seeded_ok") is False


def device_name(mode: Mode) -> str:
    import torch

    if mode.device == "cuda":
        return torch.cuda.get_device_name(0)
    return "cpu-dry"


def run_all(mode: Mode, work: Path) -> dict:
    results: dict = {}
    model_dir = work / "model"
    if phase(results, "model", build_model_dir, mode, model_dir) is None:
        return results
    recipes = [("lora", "llama3-8b-lora")] + ([("qlora", "llama3-8b-qlora")] if mode.qlora else [])
    if not mode.qlora:
        results["qlora_skipped"] = "bitsandbytes' 4-bit NF4 training needs CUDA: QLoRA runs in the GPU mode only"
        print(f"[gpu_check] qlora skipped: {results['qlora_skipped']}", flush=True)
    for key, recipe in recipes:
        phase(results, key, lambda: run_adgen(train_config(recipe, mode, model_dir, work / key), mode))
        phase(results, f"{key}_baseline",
              lambda: run_baseline(train_config(recipe, mode, model_dir, work / f"{key}-base"), mode))
    generated = phase(results, "generation", run_generation, mode, model_dir)
    if generated is not None:
        phase(results, "serve", run_serve, mode, generated[1], model_dir)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU, a 2-layer hidden-64 model of the family (CI)")
    p.add_argument("--json", default=None, help="write the figures here (default: bench/results/gpu_check.json; "
                   "--dry: a temporary file)")
    p.add_argument("--keep", action="store_true", help="keep the temporary model and run directories")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no phase after this many seconds (the summary line still comes; default 420)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    mode = DRY if args.dry else GPU
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of every load would bury the figures
    warnings.filterwarnings("ignore", category=FutureWarning)

    if mode.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}); run with --dry for the CPU check",
              file=sys.stderr)
        return 2
    config = model_config(mode)
    work = work_dir(2 * 8_100_000_000 if not mode.tiny else 0)
    t0 = time.perf_counter()
    DEADLINE[0] = t0 + args.budget_s
    # the shell's timeout sends SIGTERM: exit through `finally`, so 16 GB of weights do not stay in /dev/shm
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        results = run_all(mode, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    line = summary(results, device_name(mode))
    out = Path(args.json) if args.json else (
        Path(tempfile.gettempdir()) / "gpu_check-dry.json" if args.dry else ROOT / "bench/results/gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": asdict(mode), "summary": line, "results": results,
                               "architecture": {k: getattr(config, k) for k in ("num_hidden_layers", "hidden_size",
                                                                                 "intermediate_size", "vocab_size")},
                               "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1)},
                              indent=2, default=str) + "\n")
    print(f"[gpu_check] figures: {out}")
    print("gpu_check: " + " ".join(f"{k}={'n/a' if line[k] is None else line[k]}" for k in SUMMARY_KEYS))
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
