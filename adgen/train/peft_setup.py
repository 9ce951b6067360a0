"""Load the base model for training and attach the method: LoRA, DoRA, QLoRA, P-Tuning v2, full SFT.

Precision policy (`precision`; what lives in which dtype):

| precision     | frozen base weights | trainable weights | compute                                   |
|---------------|---------------------|-------------------|-------------------------------------------|
| fp32          | fp32                | fp32              | fp32                                      |
| bf16-frozen   | bf16                | fp32              | base matmuls bf16, adapter matmuls fp32   |
| bf16          | bf16 (PEFT) / fp32  | fp32              | bf16 autocast (accelerate mixed precision)|
| fp16          | fp16 (PEFT) / fp32  | fp32              | fp16 autocast + loss scaling (forced only)|
| auto          | GPU with native bf16 (sm80+): bf16; CPU with AVX512-BF16/AMX: bf16; else fp32       |

On a GPU bf16 counts only where it is native (compute capability >= 8.0, `adgen.models.cuda_bf16_native`):
`torch.cuda.is_bf16_supported()` also says yes on V100 / T4, which emulate it far slower than fp32. There
`auto` gives fp32 and an explicit bf16 / bf16-frozen is refused (ConfigError naming precision=fp32).

Full fine-tuning with bf16 keeps fp32 master weights (bf16 only in autocast). On one GPU they sit whole on
it; under FSDP / DeepSpeed the model is loaded on the CPU (`load_base_model(sharded=True)`) and each GPU holds
only its 1/N shard of the fp32 masters, gradients and Adam state; the full fp32 model never lands on a GPU.

The CPU default comes from measurements on the SmolLM2-135M LoRA recipe (docs/TRAINING.md): with the
frozen weights *stored* in bf16, autocast only casts activations and the small LoRA weights, and runs
every matmul at the CPU's bf16 speed (1.5x fp32, 6% faster and 12% less memory than bf16-frozen),
while the trainable weights and Adam state stay fp32; losses stayed within 0.3% of fp32. (Autocast
over fp32-stored weights, as in HF Trainer's bf16=True, re-casts every weight on every op: slow.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from adgen.errors import AdgenError, ConfigError, ModelError
from adgen.models import cpu_has_fast_bf16, cuda_bf16_native, cuda_index, quantization_config
from adgen.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Precision:
    name: str  # the resolved policy: fp32 | bf16-frozen | bf16 | fp16
    storage: str  # dtype the base weights are loaded in: float32 | bfloat16 | float16
    mixed_precision: str  # accelerate's mixed_precision: no | bf16 | fp16
    compute: str  # bnb 4-bit compute dtype


def resolve_device(requested: str, *, launched: bool) -> str:
    """The device a single training process asks accelerate for: "cpu", "cuda" or "cuda:N".

    `auto` takes CUDA where there is one. An explicit request that cannot be met is a ConfigError, never a
    silent CPU run (a CPU-only torch would otherwise train an 8B model on the CPU for days). Under a launcher
    (accelerate launch / torchrun) each process's GPU comes from LOCAL_RANK, so a cuda:N index is not checked."""
    req = (requested or "auto").strip().lower()
    if req == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if req == "cpu":
        return "cpu"
    if req != "cuda" and not (req.startswith("cuda:") and req[5:].isdigit()):
        raise ConfigError(f"config key 'device' is {requested!r}; use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"device={requested} but torch {torch.__version__} ({build}) sees no CUDA GPU. Use device=cpu or "
            "device=auto, or install the CUDA build of torch (https://pytorch.org/get-started/locally/) on a "
            "machine with an NVIDIA GPU and driver"
        )
    if req.startswith("cuda:") and not launched:
        count = torch.cuda.device_count()
        if int(req[5:]) >= count:
            raise ConfigError(f"device={requested}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                              "pick one of those, or device=cuda / auto")
    return req


def resolve_precision(cfg: TrainConfig, device) -> Precision:
    """The precision policy for training on `device` (a torch.device, or "cpu" / "cuda" / "cuda:N")."""
    device = torch.device(device)
    device_type = device.type
    name = cfg.precision
    if name == "fp16" and not cfg.allow_fp16:
        cfg.validate()  # raises the explanatory ConfigError
    if name == "auto":
        if device_type == "cuda":
            name = "bf16" if cuda_bf16_native(device) else "fp32"
            if name == "fp32":
                log.warning("this GPU has no native bf16 (compute capability < 8.0): training in fp32 "
                            "(fp16 is refused unless forced; see allow_fp16)")
        elif device_type == "cpu":
            # bf16 only where the CPU runs it natively (elsewhere emulated, ~100x slower than fp32). Measured
            # with AVX512-BF16: LoRA bf16 1.5x fp32 (docs/TRAINING.md); full FT (fp32 master weights + bf16
            # autocast) ~285 vs ~210 tokens/s on SmolLM2 (configs/smollm2-135m-adgen.yaml)
            name = "bf16" if cpu_has_fast_bf16() else "fp32"
        else:
            name = "fp32"
    if name == "fp16" and device_type == "cpu":
        raise ConfigError("fp16 training is not supported on CPU: use precision=bf16-frozen, bf16 or fp32")
    if name in ("bf16", "bf16-frozen") and device_type == "cuda" and not cuda_bf16_native(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"precision={name}: this GPU (compute capability {major}.{minor}) only emulates bf16, "
                          "far slower than fp32 (native bf16 needs 8.0+: A100, H100, RTX 30xx+); "
                          "use precision=fp32 or auto")
    full = cfg.method == "full"
    if name == "fp32":
        return Precision("fp32", "float32", "no", "float32")
    if name == "bf16-frozen":
        return Precision(name, "bfloat16", "no", "bfloat16")
    if name == "bf16":
        return Precision(name, "float32" if full else "bfloat16", "bf16", "bfloat16")
    return Precision("fp16", "float32" if full else "float16", "fp16", "float16")


def check_4bit_support(device) -> None:
    """Raise a clear error when bitsandbytes is missing or cannot run 4-bit NF4 on `device`."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModelError(
            "method=qlora (4-bit NF4) needs bitsandbytes: pip install 'bitsandbytes>=0.45' (pip install 'adgen[qlora]'); "
            "or train with method=lora on a 16-bit base"
        ) from None
    try:
        w = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        q, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
        back = bnb.functional.dequantize_4bit(q, state)
        if not torch.isfinite(back).all():
            raise RuntimeError("dequantized values are not finite")
    except Exception as e:  # noqa: BLE001 - any failure means "not supported here"
        raise ModelError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit NF4 on {device} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). QLoRA needs a CUDA GPU "
            "(or a CPU with bitsandbytes >= 0.46); otherwise use method=lora"
        ) from None


def _lora_config(cfg: TrainConfig, model=None):
    lc = cfg.lora
    layers, targets = None, lc.target_modules
    if cfg.top_layers is not None:
        layers = _top_layer_indices(model, cfg.top_layers)
        if targets == "all-linear":  # PEFT takes a layer subset only with named modules
            targets = _linear_module_names(model)
    return LoraConfig(
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=targets,
        use_rslora=lc.rslora,
        use_dora=cfg.method == "dora",
        init_lora_weights=True if lc.init == "default" else lc.init,
        bias=lc.bias,
        modules_to_save=lc.modules_to_save,
    )


def _linear_module_names(model) -> list[str]:
    """The names of the decoder layers' linear modules (what "all-linear" means), e.g. q_proj ... down_proj."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"}
    return sorted(names)


def _prefix_config(cfg: TrainConfig):
    pc = cfg.prefix
    kw = {}
    if pc.encoder_hidden_size:
        kw["encoder_hidden_size"] = pc.encoder_hidden_size
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=pc.num_virtual_tokens,
        prefix_projection=pc.prefix_projection,
        **kw,
    )


def placement(cfg: TrainConfig, device, *, sharded: bool) -> dict:
    """from_pretrained's `device_map` for training on `device` (the accelerator's device).

    One GPU (DDP included: one per process): straight onto it, not through host RAM and `.to()`. Sharded
    (FSDP / DeepSpeed): none, the weights stay on the CPU (rank > 0 on meta with FSDP's cpu_ram_efficient_loading)
    until accelerate shards them, so no GPU ever holds the whole model. CPU: loaded where it runs."""
    if sharded:
        if cfg.quantized:
            raise ConfigError(f"method={cfg.method} with a 4-bit base cannot be sharded by FSDP / DeepSpeed here: "
                              "launch it with DDP (configs/accelerate/ddp.yaml) or one process, or use method=lora")
        return {}
    if device.type == "cuda":
        # plain "cuda" (accelerate's single-process device): the current GPU
        return {"device_map": {"": cuda_index(device)}}
    if cfg.quantized:
        return {"device_map": {"": str(device)}}
    return {}


def load_base_model(cfg: TrainConfig, model_path: str, precision: Precision, device, *, sharded: bool = False):
    """The transformers model, use_cache off: on `device`, or on the CPU for FSDP / DeepSpeed to shard."""
    kwargs: dict = {"dtype": getattr(torch, precision.storage), "trust_remote_code": cfg.trust_remote_code,
                    **placement(cfg, device, sharded=sharded)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantized:
        check_4bit_support(device)
        kwargs["quantization_config"] = quantization_config("nf4", getattr(torch, precision.compute))
        if precision.storage == "float32":
            kwargs["dtype"] = getattr(torch, precision.compute)  # non-quantized layers; upcast below by PEFT
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except OSError as e:
        raise ModelError(f"could not load model weights from {model_path}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"{model_path} uses custom model code; if you trust it, set trust_remote_code: true "
                "(--trust-remote-code)"
            ) from None
        raise
    if "device_map" not in kwargs and not sharded and device.type != "cpu":
        model.to(device)
    model.config.use_cache = False
    return model


def apply_method(model, cfg: TrainConfig, precision: Precision):
    """Attach the training method; returns the model to train (a PeftModel unless method=full)."""
    gc_kwargs = {"use_reentrant": False}
    if cfg.quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if cfg.is_peft:
            model.enable_input_require_grads()
    if cfg.method == "full":
        keep = None if cfg.top_layers is None else tuple(f"layers.{i}." for i in _top_layer_indices(model, cfg.top_layers))
        for name, p in model.named_parameters():
            p.requires_grad_(keep is None or any(k in name for k in keep))
        return model
    peft_config = _prefix_config(cfg) if cfg.method == "prefix" else _lora_config(cfg, model)
    # bf16-frozen / bf16 / fp16: PEFT keeps the adapter weights in fp32 (autocast_adapter_dtype).
    try:
        peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "target modules" in msg.lower() or "not found" in msg.lower():
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear) or type(m).__name__.startswith("Linear")})
            raise ConfigError(
                f"lora.target_modules {cfg.lora.target_modules!r} do not match this model ({msg[:160]}). "
                f"Module names here include: {', '.join(names[:25])}; or use lora.target_modules=all-linear"
            ) from None
        raise AdgenError(f"could not attach {cfg.method} to the model: {msg}") from None
    return peft_model


def _top_layer_indices(model, top: int) -> list[int]:
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not num_layers:
        raise ConfigError("top_layers needs a model whose config names num_hidden_layers; set it to null")
    return list(range(max(0, num_layers - top), num_layers))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters: PEFT's own count for adapter models (a 4-bit weight's stored bytes
    hold two values each), the same sum over the parameters for full / top-layer fine-tuning."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 partitioned parameter is empty here
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


INITIAL_ADAPTER_DIR = "lora_init"  # PiSSA / OLoRA: the initial adapter (in the run directory), to convert the result on save


def rewrites_base(cfg: TrainConfig) -> bool:
    """PiSSA / OLoRA initialisation subtracts the initial adapter from the base weights."""
    return cfg.is_peft and str(cfg.lora.init).startswith(("pissa", "olora"))


def save_initial_adapter(model, path) -> None:
    """PiSSA / OLoRA: keep the initial adapter so the trained one can be converted to a plain LoRA of the
    original base on save (PEFT's `path_initial_model_for_weight_conversion`)."""
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # PEFT's recipe: saved as a plain LoRA
    try:
        model.save_pretrained(str(path), safe_serialization=True)
    finally:
        config.init_lora_weights = init


def optimizer_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only (the layout checkpoints hold: decay, no decay);
    with LoRA+ a third group, the B matrices at lr x plus_lr_ratio."""
    ratio = cfg.lora.plus_lr_ratio if cfg.is_peft else None
    decay, no_decay, fast = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ratio is not None and ("lora_B" in name or "lora_embedding_B" in name):
            fast.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fast:
        groups.append({"params": fast, "weight_decay": cfg.weight_decay, "lr": cfg.lr * ratio})
    return groups


def add_neftune_noise(model, alpha: float):
    """NEFTune: a forward hook on the input embeddings adding uniform noise of scale alpha / sqrt(L x d) while
    the model trains (eval and generation see clean embeddings). Returns the hook handle."""
    embeddings = model.get_input_embeddings()

    def hook(module, _inputs, output):
        if not module.training:
            return output
        scale = alpha / (output.shape[-2] * output.shape[-1]) ** 0.5
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return embeddings.register_forward_hook(hook)
