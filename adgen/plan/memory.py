"""GPU memory of training and serving, from the model's shapes and the recipe: documented formulas, no GPU.

Training peak = weights + adapter weights + gradients + AdamW state + activations + the LM head's loss buffers
+ one layer's backward workspace (+ a 4-bit layer's dequantized weight), then the caching allocator's slack and
the CUDA context on top. The terms follow what adgen's trainer does on a GPU (adgen/train): frozen weights in the
storage dtype (bf16), or NF4 with double quantization for method=qlora, where peft's
`prepare_model_for_kbit_training` upcasts every other weight (embeddings, norms, LM head) to fp32; trainable
weights, their gradients and both Adam moments in fp32 (PEFT's `autocast_adapter_dtype`; full fine-tuning keeps
fp32 master weights, so there is no separate master copy); transformers' own decoder layers with sdpa attention
(the CPU-only lean layers / per-example attention are not used on GPUs); the LM head fused with the loss over
chunks of at most `CHUNK_BYTES` of logits (adgen/train/linear_cross_entropy.py).

Activations are counted as the bytes autograd keeps per token per decoder layer (`layer_bytes_per_token`), a
structural count of the tensors each op saves, checked against `torch.autograd.graph.saved_tensors_hooks` on
tiny Llamas on CPU (LoRA q/v, LoRA all-linear, full fine-tuning; equal to the byte, tests/test_plan.py; with
dropout the CPU keeps its mask in the input's dtype, CUDA in one byte per element, which is what is counted). It is the
same kind of count as Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", arXiv:2205.05198: 34*h + 5*a*s bytes per token per layer for GPT with fp16 and dropout), here for
Llama's RMSNorm / SwiGLU / GQA and a flash-style attention kernel (no a*s score matrix kept).

Published figures this lands on (comments in `tests/test_plan.py` pin them): Llama-3-8B QLoRA (r=16, all
linear, gradient checkpointing) 10-16 GB at batch 2 x 1024 (third-party guides: ~10 GB at batch 1, ~14 GB at
batch 4, gigagpu.com "fine-tune LLaMA 3 8B LoRA GPU guide"); LoRA on a bf16 8B base ~18-22 GB at small batch
(the same guide: ~22 GB at batch 1, r=16). NF4 storage: QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314),
blocks of 64 with an 8-bit absmax each and an fp32 constant per 256 blocks (double quantization): 4.127 bits per
weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from adgen.generation.kv_budget import kv_bytes, kv_shape
from adgen.plan.arch import ModelShape
from adgen.train.config import TrainConfig

GIB = 1024**3
CHUNK_BYTES = 96 * 1024 * 1024  # adgen/train/linear_cross_entropy.py: logits per chunk of the fused head
ROW_MULTIPLE = 64  # adgen/train/collate.py: packed rows are padded to a multiple of this
CE_CHUNK_ROWS = 2048  # adgen/train/loss.py: rows per fp32 cross-entropy chunk (head not fused)
# NF4 with double quantization: 4 bits + an 8-bit absmax per 64 weights + an fp32 constant per 256 absmaxes.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# The CUDA context, cuBLAS / cuDNN handles and workspaces: memory the GPU shows in use that
# torch.cuda.memory_allocated never counts (~0.4-0.6 GiB with torch 2.x's lazy module loading on A100 / H100).
CUDA_CONTEXT_BYTES = GIB // 2
# The caching allocator's rounding and fragmentation: what it reserves beyond the allocated peak (~5% for a
# training loop's repeating shapes; bench/gpu_check.py reports max_memory_reserved / max_memory_allocated).
ALLOCATOR_SLACK = 0.05
CARDS_GIB = (24, 40, 80)  # the usual card sizes (RTX 3090/4090, A100-40GB, A100/H100-80GB)

_ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "query", "key", "value"}
_MLP_IN = {"gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "w1", "w3"}
_ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "wo"}
_MLP_OUT = {"down_proj", "fc2", "w2"}


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of what lives where in a training run on a GPU."""

    storage: int  # frozen base weights (non-quantized)
    compute: int  # matmuls (the autocast dtype)
    residual: int  # the residual stream between layers (fp32 when the norms / embeddings are fp32)
    head: int  # the LM head's weight
    lora_cast: bool  # PEFT casts LoRA inputs to the adapter's fp32 (adgen skips that only for lora + bf16 autocast)
    name: str


def training_dtypes(cfg: TrainConfig) -> Dtypes:
    """The trainer's precision policy on a GPU with native bf16 (sm80+: A100, H100, RTX 30xx+), as
    `adgen.train.peft_setup.resolve_precision` decides it there (precision auto -> bf16)."""
    name = "bf16" if cfg.precision == "auto" else cfg.precision
    half = 4 if name == "fp32" else 2
    full = cfg.method == "full"
    storage = 4 if name == "fp32" or (full and name in ("bf16", "fp16")) else half
    if cfg.quantized:  # prepare_model_for_kbit_training: every non-4-bit weight in fp32
        return Dtypes(storage=4, compute=half, residual=4, head=4, lora_cast=True, name=f"{name} (NF4 base)")
    uncast = cfg.method == "lora" and name == "bf16"  # trainer.py: run.lora_inputs_uncast
    return Dtypes(storage=storage, compute=half, residual=storage, head=storage, lora_cast=not uncast, name=name)


def tokens_per_micro_batch(cfg: TrainConfig) -> int:
    """The most tokens one forward sees: batch_size examples at max_length (a packed row is padded to a
    multiple of 64); DPO runs chosen and rejected texts together."""
    tokens = cfg.batch_size * cfg.max_length
    if cfg.batching == "packed":
        tokens += -tokens % ROW_MULTIPLE
    return tokens * (2 if cfg.objective == "dpo" else 1)


def _lora_bytes(target, dtypes: Dtypes, dropout: float) -> int:
    """What one LoRA module keeps per token: CUDA's dropout keeps a 1-byte mask and its output (in the compute
    dtype, what lora_A saves); without dropout lora_A saves its input, a compute-dtype copy where PEFT or autocast
    cast it, else the tensor the layer keeps anyway. Plus lora_A's output (r values) for lora_B."""
    d = target.in_features
    kept = (1 + dtypes.compute) * d if dropout > 0 else (dtypes.compute * d if dtypes.lora_cast else 0)
    return kept + dtypes.compute * target.r


def layer_bytes_per_token(shape: ModelShape, cfg: TrainConfig, dtypes: Dtypes, layer: int | None) -> int:
    """Bytes autograd keeps per token for one decoder layer in training (transformers' Llama-style layer, sdpa).

    norms: each RMSNorm keeps its input in fp32 (4h); a trained norm weight also its normalised output.
    attention: the rotated q, k, v and the output (compute dtype); with grouped K/V heads transformers' sdpa
      repeats k / v to every head when it passes a mask (packed or padded rows), so they are kept at q's width.
    projections: a frozen linear keeps nothing; a trained one (full) its input in the compute dtype (a cast
      copy per projection when the input is fp32); LoRA: `_lora_bytes`; 4-bit layers return the residual dtype.
    MLP: silu keeps gate, the product keeps silu(gate) and up; down's input (the product) when it trains.
    """
    h, i, c, r = shape.hidden, shape.intermediate, dtypes.compute, dtypes.residual
    targets = [t for t in shape.lora if t.layer == layer]
    names = {t.name for t in targets}
    dropout = cfg.lora.dropout if cfg.is_peft else 0.0
    full = cfg.method == "full"
    out = 2 * (4 * h + 4)  # the two RMSNorms' fp32 inputs and 1/rms
    if shape.trained_norms:
        out += 2 * r * h
    proj_out = r if cfg.quantized else c  # bnb's Linear4bit returns its input's dtype
    masked_gqa = shape.kv_heads != shape.heads and cfg.attn_implementation != "flash_attention_2"
    kv = shape.q_width if masked_gqa else shape.kv_width
    out += c * (2 * shape.q_width + 2 * kv) + 4 * shape.heads  # q, k, v, output; log-sum-exp per head
    if full:  # every projection trains: each keeps its own (cast) input; o's input is the attention output
        out += (5 * c * h) if r != c else (2 * c * h)
    else:
        for group, width in ((_ATTN_IN, h), (_MLP_IN, h)):
            if dropout == 0 and not dtypes.lora_cast and names & group:
                out += r * width  # the norm's output, which lora_A keeps (shared by the group's modules)
    out += 3 * proj_out * i  # gate (silu's input), silu(gate), up
    if full or (names & _MLP_OUT and dropout == 0 and not dtypes.lora_cast):
        out += proj_out * i  # down's input
    out += sum(_lora_bytes(t, dtypes, dropout) for t in targets)
    return out


def head_bytes(shape: ModelShape, cfg: TrainConfig, dtypes: Dtypes, tokens: int) -> dict:
    """The final norm and the LM head + loss. Fused (the default on one GPU): the hidden states at the target
    positions, the gradient kept for them, a chunk of logits in the compute dtype with its fp32 softmax (the
    loss math runs in fp32: adgen.train.linear_cross_entropy's CUDA branch, out of place) and, where the head's weight
    is not in the compute dtype (fp32 after prepare_model_for_kbit_training), a compute-dtype copy of it.
    Not fused: the logits at the target positions plus their fp32 log-softmax (every position without
    target_logits_only, as HF Trainer computes them)."""
    h, v, c = shape.hidden, shape.vocab, dtypes.compute
    norm = tokens * (4 + dtypes.residual) * h
    if cfg.fused_head_loss and cfg.target_logits_only:
        chunk_rows = max(1, CHUNK_BYTES // (v * c))
        logits = min(tokens, chunk_rows) * v * (c + 4)
        kept = tokens * h * (dtypes.residual + dtypes.residual)  # gathered hidden + its gradient
        cast = v * h * c if dtypes.head != c else 0
        return {"final_norm": norm, "head_loss": logits + kept, "head_weight_copy": cast}
    logits = tokens * v * c + min(tokens, CE_CHUNK_ROWS) * v * 4 * 2
    saved = tokens * v * 4  # log-softmax output per chunk, all kept for backward
    return {"final_norm": norm, "head_loss": logits + saved, "head_weight_copy": 0}


def weight_bytes(shape: ModelShape, cfg: TrainConfig, dtypes: Dtypes) -> dict:
    """Base weights where they live: NF4 (layers' linears and other linears but the head) + the rest in fp32 for
    qlora; the storage dtype otherwise (full fine-tuning: fp32 master weights, which are also what trains)."""
    if cfg.quantized:
        quantized = shape.layer_linear_params + shape.linear_params_outside
        rest = shape.parameters - quantized
        return {"weights_nf4": int(quantized * NF4_BYTES_PER_WEIGHT), "weights_fp32": rest * 4}
    return {"weights": shape.parameters * dtypes.storage}


def optimizer_bytes(shape: ModelShape, cfg: TrainConfig) -> dict:
    """fp32 trainable weights (adapter: separate from the base; full: the weights themselves, counted above),
    their fp32 gradients, AdamW's two fp32 moments. No separate fp32 master copy: the trainable weights are fp32."""
    n = shape.trainable
    adapter = 0 if cfg.method == "full" else n * 4
    return {"adapter_weights": adapter, "gradients": n * 4, "optimizer_adamw": n * 8, "master_weights": 0}


def grad_layers(shape: ModelShape, cfg: TrainConfig) -> range:
    """The decoder layers the backward pass runs through. PEFT with gradient checkpointing makes the input
    embeddings' output require grad (`enable_input_require_grads`): then every layer; else from the lowest
    layer with something trained (top_layers)."""
    start = 0 if cfg.gradient_checkpointing and cfg.is_peft else shape.lowest_trained_layer
    return range(start, shape.layers)


def activation_bytes(shape: ModelShape, cfg: TrainConfig, dtypes: Dtypes, tokens: int) -> dict:
    """Activations of one micro-batch, with and without gradient checkpointing.

    Without: every layer the gradient passes keeps its tensors (`layer_bytes_per_token`) until its backward.
    With (transformers' checkpointing, non-reentrant): each layer keeps only its input (the residual stream) and
    the backward recomputes one layer at a time, so one layer's full set is alive on top."""
    per_layer = [layer_bytes_per_token(shape, cfg, dtypes, idx) for idx in grad_layers(shape, cfg)]
    largest = max(per_layer, default=0)
    without = sum(per_layer) * tokens
    with_ckpt = len(per_layer) * tokens * dtypes.residual * shape.hidden + largest * tokens
    return {"per_token_per_layer": largest, "without_checkpointing": without, "with_checkpointing": with_ckpt,
            "one_layer": largest * tokens}


def train_breakdown(shape: ModelShape, cfg: TrainConfig, *, checkpointing: bool | None = None) -> dict:
    """Bytes by component at the training peak (the end of the forward pass, the backward about to start)."""
    dtypes = training_dtypes(cfg)
    tokens = tokens_per_micro_batch(cfg)
    ckpt = cfg.gradient_checkpointing if checkpointing is None else checkpointing
    acts = activation_bytes(shape, cfg, dtypes, tokens)
    parts = {**weight_bytes(shape, cfg, dtypes), **optimizer_bytes(shape, cfg)}
    parts["activations"] = acts["with_checkpointing" if ckpt else "without_checkpointing"]
    parts.update(head_bytes(shape, cfg, dtypes, tokens))
    # the backward of a layer holds the gradients of its intermediates next to what it kept: about one layer's set
    parts["backward_workspace"] = acts["one_layer"]
    if cfg.quantized:  # bitsandbytes dequantizes a 4-bit weight to the compute dtype for each matmul
        parts["dequantized_weight"] = shape.largest_linear * dtypes.compute
    if cfg.method == "full" and dtypes.storage != dtypes.compute:
        # autocast keeps a compute-dtype copy of every fp32 weight it casts, for the backward pass
        parts["autocast_weight_copies"] = (shape.layer_linear_params + shape.head_params) * dtypes.compute
    allocated = sum(parts.values())
    parts["allocator_slack"] = int(allocated * ALLOCATOR_SLACK)
    parts["cuda_context"] = CUDA_CONTEXT_BYTES
    return {"parts": {k: int(v) for k, v in parts.items()}, "allocated": int(allocated),
            "peak": int(sum(parts.values())), "tokens": tokens, "activations": acts, "dtypes": dtypes.name,
            "gradient_checkpointing": ckpt}


def kv_bytes_per_token(config_or_shape, dtype_bytes: int = 2) -> int:
    """KV cache bytes per token: 2 (K and V) x layers x KV heads x head dim x bytes per value.
    Llama-3-8B in bf16: 2 x 32 x 8 x 128 x 2 = 131072 (128 KiB). (adgen's DecodeEngine keeps exactly this per
    slot and position: [slots, kv_heads, capacity, head_dim] per layer for K and for V.)"""
    c = config_or_shape
    if isinstance(c, ModelShape):
        return kv_bytes(c.layers, c.kv_heads, c.head_dim, dtype_bytes)
    shape = kv_shape(c)
    if shape is None:
        raise ValueError("the model config names no num_hidden_layers / num_attention_heads / hidden_size")
    return kv_bytes(*shape, dtype_bytes)


def serve_plan(shape: ModelShape, card_bytes: int, length: int, dtype_bytes: int = 2) -> dict:
    """Serving on one GPU: weights in bf16 (+ the adapter in fp32, as PEFT loads it), the CUDA context, a
    prefill's workspace (one prompt of `length` tokens through one layer at a time) and per decode slot its KV
    cache (`length` positions) and its fp32 logits rows (logits, processed scores, probabilities)."""
    weights = shape.parameters * dtype_bytes + (shape.trainable * 4 if shape.lora else 0)
    prefill = length * dtype_bytes * (4 * shape.hidden + 3 * shape.intermediate)
    kv = kv_bytes_per_token(shape, dtype_bytes)
    per_slot = kv * length + shape.vocab * 4 * 3
    free = card_bytes - CUDA_CONTEXT_BYTES - weights - prefill
    free -= int(max(free, 0) * ALLOCATOR_SLACK / (1 + ALLOCATOR_SLACK))
    slots = max(0, free // per_slot) if free > 0 else 0
    return {"card_gib": round(card_bytes / GIB, 1), "weights_bytes": int(weights), "slot_length": length,
            "kv_tokens": int(max(free, 0) // kv), "slots": int(slots), "fits": free > per_slot}
