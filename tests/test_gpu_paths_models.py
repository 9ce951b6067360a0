"""The CUDA paths of inference loading, Ray bulk generation, the vLLM backend and setup, on a CPU-only machine:
fake CUDA (monkeypatched torch.cuda), a recording from_pretrained, fake `ray` / `vllm` modules, a fake nvidia-smi."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Literal

import pytest

from adgen.errors import AdgenError, ConfigError, ModelError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda says there are `count` GPUs of compute capability `cap` (is_bf16_supported: True, the trap)."""
    import torch

    state = {"count": 1, "cap": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["count"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: state["cap"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return state


@pytest.fixture
def bnb():
    """bitsandbytes imported before fake_cuda (list it first): under a fake CUDA it would load its CUDA backend."""
    return pytest.importorskip("bitsandbytes")


class FakeModel:
    """What the recording from_pretrained returns: records .to() and .eval()."""

    def __init__(self):
        self.moved_to = []
        self.evaluated = False

    def to(self, device):
        self.moved_to.append(device)
        return self

    def eval(self):
        self.evaluated = True
        return self


@pytest.fixture
def recording_from_pretrained(monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []

    def record(path, **kwargs):
        model = FakeModel()
        calls.append({"path": path, "kwargs": kwargs, "model": model})
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    return calls


# ---- models: device, dtype, loading ----------------------------------------------------------------


def test_select_device_index_beyond_the_visible_gpus(fake_cuda):
    from adgen.models import select_device

    fake_cuda["count"] = 1
    assert select_device("cuda:0").index == 0
    with pytest.raises(ModelError, match=r"'cuda:3'.*only 1 CUDA GPU.*--device cuda.*CUDA_VISIBLE_DEVICES"):
        select_device("cuda:3")


@pytest.mark.parametrize("cap, bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_dtype_auto_is_bf16_only_where_native(fake_cuda, cap, bf16):
    """is_bf16_supported() says True on V100 / T4 too (emulated, slow): auto must still pick fp32 there."""
    import torch

    from adgen.models import select_dtype

    fake_cuda["cap"] = cap
    want = torch.bfloat16 if bf16 else torch.float32
    assert select_dtype("auto", torch.device("cuda")) is want
    assert select_dtype("auto", "cuda") is want
    assert select_dtype(None, "auto") is want


@pytest.mark.parametrize("cap, bf16", [((7, 5), False), ((8, 0), True)])
def test_quantized_compute_dtype_follows_the_same_rule(bnb, fake_cuda, recording_from_pretrained, tiny_llama3_dir,
                                                       cap, bf16):
    import torch

    from adgen.models import load_model

    fake_cuda["cap"] = cap
    load_model(str(tiny_llama3_dir), device="cuda", quantization="nf4")
    qc = recording_from_pretrained[-1]["kwargs"]["quantization_config"]
    assert qc.bnb_4bit_compute_dtype is (torch.bfloat16 if bf16 else torch.float32)


def test_load_model_on_cuda_loads_straight_to_the_gpu(fake_cuda, recording_from_pretrained, tiny_llama3_dir):
    import torch

    from adgen.models import load_model

    fake_cuda["count"] = 4
    model = load_model(str(tiny_llama3_dir), device="cuda:2")
    kwargs = recording_from_pretrained[-1]["kwargs"]
    assert kwargs["device_map"] == {"": 2} and kwargs["dtype"] is torch.bfloat16
    assert model.moved_to == [] and model.evaluated  # no CPU load + .to(): nothing went through host RAM
    load_model(str(tiny_llama3_dir), device="cuda")
    assert recording_from_pretrained[-1]["kwargs"]["device_map"] == {"": 0}  # the current device


def test_load_model_quantized_on_cuda_n_uses_index_n(bnb, fake_cuda, recording_from_pretrained, tiny_llama3_dir):
    from adgen.models import load_model

    fake_cuda["count"] = 4
    load_model(str(tiny_llama3_dir), device="cuda:3", quantization="nf4")
    assert recording_from_pretrained[-1]["kwargs"]["device_map"] == {"": 3}


def test_load_model_on_cpu_is_unchanged(recording_from_pretrained, tiny_llama3_dir):
    import torch

    from adgen.models import load_model

    model = load_model(str(tiny_llama3_dir), device="cpu")
    kwargs = recording_from_pretrained[-1]["kwargs"]
    assert "device_map" not in kwargs and kwargs["dtype"] is torch.float32
    assert model.moved_to == [torch.device("cpu")]


# ---- setup: the GPU check ------------------------------------------------------------------------

FAKE_SMI = """#!/bin/sh
if [ "$1" = "--query-gpu=name,driver_version,memory.total" ]; then
  echo "NVIDIA A100-SXM4-80GB, 535.104.05, 81920 MiB"
else
  echo "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2 |"
fi
"""


def _check_gpu(path_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=str(path_dir))
    return subprocess.run([sys.executable, str(REPO / "scripts" / "check_gpu.py")], env=env, capture_output=True,
                          text=True, timeout=120)


def test_setup_gpu_check_fails_when_torch_cannot_use_the_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch can use a GPU: the check would rightly pass")
    smi = tmp_path / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    proc = _check_gpu(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NVIDIA A100-SXM4-80GB, 535.104.05, 81920 MiB" in proc.stdout and "CUDA <= 12.2" in proc.stdout
    assert "is_available(): False" in proc.stdout and "CPU-only build" in proc.stdout
    assert "torch cannot use it" in proc.stderr and "ADGEN_TORCH_SPEC" in proc.stderr and "CUDA 12.2" in proc.stderr


def test_setup_gpu_check_passes_without_nvidia_smi(tmp_path):
    proc = _check_gpu(tmp_path)  # an empty PATH: no nvidia-smi
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no nvidia-smi" in proc.stdout and f"torch {__import__('torch').__version__}" in proc.stdout


def test_setup_sh_runs_the_gpu_check_and_fails_with_it():
    text = (REPO / "scripts" / "setup.sh").read_text()
    line = next(x for x in text.splitlines() if "scripts/check_gpu.py" in x and not x.startswith("#"))
    assert "exit 1" in line
    assert text.index("scripts/check_gpu.py") < text.index("[setup] done")


# ---- Ray: workers get GPUs ---------------------------------------------------------------------------


class FakeRay:
    """A stand-in `ray` (and `ray.data`): records init and map_batches; the dataset yields no rows."""

    def __init__(self, resources: dict):
        self.resources = resources
        self.calls: dict = {}
        self.data = types.ModuleType("ray.data")
        self.data.ActorPoolStrategy = lambda **kw: ("actors", kw)
        self.data.DataContext = types.SimpleNamespace(get_current=lambda: types.SimpleNamespace())
        self.data.from_items = self._from_items
        self.module = types.ModuleType("ray")
        self.module.data = self.data
        self.module.is_initialized = lambda: False
        self.module.init = lambda **kw: self.calls.setdefault("init", kw)
        self.module.cluster_resources = lambda: dict(self.resources)

    def _from_items(self, items, **kw):
        self.calls["items"] = items
        fake = self

        class Dataset:
            def map_batches(self, fn, **kwargs):
                fake.calls["map_batches"] = kwargs
                return self

            def iter_rows(self):
                return iter(())

        return Dataset()


@pytest.fixture
def fake_ray(monkeypatch):
    import adgen.generation.ray_catalog as rc

    def install(resources: dict) -> FakeRay:
        ray = FakeRay(resources)
        monkeypatch.setitem(sys.modules, "ray", ray.module)
        monkeypatch.setitem(sys.modules, "ray.data", ray.data)
        return ray

    monkeypatch.setattr(rc, "merge_shards", lambda *a, **k: None)  # the fake dataset writes no shards
    return install


def _records(n=6):
    from adgen.data.records import Record

    return [Record(f"类型#裙*颜色#{i}", None, i + 1, {}) for i in range(n)]


def _run(tmp_path, device="auto", **kw):
    from adgen.generation.ray_catalog import run_catalog

    gen = dict(model_spec="m", adapter=None, backend="hf", dtype="auto", device=device, batch_size=8, continuous=True)
    return run_catalog(_records(), tmp_path / "out", generator_kwargs=gen, block_size=1, progress=False, **kw)


def test_ray_workers_ask_for_the_clusters_gpus_by_default(fake_ray, tmp_path):
    ray = fake_ray({"CPU": 16, "GPU": 2})
    summary = _run(tmp_path)
    mb = ray.calls["map_batches"]
    assert mb["num_gpus"] == 1 and mb["compute"] == ("actors", {"size": 2}) and summary.workers == 2
    assert mb["num_cpus"] == 8


def test_ray_gpu_default_without_cluster_gpus_fails_clearly(fake_ray, fake_cuda, tmp_path):
    """The driver sees CUDA (default: 1 GPU per worker) but the cluster reports none."""
    ray = fake_ray({"CPU": 8})
    with pytest.raises(AdgenError, match=r"--gpus-per-worker 1 \(the default.*cluster has 0.*lower --workers or"):
        _run(tmp_path)
    assert "map_batches" not in ray.calls  # refused, not left waiting for GPUs that never come


def test_ray_too_few_gpus_for_the_workers_fails_clearly(fake_ray, tmp_path):
    ray = fake_ray({"CPU": 16, "GPU": 2})
    with pytest.raises(AdgenError, match=r"--gpus-per-worker 1 x 4 worker\(s\) needs 4 GPU\(s\).*has 2"):
        _run(tmp_path, workers=4, gpus_per_worker=1)
    assert "map_batches" not in ray.calls


def test_ray_fraction_of_a_gpu_packs_workers(fake_ray, tmp_path):
    ray = fake_ray({"CPU": 8, "GPU": 1})
    summary = _run(tmp_path, gpus_per_worker=0.5)
    assert ray.calls["map_batches"]["num_gpus"] == 0.5 and summary.workers == 2


def test_ray_cpu_only_asks_for_no_gpu(fake_ray, tmp_path):
    ray = fake_ray({"CPU": 4})
    summary = _run(tmp_path)
    assert ray.calls["map_batches"]["num_gpus"] == 0 and summary.workers == 4
    ray = fake_ray({"CPU": 4, "GPU": 2})  # GPUs, but --device cpu: none reserved
    _run(tmp_path / "cpu", device="cpu")
    assert ray.calls["map_batches"]["num_gpus"] == 0


@pytest.mark.parametrize("gpus, device, message", [
    (2, "auto", "between 0 and 1"),
    (1, "cpu", "--device cpu"),
    (0, "cuda", "Ray hides the GPUs"),
    (None, "cuda:1", "sees as cuda:0"),
])
def test_ray_gpu_options_refused_before_ray_starts(fake_ray, tmp_path, gpus, device, message):
    ray = fake_ray({"CPU": 4, "GPU": 4})
    with pytest.raises(AdgenError, match=message):
        _run(tmp_path, device=device, gpus_per_worker=gpus)
    assert ray.calls == {}


def test_cli_passes_gpus_per_worker(fake_ray, monkeypatch, tmp_path, tiny_llama3_dir):
    import adgen.generation.ray_catalog as rc
    from adgen.cli import main

    fake_ray({"CPU": 4, "GPU": 1})
    seen = {}

    def run_catalog(records, output, **kw):
        seen.update(kw)
        return rc.CatalogSummary(total=len(records))

    monkeypatch.setattr(rc, "run_catalog", run_catalog)
    catalog = tmp_path / "c.jsonl"
    catalog.write_text(json.dumps({"content": "类型#裙"}, ensure_ascii=False) + "\n", encoding="utf-8")
    base = ["generate", "--model", str(tiny_llama3_dir), "--input", str(catalog), "--output", str(tmp_path / "o"),
            "--no-progress"]
    assert main([*base, "--engine", "ray", "--gpus-per-worker", "0.5"]) == 0
    assert seen["gpus_per_worker"] == 0.5
    assert main([*base, "--engine", "ray"]) == 0 and seen["gpus_per_worker"] is None
    assert main([*base, "--gpus-per-worker", "1"]) == 2  # goes with --engine ray


# ---- vLLM: LoRA requests, refused adapters, max_lora_rank -------------------------------------------


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in vllm: LLM records its kwargs; LoRARequest takes keywords only (like vLLM's msgspec Struct,
    whose fields after the first three changed across releases)."""
    calls: dict = {}

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

    class LoRARequest:
        def __init__(self, *, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    mods = {name: types.ModuleType(name) for name in ("vllm", "vllm.lora", "vllm.lora.request", "vllm.inputs")}
    mods["vllm"].LLM = LLM
    mods["vllm.lora.request"].LoRARequest = LoRARequest
    mods["vllm.inputs"].TokensPrompt = dict
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)

    def with_ranks(*ranks):  # a vLLM that exports its allowed ranks (vllm.config.lora.MaxLoRARanks)
        for name in ("vllm.config", "vllm.config.lora"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["vllm.config.lora"].MaxLoRARanks = Literal[ranks]

    calls["with_ranks"] = with_ranks
    return calls


def _adapter(tmp_path, name="adapter", **cfg) -> Path:
    d = tmp_path / name
    d.mkdir()
    base = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
            "use_dora": False, "modules_to_save": None}
    (d / "adapter_config.json").write_text(json.dumps({**base, **cfg}))
    return d


def _vllm_generator(tiny_llama3_dir, adapter, **kw):
    from adgen.generation.loader import load_generator

    return load_generator(str(tiny_llama3_dir), adapter=str(adapter) if adapter else None, backend="vllm", **kw)


def test_vllm_lora_request_by_keyword(fake_vllm, tiny_llama3_dir, tmp_path):
    adapter = _adapter(tmp_path, r=16)
    g = _vllm_generator(tiny_llama3_dir, adapter)
    lora = g._lora
    assert (lora.lora_name, lora.lora_int_id, lora.lora_path) == ("adgen-adapter", 1, str(adapter.resolve()))
    llm = fake_vllm["llm"]
    assert llm["enable_lora"] is True and llm["max_lora_rank"] == 16 and llm["dtype"] == "float32"


@pytest.mark.parametrize("cfg, rank", [({"r": 4}, 8), ({"r": 8}, 8), ({"r": 48}, 64),
                                       ({"r": 8, "rank_pattern": {"q_proj": 96}}, 128), ({"r": 300}, 320)])
def test_vllm_max_lora_rank_from_the_adapter(fake_vllm, tiny_llama3_dir, tmp_path, cfg, rank):
    _vllm_generator(tiny_llama3_dir, _adapter(tmp_path, **cfg))
    assert fake_vllm["llm"]["max_lora_rank"] == rank


def test_vllm_max_lora_rank_uses_the_installed_vllms_ranks(fake_vllm, tiny_llama3_dir, tmp_path):
    fake_vllm["with_ranks"](1, 8, 16, 32, 64, 128, 256)
    _vllm_generator(tiny_llama3_dir, _adapter(tmp_path, "a1", r=1))
    assert fake_vllm["llm"]["max_lora_rank"] == 1
    with pytest.raises(ConfigError, match=r"r=300 is above the largest rank vLLM serves \(256\)"):
        _vllm_generator(tiny_llama3_dir, _adapter(tmp_path, "a300", r=300))


@pytest.mark.parametrize("cfg, message", [
    ({"use_dora": True}, r"DoRA adapter \(use_dora: true\).*adgen export"),
    ({"modules_to_save": ["lm_head", "embed_tokens"]}, r"modules_to_save: lm_head, embed_tokens.*adgen export"),
])
def test_vllm_refuses_dora_and_modules_to_save_before_it_starts(fake_vllm, tiny_llama3_dir, tmp_path, cfg, message):
    from adgen.generation.vllm_backend import VLLMGenerator

    adapter = _adapter(tmp_path, **cfg)
    with pytest.raises(ConfigError, match=message):
        _vllm_generator(tiny_llama3_dir, adapter)
    with pytest.raises(ConfigError, match=message):  # the class itself refuses too
        VLLMGenerator(str(tiny_llama3_dir), None, None, adapter=str(adapter))
    assert "llm" not in fake_vllm


def test_vllm_without_adapter_and_auto_dtype_never_fp16(fake_vllm, fake_cuda, tiny_llama3_dir):
    fake_cuda["cap"] = (7, 5)  # a T4: vLLM's own "auto" would take fp16 here
    _vllm_generator(tiny_llama3_dir, None)
    llm = fake_vllm["llm"]
    assert llm["dtype"] == "float32" and "enable_lora" not in llm and "max_lora_rank" not in llm
    fake_cuda["cap"] = (9, 0)
    _vllm_generator(tiny_llama3_dir, None)
    assert fake_vllm["llm"]["dtype"] == "bfloat16"


def test_vllm_that_does_not_import_names_the_torch_it_needs(monkeypatch, tmp_path):
    """An installed vLLM built for another torch fails at import (undefined symbol): say which torch it needs."""
    from adgen.generation.vllm_backend import require_vllm

    pkg = tmp_path / "vllm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('vllm/_C.abi3.so: undefined symbol: _ZN3c104cuda9SetDevice')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    with pytest.raises(AdgenError, match=r"does not import.*undefined symbol.*torch==2\.13\.0.*adgen\[vllm\]"):
        require_vllm()
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed at all
    with pytest.raises(AdgenError, match=r"not installed.*adgen\[vllm\].*pip install vllm"):
        require_vllm()
