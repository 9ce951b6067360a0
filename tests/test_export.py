"""adgen export: LoRA / DoRA merged into the base equals base + adapter; 4-bit and prefix merges refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adgen.errors import AdgenError


def _make_adapter(base_dir, out, *, dora=False):
    """A LoRA adapter with non-zero random B (a fresh adapter would merge to the base itself)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=dora,
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)  # keep the change moderate, but far above float noise
    model.save_pretrained(str(out))
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_model_equals_base_plus_adapter(tiny_llama3_dir, tmp_path, dora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adgen.export import merge_adapter

    adapter = _make_adapter(tiny_llama3_dir, tmp_path / "adapter", dora=dora)
    out = merge_adapter(adapter, tmp_path / "merged", model=str(tiny_llama3_dir), dtype="fp32")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    ids = torch.tensor([[128000, 9906, 11, 1917, 0, 15339, 3001, 374, 264, 1296]])
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    expected = _logits(with_adapter, ids)
    plain = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32).eval(), ids)
    assert (expected - plain).abs().max() > 1e-3  # the adapter changes the model...
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-5)  # ...and the merge keeps it


def test_merge_into_4bit_is_refused_with_the_procedure(tiny_llama3_dir, tmp_path):
    from adgen.export import merge_adapter

    adapter = _make_adapter(tiny_llama3_dir, tmp_path / "adapter")
    with pytest.raises(AdgenError, match="16-bit") as e:
        merge_adapter(adapter, tmp_path / "m", model=str(tiny_llama3_dir), quantization="nf4")
    assert "quantize the merged" in str(e.value)
    # a checkpoint stored quantized is refused too
    qdir = tmp_path / "base-4bit"
    shutil.copytree(tiny_llama3_dir, qdir)
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdgenError, match="quantized"):
        merge_adapter(adapter, tmp_path / "m2", model=str(qdir))
    assert not (tmp_path / "m").exists() and not (tmp_path / "m2").exists()


def test_prefix_adapter_cannot_be_merged(tiny_llama3_dir, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adgen.export import merge_adapter

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir)),
                           PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    model.save_pretrained(str(tmp_path / "prefix"))
    with pytest.raises(AdgenError, match="PREFIX_TUNING.*adapter"):
        merge_adapter(tmp_path / "prefix", tmp_path / "m", model=str(tiny_llama3_dir))


def test_export_command(tiny_llama3_dir, tmp_path, capsys):
    from adgen.cli import main

    adapter = _make_adapter(tiny_llama3_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    args = ["export", "--model", str(tiny_llama3_dir), "--adapter", str(adapter), "-o", str(out), "--dtype", "bf16"]
    assert main(args) == 0
    assert "vllm serve" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert main(args) == 2  # an existing model directory needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(args[:-2] + ["--quantize", "nf4", "-o", str(tmp_path / "q")]) == 2
    assert "16-bit" in capsys.readouterr().err


def test_the_export_package_keeps_the_old_modules_names():
    """adgen.export was one module and adgen.gguf_export another: their public names stay importable, the
    merge's from adgen.export, the GGUF ones from adgen.export.gguf (and adgen.export)."""
    import importlib

    import adgen.export as export
    import adgen.export.gguf as gguf

    merge_names = ["FOUR_BIT_PROCEDURE", "merge_adapter", "read_adapter_config"]
    gguf_names = ["ChatFormat", "GGUFExport", "QUANTS", "Quant", "SUPPORTED_ARCHITECTURES", "check_architecture",
                  "check_gguf_path", "check_quant", "detect_chat_format", "detect_pre_tokenizer", "export_gguf",
                  "load_for_gguf", "modelfile_path", "modelfile_text", "preflight", "write_modelfile"]
    assert [n for n in merge_names + gguf_names if not hasattr(export, n)] == []
    assert [n for n in gguf_names if not hasattr(gguf, n)] == []
    with pytest.raises(ImportError):
        importlib.import_module("adgen.gguf_export")  # no shim left behind


def test_atomic_output_replaces_only_on_success(tmp_path):
    """The GGUF file is written through adgen.io.atomic_output: a failed write leaves the old file and no temp."""
    import os

    from adgen.io import atomic_output, default_file_mode

    out = tmp_path / "sub" / "model.gguf"
    with atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp != out
        tmp.write_bytes(b"first")
    assert out.read_bytes() == b"first" and out.stat().st_mode & 0o777 == default_file_mode()
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert out.read_bytes() == b"first"
    assert sorted(os.listdir(out.parent)) == ["model.gguf"]
