"""adgen export --gguf: the GGUF loads back in transformers with the same logits and tokenizer, q8_0 keeps the
next-token choices, the Modelfile matches the chat format, and bad input gets a clear error (exit code 2)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gguf_helpers import chat_ids, modelfile_parts, read_gguf, render_ollama

from adgen.errors import AdgenError

# f16 round trip, tiny random Llama-3 + LoRA: every 2-D weight is rounded to float16 (relative error <= 2**-11).
# Against the fp32 merged model: measured max |logit diff| 8.3e-4 (logits span
# -0.85..0.84); bound 5e-3.
# Against the same model with its weights rounded to f16 in PyTorch: measured 0.0 (bit-identical); bound 1e-4
# (so the whole difference is that rounding: names, permutation and metadata are exact).
TINY_F16_ATOL = 5e-3
TINY_F16_ROUNDED_ATOL = 1e-4
# SmolLM2-135M (real weights, 30 layers), f16: the rounding compounds through the layers; measured max |diff|
# 0.059 over 100 positions with logits spanning -32..36; bound 0.25 (under 0.4% of that range).
# q8_0: measured top-1 agreement 97% (97 of 100 positions); required >= 95%.
SMOLLM2_F16_ATOL = 0.25
Q8_TOP1_MIN = 0.95

PROMPT_ZH = "类型#裙*颜色#白色*风格#简约*图案#条纹*裙长#连衣裙 请写一段 100 字左右的广告文案。"


@pytest.fixture
def fast_gguf_loads(monkeypatch):
    """Test speed only: transformers' llama GGUF loader parses the file twice with gguf.GGUFReader (slow on a
    large vocabulary) and rebuilds gguf's tensor-name map once per module (~400 times for SmolLM2): ~25 s of
    CPU per load. Both are pure functions of their arguments, so cache them; what gets loaded is unchanged."""
    import functools

    import gguf

    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    readers: dict = {}
    original = gguf.GGUFReader

    def cached_reader(path, *args, **kwargs):
        stat = os.stat(path)
        key = (os.fspath(path), stat.st_mtime_ns, stat.st_size, args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    monkeypatch.setattr(gguf, "GGUFReader", cached_reader)
    yield
    readers.clear()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def _load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _load_gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---------------------------------------------------------------------------------------------- round trips


def test_f16_round_trip_with_adapter(tiny_llama3_dir, tiny_llama3_lora_dir, llama3_tokenizer, tmp_path, capsys,
                                     fast_gguf_loads):
    """-o and --gguf together: the GGUF holds the merged model (logits match it in transformers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adgen.cli import main

    merged_dir, gguf = tmp_path / "merged", tmp_path / "adgen.gguf"
    rc = main(["export", "--model", str(tiny_llama3_dir), "--adapter", str(tiny_llama3_lora_dir),
               "-o", str(merged_dir), "--gguf", str(gguf)])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"wrote {gguf}" in out and "f16" in out and "21 tensors" in out  # embd + 2 * 9 + output_norm + output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adgen.Modelfile", "adgen.gguf", "merged"]  # no temp files

    meta, types, _ = read_gguf(gguf)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 1  # MOSTLY_F16
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.chat_template"] == llama3_tokenizer.chat_template
    assert meta["tokenizer.ggml.bos_token_id"] == 128000 and meta["tokenizer.ggml.eos_token_id"] == 128001
    assert meta["tokenizer.ggml.add_bos_token"] is False  # this tokenizer.json adds none; the template writes it
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.vocab_size"] == len(llama3_tokenizer)
    tokens, token_types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert tokens[128009] == "<|eot_id|>" and token_types[128009] == 3  # CONTROL
    assert tokens[1000] == llama3_tokenizer.convert_ids_to_tokens(1000) and token_types[1000] == 1  # NORMAL
    assert meta["tokenizer.ggml.merges"] > 200_000  # a count: the reader skips string arrays not asked for
    assert types["output.weight"] == "F16" and types["blk.1.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert "blk.0.ffn_gate.weight" in types and "blk.1.attn_output.weight" in types

    ids = torch.tensor([chat_ids(llama3_tokenizer, PROMPT_ZH)])
    expected = _logits(AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval(), ids)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    with_adapter = _logits(PeftModel.from_pretrained(base, str(tiny_llama3_lora_dir)).eval(), ids)
    torch.testing.assert_close(expected, with_adapter, rtol=1e-4, atol=1e-5)
    plain = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32).eval(), ids)
    assert (expected - plain).abs().max() > 20 * TINY_F16_ATOL  # the adapter matters...

    got = _logits(_load_gguf(gguf), ids)
    diff = (got - expected).abs().max().item()
    rounded = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())  # what f16 storage does to each weight
    diff_rounded = (got - _logits(rounded, ids)).abs().max().item()
    print(f"tiny llama-3 + LoRA, f16: max |logit diff| = {diff:.2e} vs fp32, {diff_rounded:.2e} vs f16-rounded "
          f"weights (logits {expected.min():.2f}..{expected.max():.2f}, adapter effect "
          f"{(expected - plain).abs().max():.2f})")
    assert diff < TINY_F16_ATOL  # ...and is in the GGUF
    # All of the difference is the f16 rounding of the weights (leaving out the q/k permutation gives ~1e-2 here).
    assert diff_rounded < TINY_F16_ROUNDED_ATOL

    tok = _load_gguf_tokenizer(gguf)
    for text in (PROMPT_ZH, "简约而不简单的牛仔外套，白色的衣身十分百搭。It's 2024!\n\n  x"):
        assert tok(text, add_special_tokens=False)["input_ids"] == llama3_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tok(text)["input_ids"] == llama3_tokenizer(text)["input_ids"]
    assert tok(llama3_tokenizer.decode(ids[0]), add_special_tokens=False)["input_ids"] == ids[0].tolist()


def test_q8_0_cli_merges_in_a_temp_dir(tiny_llama3_dir, tiny_llama3_lora_dir, tmp_path, capsys):
    """--gguf alone (no -o): merge_adapter runs in fp32 into a temporary directory that is removed afterwards."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adgen.cli import main
    from adgen.export.gguf_tensors import rope_permute

    gguf = tmp_path / "out" / "tiny-q8.gguf"
    rc = main(["export", "--model", str(tiny_llama3_dir), "--adapter", str(tiny_llama3_lora_dir),
               "--gguf", str(gguf), "--quant", "q8_0"])
    assert rc == 0
    assert "q8_0" in capsys.readouterr().out
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["tiny-q8.Modelfile", "tiny-q8.gguf"]
    umask = os.umask(0)
    os.umask(umask)
    for path in gguf.parent.iterdir():  # as open() would create them, not mkstemp's 0600
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    meta, types, tensor = read_gguf(gguf)
    assert meta["general.file_type"] == 7 and meta["general.quantization_version"] == 2  # MOSTLY_Q8_0
    assert {t for n, t in types.items() if n.endswith("norm.weight")} == {"F32"}
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {"Q8_0"}

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(tiny_llama3_lora_dir)).merge_and_unload().state_dict()
    # Q8_0: one fp16 scale per 32 values, |error| <= max|block| / 254 (~4e-4 here, weights ~N(0, 0.02))
    for name, hf_name, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 4),
                                 ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2),
                                 ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight", None),
                                 ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", None)):
        want = merged[hf_name].numpy()
        want = rope_permute(want, heads) if heads else want
        np.testing.assert_allclose(tensor(name), want, atol=np.abs(want).max() / 254 + 1e-6, rtol=0)
    np.testing.assert_array_equal(tensor("blk.0.ffn_norm.weight"),
                                  merged["model.layers.0.post_attention_layernorm.weight"].numpy())

    assert main(["export", "--model", str(tiny_llama3_dir), "--gguf", str(gguf)]) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    # no adapter: the base model itself
    assert main(["export", "--model", str(tiny_llama3_dir), "--gguf", str(gguf), "--overwrite"]) == 0
    base_q = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32).state_dict()
    _, types, tensor = read_gguf(gguf)
    assert types["blk.0.attn_v.weight"] == "F16"
    np.testing.assert_allclose(tensor("blk.0.attn_v.weight"), base_q["model.layers.0.self_attn.v_proj.weight"].numpy(),
                               atol=1e-4, rtol=1e-3)
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["tiny-q8.Modelfile", "tiny-q8.gguf"]


@pytest.mark.slow
def test_smollm2_f16_and_q8_0(smollm2_dir, smollm2_tokenizer, adgen_dev_path, tmp_path, fast_gguf_loads):
    """Real weights, tied embeddings, ChatML: f16 logits stay close; q8_0 keeps >= 95% of the top-1 tokens."""
    from transformers import AutoModelForCausalLM

    from adgen.export.gguf import export_gguf

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    record = json.loads(adgen_dev_path.read_text(encoding="utf-8").splitlines()[0])
    ids = chat_ids(smollm2_tokenizer, record["content"], record["summary"])[:100]  # the prompt + part of a reply
    ids_t = torch.tensor([ids])
    expected = _logits(model, ids_t)

    f16 = export_gguf(model, smollm2_tokenizer, tmp_path / "smollm2-f16.gguf", progress=False)
    assert f16.chat_format == "chatml" and f16.quant == "f16"
    meta, types, _ = read_gguf(f16.path)
    assert "output.weight" not in types and types["token_embd.weight"] == "F16"  # tied: llama.cpp reuses it
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.add_bos_token"] is False
    loaded = _load_gguf(f16.path)
    assert loaded.config.tie_word_embeddings
    got = _logits(loaded, ids_t)
    diff = (got - expected).abs().max().item()
    print(f"SmolLM2 f16: max |logit diff| = {diff:.3f} (logit range {expected.min():.1f}..{expected.max():.1f})")
    assert diff < SMOLLM2_F16_ATOL
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    tok = _load_gguf_tokenizer(f16.path)
    assert tok(record["content"], add_special_tokens=False)["input_ids"] == \
        smollm2_tokenizer(record["content"], add_special_tokens=False)["input_ids"]
    del loaded

    q8 = export_gguf(model, smollm2_tokenizer, tmp_path / "smollm2-q8_0.gguf", quant="q8_0", progress=False)
    assert q8.size_bytes < 0.6 * f16.size_bytes
    _, types, _ = read_gguf(q8.path)
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.ffn_norm.weight"] == "F32"
    got = _logits(_load_gguf(q8.path), ids_t)
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"SmolLM2 q8_0: top-1 agreement {agreement:.1%} over {len(ids)} positions, "
          f"max |logit diff| = {(got - expected).abs().max().item():.3f}")
    assert agreement >= Q8_TOP1_MIN


# ---------------------------------------------------------------------------------------------- Modelfile


def test_modelfile_llama3(tmp_path, llama3_tokenizer):
    from adgen.data.chat import DEFAULT_SYSTEM_PROMPT
    from adgen.export.gguf import write_modelfile

    path = write_modelfile(tmp_path / "ad.gguf", llama3_tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT)
    assert path == tmp_path / "ad.Modelfile"
    parts = modelfile_parts(path.read_text(encoding="utf-8"))
    assert parts["from"] == ["./ad.gguf"]
    assert parts["stops"] == ["<|eot_id|>", "<|end_of_text|>"]
    assert parts["system"] == DEFAULT_SYSTEM_PROMPT
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": PROMPT_ZH}]
    # The template reproduces the tokenizer's chat template, BOS included (this tokenizer adds none itself).
    assert render_ollama(parts["template"], messages) == llama3_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_modelfile_chatml(tmp_path, tiny_chatml_dir):
    from transformers import AutoTokenizer

    from adgen.data.chat import DEFAULT_SYSTEM_PROMPT
    from adgen.export.gguf import detect_chat_format, write_modelfile

    tok = AutoTokenizer.from_pretrained(str(tiny_chatml_dir))
    assert detect_chat_format(tok) == "chatml"
    text = write_modelfile(tmp_path / "smol.gguf", tok, system_prompt=DEFAULT_SYSTEM_PROMPT).read_text(encoding="utf-8")
    parts = modelfile_parts(text)
    assert parts["from"] == ["./smol.gguf"] and parts["stops"] == ["<|im_end|>"]
    assert "<|eot_id|>" not in text and parts["system"] == DEFAULT_SYSTEM_PROMPT
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": PROMPT_ZH}]
    assert render_ollama(parts["template"], messages) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------- units / errors


def test_rope_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from adgen.export.gguf_tensors import rope_permute

    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)  # 3 heads of 4 rows
    permuted = rope_permute(w, 3)
    assert not np.array_equal(permuted, w)
    assert permuted[:4, 0].tolist() == [0, 10, 5, 15]  # per head: rows (0, 2), (1, 3) become neighbours
    back = LlamaTensorProcessor(config={"num_attention_heads": 3, "num_key_value_heads": 3}).process(
        permuted, "blk.0.attn_q.weight").weights
    np.testing.assert_array_equal(back, w)


def test_llama3_rope_scaling_writes_rope_freqs():
    from transformers import LlamaConfig, LlamaForCausalLM

    from adgen.export.gguf_tensors import plan_tensors

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    plans = {p.name: p for p in plan_tensors(LlamaForCausalLM(config), "f16")}
    factors = plans["rope_freqs.weight"].load()
    assert factors.shape == (16,) and factors[0] == 1.0 and factors[-1] == 8.0  # high freqs kept, low ones / 8
    assert np.all(np.diff(factors) >= 0)


def test_bad_input_gives_clear_errors(tiny_llama3_dir, tmp_path, capsys, llama3_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from adgen.cli import main
    from adgen.export.gguf import export_gguf

    model = ["export", "--model", str(tiny_llama3_dir)]
    assert main(model + ["--gguf", str(tmp_path / "x.gguf"), "--quant", "q4_k"]) == 2
    err = capsys.readouterr().err
    assert "--quant q4_k" in err and "--quant f16" in err and "q8_0" in err and "llama-quantize" in err
    assert "q4_k_m" in err and "build_llama_cpp.sh" in err  # the types adgen makes through llama.cpp
    assert main(model) == 2
    err = capsys.readouterr().err
    assert "-o DIR" in err and "--gguf" in err
    assert main(model + ["-o", str(tmp_path / "m")]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert main(model + ["--gguf", str(tmp_path / "x.bin")]) == 2
    assert "ending in .gguf" in capsys.readouterr().err

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    qwen_dir = tmp_path / "qwen"
    qwen.save_pretrained(qwen_dir)
    assert main(["export", "--model", str(qwen_dir), "--gguf", str(tmp_path / "q.gguf")]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err and "convert_hf_to_gguf" in err
    with pytest.raises(AdgenError, match="llama architecture only"):
        export_gguf(qwen, llama3_tokenizer, tmp_path / "q.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))
