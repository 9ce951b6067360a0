"""The CUDA paths, guarded on a CPU (issue 31). This file: the training setup -- devices, precision, placement
under sharding, DeepSpeed's "auto" values, adapter-only gathering in checkpoints, and the CPU-only speedups left off
on GPUs. Its siblings: test_gpu_paths_kernels.py (the fused head's fp32 math, packed rows through transformers'
attention, no host syncs in the lean norm), test_gpu_paths_models.py (inference dtype and loading, setup's GPU
check, Ray's GPUs, vLLM's adapters), test_gpu_paths_serve.py (seeded sampling's generator, per-request errors, the
KV-cache budget, no per-row syncs in a decode step, the AST check for device-less tensors).

Nothing here needs a GPU: `torch.cuda` is monkeypatched (is_available, device_count, current_device,
get_device_capability, is_bf16_supported), `from_pretrained` is a recording fake that loads on the CPU, and the
accelerator is a fake that says which device / distributed type the run has."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_helpers import tiny_config

from adgen.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ---- fakes -----------------------------------------------------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports `state["count"]` GPUs of compute capability `state["cap"]`; is_bf16_supported says True
    everywhere (the trap: it counts emulated bf16 on sm70 / sm75)."""
    state = {"count": 2, "cap": (9, 0), "current": 0, "set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["cap"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    def set_device(device):
        index = torch.device(device).index if not isinstance(device, int) else device
        state["set"].append(index)
        state["current"] = index

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return state


class _Recorded:
    """What the fake from_pretrained was asked for, and every `.to()` of the model it returned."""

    def __init__(self) -> None:
        self.kwargs: list[dict] = []
        self.moves: list[tuple] = []


@pytest.fixture
def recording_from_pretrained(monkeypatch):
    """AutoModelForCausalLM.from_pretrained records its kwargs and loads the real tiny model on the CPU (no
    device_map / quantization); the model's `.to()` records where it was sent and stays where it is."""
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained
    rec = _Recorded()

    def fake(path, **kwargs):
        rec.kwargs.append(dict(kwargs))
        load = {k: v for k, v in kwargs.items() if k not in ("device_map", "quantization_config")}
        model = real(path, **load)

        def to(*args, **kw):
            rec.moves.append(args + tuple(kw.values()))
            return model

        model.to = to
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(fake))
    return rec


class FakeModel:
    """Stands in for a transformers model where nothing but the loading is looked at."""

    def __init__(self, rec: _Recorded) -> None:
        self.config = SimpleNamespace(use_cache=True)
        self._rec = rec

    def to(self, *args, **kwargs):
        self._rec.moves.append(args + tuple(kwargs.values()))
        return self


@pytest.fixture
def fake_from_pretrained(monkeypatch):
    from transformers import AutoModelForCausalLM

    rec = _Recorded()

    def fake(path, **kwargs):
        rec.kwargs.append(dict(kwargs))
        return FakeModel(rec)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(fake))
    return rec


class FakeAccelerator:
    """One process of a run with the given distributed type on the given device; refuses full gathers."""

    def __init__(self, distributed: str = "NO", device: str = "cuda:0") -> None:
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType(distributed)
        self.device = torch.device(device)
        self.is_main_process = True
        self.process_index = self.local_process_index = 0
        self.num_processes = 1
        self.state = SimpleNamespace(deepspeed_plugin=None)
        self.saved_states: list[str] = []

    def main_process_first(self):
        return nullcontext()

    def wait_for_everyone(self) -> None:
        pass

    def prepare(self, *objs):
        return objs

    def save_state(self, path) -> None:
        Path(path).mkdir(parents=True)
        self.saved_states.append(str(path))

    def get_state_dict(self, *args, **kwargs):
        raise AssertionError("the full state dict was gathered")


def _fake_run(cfg, accelerator, tmp_path):
    """(RunContext, TrainData, Objective) of a run on the fake accelerator, as setup_run and setup_data build them."""
    from adgen.train.objective import make_objective
    from adgen.train.peft_setup import resolve_precision
    from adgen.train.setup_stages import setup_data
    from adgen.train.state import Printer, RunContext

    run = RunContext(cfg=cfg, out=tmp_path, accelerator=accelerator, say=Printer(False),
                     precision=resolve_precision(cfg, accelerator.device.type))
    objective = make_objective(cfg)
    return run, setup_data(run, objective), objective


# ---- item 7: an explicit device that is not there ---------------------------------------------------


def test_an_explicit_cuda_device_without_cuda_is_a_config_error(monkeypatch):
    from adgen.train.peft_setup import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(ConfigError, match=r"device=cpu or device=auto.*CUDA build of torch"):
            resolve_device(device, launched=False)
    assert resolve_device("auto", launched=False) == "cpu"
    assert resolve_device("cpu", launched=False) == "cpu"
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu", launched=False)


def test_cuda_index_past_the_device_count_is_a_config_error(fake_cuda):
    from adgen.train.peft_setup import resolve_device

    fake_cuda["count"] = 2
    assert resolve_device("cuda:1", launched=False) == "cuda:1"
    assert resolve_device("auto", launched=False) == "cuda"
    with pytest.raises(ConfigError, match=r"2 CUDA device\(s\).*cuda:0\.\.cuda:1"):
        resolve_device("cuda:2", launched=False)
    assert resolve_device("cuda:2", launched=True) == "cuda:2"  # under a launcher LOCAL_RANK picks the GPU


def test_train_with_device_cuda_on_a_cpu_only_torch_stops_before_training(tiny_llama3_dir, adgen_train_path, tmp_path,
                                                                         monkeypatch):
    from adgen.train.setup_stages import setup_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "run", device="cuda")
    with pytest.raises(ConfigError, match="device=cuda"):
        setup_run(cfg, resume=None, overwrite=False)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_device_setting_is_validated_with_the_config():
    from adgen.train.config import TrainConfig

    TrainConfig(train_data="x", device="cuda:3").validate()
    with pytest.raises(ConfigError, match="config key 'device'"):
        TrainConfig(train_data="x", device="gpu0").validate()


# ---- item 8: bf16 only where the GPU runs it natively ---------------------------------------------------


@pytest.mark.parametrize("cap,auto", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_on_native_bf16_gpus(fake_cuda, cap, auto):
    from adgen.train.config import TrainConfig
    from adgen.train.peft_setup import resolve_precision

    fake_cuda["cap"] = cap  # is_bf16_supported() says True on every one of them
    for method in ("lora", "full"):
        prec = resolve_precision(TrainConfig(train_data="x", method=method), "cuda")
        assert prec.name == auto, (cap, method)
        assert prec.mixed_precision == ("bf16" if auto == "bf16" else "no")
        assert "float16" not in (prec.storage, prec.compute)  # never fp16 by default


@pytest.mark.parametrize("cap", [(7, 0), (7, 5)])
def test_explicit_bf16_on_an_emulating_gpu_is_refused(fake_cuda, cap):
    from adgen.train.config import TrainConfig
    from adgen.train.peft_setup import resolve_precision

    fake_cuda["cap"] = cap
    for name in ("bf16", "bf16-frozen"):
        with pytest.raises(ConfigError, match=rf"precision={name}.*{cap[0]}\.{cap[1]}.*use precision=fp32"):
            resolve_precision(TrainConfig(train_data="x", precision=name), "cuda")
    fake_cuda["cap"] = (8, 0)
    assert resolve_precision(TrainConfig(train_data="x", precision="bf16"), "cuda").name == "bf16"


# ---- items 5 and 13: single-GPU loading goes straight to the accelerator's GPU ----------------------------


def test_single_gpu_loads_with_a_device_map_onto_that_gpu(fake_cuda, fake_from_pretrained):
    from adgen.train.config import TrainConfig
    from adgen.train.peft_setup import load_base_model, resolve_precision

    cfg = TrainConfig(train_data="x")
    prec = resolve_precision(cfg, "cuda:1")
    model = load_base_model(cfg, "some/model", prec, torch.device("cuda", 1))
    (kwargs,) = fake_from_pretrained.kwargs
    assert kwargs["device_map"] == {"": 1} and kwargs["dtype"] == torch.bfloat16
    assert "quantization_config" not in kwargs
    assert fake_from_pretrained.moves == []  # not through host RAM and .to()
    assert model.config.use_cache is False


@pytest.fixture
def bnb_on_cpu():
    """bitsandbytes imported before torch pretends to have CUDA (its CUDA backend would load at import)."""
    return pytest.importorskip("bitsandbytes")


def test_qlora_on_cuda_n_is_loaded_on_cuda_n_not_cuda_0(bnb_on_cpu, fake_cuda, fake_from_pretrained, monkeypatch):
    from adgen.train import peft_setup
    from adgen.train.config import TrainConfig

    monkeypatch.setattr(peft_setup, "check_4bit_support", lambda device: None)
    cfg = TrainConfig(train_data="x", method="qlora")
    prec = peft_setup.resolve_precision(cfg, "cuda:1")
    torch.cuda.set_device(torch.device("cuda:1"))  # what setup_run does for device=cuda:1 in one process
    # accelerate's single-process device is plain "cuda" (the current device) unless told otherwise
    for device in (torch.device("cuda", 1), torch.device("cuda")):
        peft_setup.load_base_model(cfg, "some/model", prec, device)
    for kwargs in fake_from_pretrained.kwargs:
        assert kwargs["device_map"] == {"": 1}
        assert kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
        assert kwargs["dtype"] == torch.bfloat16
    assert fake_from_pretrained.moves == []


def test_a_single_process_on_cuda_n_gets_an_accelerator_on_cuda_n(fake_cuda, tmp_path, monkeypatch):
    """accelerate's own single-process device is plain "cuda", which its 4-bit check and the loading read as
    cuda:0; the trainer pins cuda:N and leaves no environment behind."""
    from accelerate.state import AcceleratorState, PartialState

    from adgen.train.config import TrainConfig
    from adgen.train.peft_setup import Precision
    from adgen.train.setup_stages import make_accelerator, reset_accelerate_state

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_TORCH_DEVICE", raising=False)
    reset_accelerate_state()
    try:
        acc = make_accelerator(TrainConfig(train_data="x"), "cuda:1", Precision("fp32", "float32", "no", "float32"),
                                tmp_path)
        assert acc.device == torch.device("cuda", 1)
        assert fake_cuda["set"] == [1]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    import os

    assert "ACCELERATE_TORCH_DEVICE" not in os.environ


# ---- item 3: sharded runs leave the model on the CPU for accelerate to shard ----------------------------


@pytest.mark.parametrize("distributed", ["FSDP", "DEEPSPEED"])
@pytest.mark.parametrize("method,precision", [("lora", "bf16"), ("full", "bf16")])
def test_sharded_launch_never_moves_the_model_to_a_gpu(fake_cuda, recording_from_pretrained, tiny_llama3_dir,
                                                       adgen_train_path, tmp_path, distributed, method, precision):
    from adgen.train.setup_stages import setup_model

    fake_cuda["cap"] = (8, 0)
    cfg = tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path, method=method, precision=precision)
    net = setup_model(*_fake_run(cfg, FakeAccelerator(distributed, "cuda:0"), tmp_path))
    (kwargs,) = recording_from_pretrained.kwargs
    assert "device_map" not in kwargs  # not onto a GPU: accelerate shards it from the CPU
    assert recording_from_pretrained.moves == []  # no .to("cuda") of the whole model
    # full FT + bf16 keeps fp32 masters, sharded 1/N per GPU; LoRA stores the frozen base in bf16
    assert kwargs["dtype"] == (torch.float32 if method == "full" else torch.bfloat16)
    assert all(p.device.type == "cpu" for p in net.model.parameters())


def test_a_4bit_base_is_refused_under_sharding(bnb_on_cpu, fake_cuda, fake_from_pretrained):
    from adgen.train.config import TrainConfig
    from adgen.train.peft_setup import load_base_model, resolve_precision

    cfg = TrainConfig(train_data="x", method="qlora")
    with pytest.raises(ConfigError, match="DDP"):
        load_base_model(cfg, "m", resolve_precision(cfg, "cuda"), torch.device("cuda", 0), sharded=True)
    assert fake_from_pretrained.kwargs == []


def test_sharded_gpu_run_leaves_the_logits_probe_to_the_first_step(fake_cuda, recording_from_pretrained,
                                                                   tiny_llama3_dir, adgen_train_path, tmp_path):
    """The weights are still on the CPU (FSDP rank > 0: meta) at setup: no probe batch is sent to the GPU;
    the first training forward decides, and `resolved` then says what it decided."""
    from adgen.train.setup_stages import (
        LOGITS_AT_FIRST_STEP,
        record_logits_decision,
        setup_model,
        setup_optimization,
    )

    cfg = tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path)
    run, data, objective = _fake_run(cfg, FakeAccelerator("FSDP", "cuda:0"), tmp_path)
    net = setup_model(run, data, objective)
    opt = setup_optimization(run, data, net, objective)
    assert run.resolved["logits"] == LOGITS_AT_FIRST_STEP
    batch = objective.collate(data.train_examples, opt.order.step_indices(0, 0)[0], net.layout)
    opt.wrapped(batch.input_ids, batch.targets, batch.position_ids, batch.attention_mask)  # "the first step", on CPU
    record_logits_decision(run, objective, opt.loss_module)
    assert run.resolved["logits"] == "target positions only"


# ---- the CPU-only speedups stay off on a GPU ----------------------------------------------------------------


def test_cpu_only_speedups_are_off_for_cuda_models():
    from adgen.train.config import TrainConfig
    from adgen.train.setup_stages import cpu_speedups

    cfg = TrainConfig(train_data="x")
    for sharded in (False, True):
        assert not any(cpu_speedups(cfg, torch.device("cuda", 0), sharded=sharded).values())
    assert all(cpu_speedups(cfg, torch.device("cpu"), sharded=False).values())
    assert cpu_speedups(cfg, torch.device("cpu"), sharded=True)["lean_layers"] is False


def test_heap_is_never_trimmed_on_a_gpu_run(monkeypatch):
    from adgen.train import memory

    trims = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: (lambda pad: trims.append(pad)))
    monkeypatch.setattr(memory, "rss_bytes", iter([1, 10**9, 10**10, 10**11]).__next__)
    maybe_trim = memory.heap_trimmer(torch.device("cuda", 0))
    for _ in range(4):
        maybe_trim()
    assert trims == []


@pytest.mark.parametrize("distributed", ["NO", "MULTI_GPU", "FSDP"])
def test_a_cuda_run_sets_up_no_cpu_kernels_and_says_so(fake_cuda, recording_from_pretrained, tiny_llama3_dir,
                                                       adgen_train_path, tmp_path, monkeypatch, distributed):
    """Packed rows on a GPU: the model's own attention (transformers keeps examples apart by position_ids); no
    per-example CPU attention, no lean blocks, no FastDropout, and `resolved` tells the truth."""
    from adgen.train import packed_attention
    from adgen.train.fast_dropout import FastDropout
    from adgen.train.setup_stages import setup_model

    def refuse(model):
        raise AssertionError("enable_packed_attention was called for a CUDA model")

    monkeypatch.setattr(packed_attention, "enable_packed_attention", refuse)
    cfg = tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path, lora={"dropout": 0.1})
    run, data, objective = _fake_run(cfg, FakeAccelerator(distributed, "cuda:0"), tmp_path)
    net = setup_model(run, data, objective)
    assert net.layout.batching == "packed" and net.layout.share_prefix is False
    assert "per-example" not in run.resolved["attention"] and "position_ids" in run.resolved["attention"]
    assert "lean" not in run.resolved["attention"] and "dropout" not in run.resolved["attention"]
    assert not any(isinstance(m, FastDropout) for m in net.model.modules())
    assert not any("forward" in m.__dict__ for m in net.model.modules())  # no lean forward swapped in
    if distributed == "NO":  # one GPU: straight onto it
        assert recording_from_pretrained.kwargs[0]["device_map"] == {"": 0}
        assert recording_from_pretrained.moves == []


# ---- item 2: DeepSpeed's "auto" values that need the model ----------------------------------------------------


HIDDEN_KEYS = ["zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
               "zero_optimization.stage3_param_persistence_threshold"]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_autos_are_filled_from_the_base_models_hidden_size(stage, tiny_llama3_dir):
    """accelerate's _prepare_deepspeed fills these from `model.config.hidden_size` of the prepared module (our
    loss wrapper has none -> ValueError); filled before prepare with the values accelerate would have used."""
    from accelerate.utils import DeepSpeedPlugin

    from adgen.train.fsdp_cpu import fill_deepspeed_plugin

    path = REPO / "configs" / "deepspeed" / f"{stage}.json"
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=False)
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=4096))  # Llama-3-8B's
    cfg = SimpleNamespace(batch_size=2, grad_accum=4, max_grad_norm=1.0)
    filled = fill_deepspeed_plugin(acc, cfg, model)
    assert set(filled) == {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                           "train_batch_size", *(HIDDEN_KEYS if stage == "zero3" else [])}
    assert [k for k in HIDDEN_KEYS if plugin.is_auto(k)] == []  # what accelerate checks before reading model.config
    ds = plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (2, 4, 16, 1.0)
    shipped = json.loads(path.read_text())["zero_optimization"]
    zero = ds["zero_optimization"]
    if stage == "zero3":
        assert zero["reduce_bucket_size"] == 4096 * 4096
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
        assert zero["stage3_param_persistence_threshold"] == 10 * 4096
    else:  # set in the file: kept
        assert zero["reduce_bucket_size"] == shipped["reduce_bucket_size"]
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return
    from deepspeed.runtime.config import DeepSpeedConfig  # with DeepSpeed installed: it takes the filled config

    DeepSpeedConfig(json.loads(json.dumps(ds)), world_size=2)


def test_deepspeed_fill_reads_the_hidden_size_through_peft(tiny_llama3_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adgen.train.fsdp_cpu import fill_deepspeed_config, hidden_size_of

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir)), LoraConfig(r=2))
    assert hidden_size_of(model) == 64
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    with pytest.raises(ConfigError, match="reduce_bucket_size"):
        fill_deepspeed_config(ds, batch_size=1, grad_accum=1, max_grad_norm=1.0, num_processes=1, hidden_size=None)


# ---- item 14: sharded PEFT checkpoints gather the adapter only ------------------------------------------------


def _tiny_lora(tiny_llama3_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir))
    return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("distributed", ["FSDP", "DEEPSPEED"])
def test_sharded_lora_checkpoint_gathers_only_the_adapter(tiny_llama3_dir, tmp_path, distributed):
    from safetensors.torch import load_file

    from adgen.train.checkpoint import save_checkpoint

    model = _tiny_lora(tiny_llama3_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = FakeAccelerator(distributed, "cpu")  # get_state_dict raises: the full model is never gathered
    path = save_checkpoint(acc, tmp_path, 2, model=model, wrapped=model, optimizer=opt, scheduler=sched,
                           trainer_state={"step": 2}, keep=2, is_peft=True)
    adapter_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_names and all("lora_" in n for n in adapter_names)
    weights = load_file(str(path / "trainable.safetensors"))
    assert set(weights) == adapter_names
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(weights[n], p.detach())
    saved = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(adapter_names) and all("lora_" in k for k in saved)
    assert acc.saved_states  # the sharded model + optimizer state still go through accelerate


def test_sharded_lora_final_adapter_gathers_only_the_adapter(tiny_llama3_dir, tmp_path):
    from safetensors.torch import load_file

    from adgen.train.config import TrainConfig
    from adgen.train.artefacts import save_final

    model = _tiny_lora(tiny_llama3_dir)
    tokenizer = SimpleNamespace(save_pretrained=lambda path: None)
    out = save_final(FakeAccelerator("FSDP", "cpu"), TrainConfig(train_data="x"), tmp_path, model, model, tokenizer)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def test_zero3_builds_the_weights_partitioned_and_counts_partitioned_parameters():
    """DeepSpeed's engine moves a module built whole onto every GPU before partitioning it (`dont_change_device`
    defaults to False): the shipped ZeRO-3 launch config must build the weights under deepspeed.zero.Init, and the
    parameter count must read a partitioned parameter's `ds_numel` (its local tensor is empty)."""
    import yaml

    from adgen.train.peft_setup import count_parameters

    launch = yaml.safe_load((REPO / "adgen/recipes/accelerate/deepspeed-zero3.yaml").read_text())
    assert launch["deepspeed_config"]["zero3_init_flag"] is True

    model = torch.nn.Linear(4, 3)
    for p in model.parameters():  # what ZeRO-3 leaves in each process: an empty tensor with the true size beside it
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    model.bias.requires_grad_(False)
    assert count_parameters(model) == (12, 15)
