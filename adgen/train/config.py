"""`TrainConfig`: every option of `adgen train`, one typed dataclass filled from YAML + overrides.

Load with `load_train_config(path, overrides)`; `validate()` turns impossible combinations into a
`ConfigError` that names the option and the fix. Recipes ship in `adgen/recipes/*.yaml` (`configs/` in a
clone; `adgen recipes list`); `--config` takes a path or a recipe's name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from adgen.config import load_config
from adgen.data.chat import DEFAULT_PROMPT  # "default": the built-in ad-copy system prompt
from adgen.errors import ConfigError
from adgen.recipes import resolve_config_path
from adgen.train.gen_eval import GEN_METRICS, check_best_metric

Method = Literal["lora", "qlora", "dora", "prefix", "full"]
Precision = Literal["auto", "fp32", "bf16", "bf16-frozen", "fp16"]
Batching = Literal["packed", "grouped", "padded"]
Scheduler = Literal["cosine", "linear", "constant"]


@dataclass
class LoraSection:
    r: int = 8  # LoRA rank
    alpha: int = 16  # scaling alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.05  # on the adapter input while training
    # A list of module names, or "all-linear" (every linear layer except the LM head).
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r) instead of alpha/r
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train too
    modules_to_save: list[str] | None = None  # e.g. [embed_tokens, lm_head] when new tokens are trained
    top_layers: int | None = None  # older spelling of the top-level `top_layers` (kept for saved configs)
    # initialisation of A and B: default (B = 0, A Kaiming), gaussian, pissa (A, B from the weight's top
    # singular vectors; pissa_niter_N = fast randomised SVD), olora (QR). pissa / olora change the base
    # weights, so the saved adapter is converted back to a plain LoRA of the original base (rank 2r).
    init: str = "default"
    # LoRA+: B matrices learn at lr x plus_lr_ratio (the LoRA+ paper suggests 16); null = off
    plus_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        # YAML/CLI give "all-linear" as a one-item list (the loader splits strings into lists)
        if self.target_modules in (["all-linear"], ["all_linear"], "all_linear"):
            self.target_modules = "all-linear"
        elif isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]


@dataclass
class PrefixSection:
    """P-Tuning v2 (PEFT prefix tuning): trained key/value prefixes in every layer."""

    num_virtual_tokens: int = 128  # ChatGLM-6B ptuning's PRE_SEQ_LEN
    prefix_projection: bool = False  # reparametrise through an MLP (ChatGLM's --prefix_projection)
    encoder_hidden_size: int | None = None  # MLP width when prefix_projection (default: hidden size)


@dataclass
class TrainConfig:
    # ---- model -------------------------------------------------------------------------------
    model: str = "smollm2-135m"  # hub id, local HF dir, .gguf file or built-in alias
    trust_remote_code: bool = False  # needed by ChatGLM-style checkpoints; only for code you trust
    method: Method = "lora"  # what is trained: LoRA / QLoRA (4-bit base) / DoRA adapters, prefixes, or the weights
    load_in_4bit: bool = False  # NF4 base (implied by method=qlora; also allowed with prefix)
    # None: on CPUs packed rows go to adgen's per-example attention; on GPUs to transformers' default (sdpa), which
    # keeps packed examples apart by their per-sample position_ids (so does flash_attention_2, when installed and set)
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    # LM head only at positions with a target (response tokens); false = full logits, as HF Trainer does
    target_logits_only: bool = True
    # with target_logits_only: LM head and cross-entropy fused over chunks of positions, no logits kept (less
    # memory, same loss); used where a check at setup finds the logits are the plain head's (not FSDP / DeepSpeed)
    fused_head_loss: bool = True
    # Llama-shaped decoder layers: RMSNorm / SwiGLU blocks that keep ~40% less for the backward pass (same math,
    # no recompute of matmuls; adgen/train/lean_layers.py); CPUs only, and off where the weights are sharded
    lean_layers: bool = True
    # LoRA's input dropout on CPU from 16-bit slices of 64-bit random draws (same distribution, ~2.4x cheaper than
    # torch's per-element Bernoulli draws; adgen/train/fast_dropout.py)
    fast_dropout: bool = True
    # packed rows: the prompt start all examples share (chat header + system prompt) computed once per row
    share_prompt_prefix: bool = True
    precision: Precision = "auto"  # auto: bf16 where the hardware has it natively (CUDA, AVX512-BF16 / AMX), else fp32
    allow_fp16: bool = False  # fp16 is refused unless this is set (NaN risk)
    # train only the top N decoder layers (null = all): LoRA adapters there (lora / dora / qlora), or those
    # layers' own weights with everything else frozen (full). The backward pass stops at the lowest trained
    # layer, which makes a step cheaper on CPUs (the demo's lever for time-bound runs)
    top_layers: int | None = None
    # NEFTune: uniform noise of scale alpha / sqrt(tokens x hidden) on the input embeddings while training
    # (the paper uses 5-15); null = off. Under packing "tokens" is the packed row's length.
    neftune_alpha: float | None = None
    lora: LoraSection = field(default_factory=LoraSection)
    prefix: PrefixSection = field(default_factory=PrefixSection)

    # ---- objective ---------------------------------------------------------------------------
    # sft: learn the reference copy; dpo: prefer the chosen over the rejected text of each pair in
    # preference_data (`adgen pairs` makes them from the model's own samples), against the starting model
    objective: Literal["sft", "dpo"] = "sft"
    preference_data: str | None = None  # pair file (JSON lines: content, chosen, rejected) for objective=dpo
    dpo_beta: float = 0.1  # how far from the starting model the preferences may pull (larger = less far)
    dpo_sft_weight: float = 0.0  # + this x the chosen texts' mean token NLL (RPO); keeps chosen copy likely

    # ---- data --------------------------------------------------------------------------------
    # AdGen records: JSON lines / array (UTF-8 / GBK), Parquet, CSV, a save_to_disk directory or a Hub id (ID[:SPLIT])
    train_data: str | None = None
    eval_data: str | None = None  # records (the same kinds) for the eval loss and the generation metrics
    encoding: str | None = None  # default: detect UTF-8 / UTF-8-BOM / GBK
    on_error: Literal["fail", "skip"] = "fail"  # a bad record stops the run (naming its line) or is left out
    columns: str | None = None  # e.g. "content=instruction,summary=output" or "alpaca"
    max_samples: int | None = None  # use the first N training records
    max_eval_samples: int | None = 200  # eval loss on the first N eval records
    system_prompt: str | None = DEFAULT_PROMPT  # "default", a custom prompt, or null for none
    loss_on: Literal["response", "all"] = "response"  # learn only the copy, or the prompt too
    # SFT: targets that are the chat format's end-of-turn / stop tokens (<|im_end|>, <|eot_id|>) count this many
    # times in the loss (1 = plain cross-entropy; > 1 teaches the model to end its copy under plain greedy decoding)
    end_token_weight: float = 1.0
    max_length: int = 512  # tokens per example (prompt + response); the response is cut past it

    # ---- batching / optimisation ------------------------------------------------------------
    batching: Batching = "packed"  # packed rows (no padding), length-grouped or plain padded batches
    batch_size: int = 2  # examples per micro-batch per process
    grad_accum: int = 4  # micro-batches per optimizer step
    epochs: float = 1.0  # passes over the training data (fractions allowed)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    # time budget for the training loop: after BUDGET_PROBE_STEPS steps the run is re-planned (steps and LR
    # schedule) to the steps that fit, from the measured step time; never more than epochs / max_steps give
    max_minutes: float | None = None
    lr: float = 2e-4  # peak learning rate
    lr_scheduler: Scheduler = "cosine"  # after the linear warmup
    warmup_ratio: float = 0.03  # warmup steps as a share of all steps
    warmup_steps: int | None = None  # overrides warmup_ratio
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    # AdamW moments and epsilon
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # clip the global gradient norm (0 = off)
    seed: int = 42  # model init (adapters), data order, dropout

    # ---- output ------------------------------------------------------------------------------
    output_dir: str = "runs/adgen"  # the run directory (config, metrics, checkpoints, model / adapter)
    log_every: int = 1  # steps between metrics.jsonl rows
    eval_every: int = 50  # steps between eval losses (0: only at the end)
    eval_on_start: bool = False  # also the eval loss of the untrained model (step 0)
    # generation metrics during training (adgen.train.gen_eval): generate for the first gen_eval_samples
    # eval records every gen_eval_every steps (0 = off) and at the end; ROUGE / BLEU-4 / coverage / stops
    gen_eval_every: int = 0
    gen_eval_samples: int = 16  # eval records generated for at each generation evaluation
    gen_max_new_tokens: int | None = None  # None: sized from the tokenizer
    best_metric: str | None = None  # eval_loss, rouge-1, bleu-4, attr_coverage, ended_share, ...: keeps best/
    early_stopping_patience: int = 0  # evaluations without a new best_metric before the run stops (0 = off)
    save_every: int = 50  # steps between checkpoints (0: only the final artefacts)
    keep_checkpoints: int = 2  # newest checkpoints kept
    plot: bool = True  # loss.png in the run directory
    progress: bool = True  # a progress bar (false: one log line per logged step)
    # experiment tracking through accelerate's trackers: tensorboard (event files in <output_dir>/tracking),
    # wandb (offline unless WANDB_MODE says otherwise), mlflow (a local mlruns/ store unless
    # MLFLOW_TRACKING_URI is set). Every metrics.jsonl row is logged at its step; the config as hyperparameters.
    report_to: list[str] = field(default_factory=list)
    # auto (CUDA if torch sees a GPU, else CPU), cpu, cuda, cuda:N; an explicit cuda that is not there is an error.
    # Under accelerate launch / torchrun each process takes the GPU of its LOCAL_RANK (cuda:N is not used)
    device: str = "auto"

    # ------------------------------------------------------------------------------------------
    def _validate_lora_variants(self) -> None:
        lora_like = self.method in ("lora", "qlora", "dora")
        init = str(self.lora.init)
        if init not in LORA_INITS and not re.fullmatch(r"pissa_niter_[1-9][0-9]*", init):
            raise ConfigError(f"config key 'lora.init' is {init!r}; use one of {', '.join(LORA_INITS)} "
                              "or pissa_niter_N (PiSSA with a fast randomised SVD, e.g. pissa_niter_16)")
        if init != "default" and not lora_like:
            raise ConfigError(f"lora.init={init} needs method=lora (or dora); this run is method={self.method}")
        if init.startswith(("pissa", "olora")) and (self.quantized or self.method == "dora"):
            raise ConfigError(f"lora.init={init} rewrites the base weights: not with a 4-bit base or DoRA here; "
                              "use method=lora with a full-precision base, or lora.init=default")
        ratio = self.lora.plus_lr_ratio
        if ratio is not None and (not lora_like or not ratio > 0):
            raise ConfigError(f"config key 'lora.plus_lr_ratio' (LoRA+) must be > 0 with method=lora / qlora / dora "
                              f"(e.g. 16), or null; got {ratio!r} with method={self.method}")
        if self.neftune_alpha is not None and not self.neftune_alpha > 0:
            raise ConfigError(f"config key 'neftune_alpha' must be > 0 (e.g. 5), or null for no noise; "
                              f"got {self.neftune_alpha!r}")

    def _validate_dpo(self) -> None:
        if not self.preference_data:
            raise ConfigError("objective=dpo needs preference_data: a pair file made with "
                              "`adgen pairs --input GENERATIONS --output pairs.jsonl` (preference_data=pairs.jsonl)")
        if not self.dpo_beta > 0:
            raise ConfigError(f"config key 'dpo_beta' must be > 0 (e.g. 0.1), got {self.dpo_beta!r}")
        if self.dpo_sft_weight < 0:
            raise ConfigError(f"config key 'dpo_sft_weight' must be >= 0 (0 = pure DPO), got {self.dpo_sft_weight!r}")
        if self.loss_on != "response":
            raise ConfigError("objective=dpo compares the responses' log-probabilities: set loss_on=response")
        if self.end_token_weight != 1.0:
            raise ConfigError(f"config key 'end_token_weight' ({self.end_token_weight!r}) weights the SFT loss only; "
                              "objective=dpo compares whole responses: set end_token_weight=1 here "
                              "(weigh the SFT run before it)")

    @property
    def quantized(self) -> bool:
        return self.method == "qlora" or self.load_in_4bit

    @property
    def is_peft(self) -> bool:
        return self.method != "full"

    def validate(self) -> "TrainConfig":
        if self.objective == "dpo":
            self._validate_dpo()
        elif self.objective != "sft":
            raise ConfigError(f"config key 'objective' is {self.objective!r}; use sft or dpo")
        elif not self.train_data:
            raise ConfigError("no training data: set train_data in the config or pass --train-data FILE")
        if isinstance(self.report_to, str):  # `report_to: tensorboard` in YAML
            self.report_to = [self.report_to]
        bad = [t for t in self.report_to if t not in TRACKERS]
        if bad:
            raise ConfigError(f"config key 'report_to': unknown tracker {bad[0]!r}; use any of {list(TRACKERS)}, "
                              "e.g. 'report_to=[tensorboard]'")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"config key 'max_steps' must be >= 1, got {self.max_steps}")
        check_best_metric(self.best_metric)
        if self.gen_eval_every < 0 or self.gen_eval_samples < 1:
            raise ConfigError("config keys 'gen_eval_every' must be >= 0 (0 = off) and 'gen_eval_samples' >= 1")
        if self.gen_eval_every and not self.eval_data:
            raise ConfigError("gen_eval_every needs eval_data (set eval_data or pass --eval-data FILE)")
        if self.best_metric in GEN_METRICS and not self.gen_eval_every:
            raise ConfigError(f"best_metric '{self.best_metric}' is a generation figure: set gen_eval_every "
                              "(e.g. gen_eval_every=50), or use best_metric=eval_loss")
        if self.early_stopping_patience < 0 or (self.early_stopping_patience and not self.best_metric):
            raise ConfigError("early_stopping_patience must be >= 0 and needs best_metric (e.g. best_metric=rouge-1)")
        if self.lora.top_layers is not None:
            if self.top_layers not in (None, self.lora.top_layers):
                raise ConfigError("config keys 'top_layers' and 'lora.top_layers' disagree; set only top_layers")
            self.top_layers = self.lora.top_layers
        if self.top_layers is not None and self.top_layers < 1:
            raise ConfigError(f"config key 'top_layers' must be >= 1 (or null for every layer), got {self.top_layers}")
        if self.top_layers is not None and self.method == "prefix":
            raise ConfigError("top_layers does not apply to method=prefix (its prefixes reach every layer); set it to null")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"config key 'max_minutes' must be > 0 (or null for no time budget), got {self.max_minutes}")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"config key 'epochs' must be > 0, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr' must be > 0, got {self.lr}")
        if not 0 < self.end_token_weight < math.inf:
            raise ConfigError(f"config key 'end_token_weight' must be a finite number > 0 (1 = every target token counts "
                              f"the same, e.g. 3 to weigh the end-of-turn token 3x), got {self.end_token_weight!r}")
        if self.max_length < 8:
            raise ConfigError(f"config key 'max_length' is too small ({self.max_length})")
        if self.method == "full" and self.load_in_4bit:
            raise ConfigError(
                "method=full with load_in_4bit: 4-bit weights cannot be trained directly; "
                "use method=qlora (LoRA over a 4-bit base) or drop load_in_4bit"
            )
        if self.method == "full" and self.precision == "bf16-frozen":
            raise ConfigError(
                "precision=bf16-frozen keeps frozen base weights in bf16 and trainable ones in fp32; with "
                "method=full every weight is trainable: use precision=bf16 or fp32"
            )
        if self.precision == "fp16" and not self.allow_fp16:
            raise ConfigError(
                "fp16 training is refused: Llama-3 (and most modern LLMs) overflow in fp16 and the loss turns NaN. "
                "Use precision=bf16 (GPUs since Ampere) or fp32; if you really must, set allow_fp16=true "
                "(--force-fp16), which also enables loss scaling"
            )
        if self.lora.r < 1:
            raise ConfigError(f"config key 'lora.r' must be >= 1, got {self.lora.r}")
        self._validate_lora_variants()
        self.lora.__post_init__()
        if self.prefix.num_virtual_tokens < 1:
            raise ConfigError("config key 'prefix.num_virtual_tokens' must be >= 1")
        for name in ("log_every",):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be >= 1")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name}' must be >= 0 (0 = off)")
        if self.keep_checkpoints < 1:
            raise ConfigError("config key 'keep_checkpoints' must be >= 1")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", str(self.device).strip().lower()):
            raise ConfigError(f"config key 'device' is {self.device!r}; use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
        return self


def load_train_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    return load_config(TrainConfig, None if path is None else resolve_config_path(path), overrides)


TRACKERS = ("tensorboard", "wandb", "mlflow")
LORA_INITS = ("default", "gaussian", "pissa", "olora")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}

# Keys that may change between a run and its --resume without changing what is computed up to the
# checkpoint (anything else that differs is reported).
RESUME_MUTABLE_KEYS = {
    "max_steps", "max_minutes", "epochs", "output_dir", "gen_eval_every", "gen_eval_samples",
    "gen_max_new_tokens", "best_metric", "early_stopping_patience", "log_every", "eval_every", "save_every", "keep_checkpoints",
    "plot", "progress", "device", "eval_data", "max_eval_samples", "report_to",
}
