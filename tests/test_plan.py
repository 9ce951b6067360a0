"""`adgen plan`: parameter counts from the meta device equal the real model's, the Llama-3-8B unit numbers, the
activation formula equals what autograd keeps (tiny Llamas on CPU), the estimates against published figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adgen.cli import main
from adgen.errors import ConfigError, ModelError
from adgen.plan import GIB, plan, plan_config
from adgen.train.config import load_train_config

GB = 1e9

# Llama-3-8B-Instruct: 8,030,261,248 parameters (Meta's model card: "8B"; the sum over its config's shapes);
# LoRA r=8 on q_proj (4096 -> 4096) and v_proj (4096 -> 1024): 32 x 8 x ((4096 + 4096) + (4096 + 1024)) = 3,407,872;
# KV cache: 2 x 32 layers x 8 KV heads x 128 x 2 bytes = 131,072 bytes per token.
LLAMA3_8B_PARAMETERS = 8_030_261_248
LORA_R8_QV_TRAINABLE = 3_407_872
LLAMA3_8B_KV_BYTES = 131_072


@pytest.fixture(scope="module")
def lora_plan():
    return plan("llama3-8b-lora")


def test_llama3_8b_lora_unit_numbers_from_the_cli(capsys):
    assert main(["plan", "llama3-8b-lora", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["parameters"] == LLAMA3_8B_PARAMETERS
    assert p["trainable_parameters"] == LORA_R8_QV_TRAINABLE
    assert p["kv_bytes_per_token"] == LLAMA3_8B_KV_BYTES
    assert p["train_peak_bytes"] == sum(p["train_breakdown"].values())
    assert {"24", "40", "80"} <= set(p["fits"]) and p["architecture"]["source"].startswith("shipped")


def test_the_table_names_the_figures(capsys):
    assert main(["plan", "llama3-8b-lora", "lora.r=16", "--gpu-memory", "48"]) == 0
    out = capsys.readouterr().out
    for text in ("8,030,261,248", "6,815,744", "training peak", "131,072", "48 GiB"):
        assert text in out, text
    assert main(["plan", "llama3-8b-lora", "batch_size"]) == 2  # not key=value: a one-line error, no traceback


def test_qlora_recipe_fits_a_24_gb_card_and_matches_published_figures():
    # QLoRA on Llama-3-8B (NF4 base, r=16 on all linear layers, gradient checkpointing) on a 24 GB card at
    # batch 2 x 1024: ~10-16 GB in practice (third-party guides report ~10 GB at batch 1, ~14 GB at batch 4).
    q = plan("llama3-8b-qlora")
    assert q["fits"]["24"] and q["train_peak_bytes"] < 16 * GB
    q1024 = plan("llama3-8b-qlora", ["max_length=1024"])
    assert 10 * GB <= q1024["train_peak_bytes"] <= 16 * GB
    # the NF4 weights: 4.127 bits per weight of the decoder layers' linears (QLoRA paper, double quantization)
    assert q["train_breakdown"]["weights_nf4"] == pytest.approx(6_979_321_856 * 4.127 / 8, rel=1e-3)
    # peft's prepare_model_for_kbit_training upcasts embeddings + LM head (2 x 128256 x 4096) to fp32
    assert q["train_breakdown"]["weights_fp32"] == pytest.approx(2 * 128256 * 4096 * 4, rel=1e-3)


def test_lora_bf16_at_small_batch_matches_published_figures(lora_plan):
    # LoRA over a bf16 Llama-3-8B at a small batch: ~18-22 GB (the weights alone are 16.06 GB).
    small = plan("llama3-8b-lora", ["batch_size=1"])
    assert 18 * GB <= small["train_peak_bytes"] <= 22 * GB
    assert lora_plan["train_breakdown"]["weights"] == LLAMA3_8B_PARAMETERS * 2
    # checkpointing: the layers keep only their inputs; the estimate says so and what it saves
    saved = lora_plan["train_peak_bytes_without_checkpointing"] - lora_plan["train_peak_bytes_with_checkpointing"]
    assert saved > 3 * GIB


@pytest.mark.parametrize("overrides", [
    {"method": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
    {"method": "lora", "lora": {"r": 8, "target_modules": "all-linear"}, "top_layers": 1},
    {"method": "dora", "lora": {"r": 4, "target_modules": "all-linear"}},
    {"method": "prefix", "prefix": {"num_virtual_tokens": 16}},
    {"method": "full", "top_layers": 1},
])
def test_parameter_counts_equal_a_really_built_model(tiny_llama3_dir, overrides):
    """The meta-device counts against the trainer's own path on real (tiny, random) weights."""
    from transformers import AutoModelForCausalLM

    from adgen.train.peft_setup import Precision, apply_method, count_parameters

    cfg = load_train_config(None, {"model": str(tiny_llama3_dir), "train_data": "x", **overrides})
    p = plan_config(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir))
    base = sum(t.numel() for t in model.parameters())
    trainable, total = count_parameters(apply_method(model, cfg, Precision("fp32", "float32", "no", "float32")))
    assert (p["parameters"], p["trainable_parameters"]) == (base, trainable)
    if cfg.method != "full":
        assert total > base  # PEFT's count includes the adapter; `parameters` is the base model's


def test_a_hub_id_without_a_local_config_is_a_clear_error():
    with pytest.raises(ModelError, match="local directory holding its config.json"):
        plan(None, {"model": "some-org/some-model-that-is-not-cached", "train_data": "x"})
    with pytest.raises(ConfigError, match="gpu-memory"):
        plan("llama3-8b-lora", gpu_memory_gib=0)


def _saved_bytes_per_token_per_layer(model_dir: Path, cfg, tokens: int = 80) -> float:
    """What autograd keeps per token per decoder layer: the difference between a model with two layers and one
    with one, on CPU under bf16 autocast, as the trainer runs the method. Weights and autocast's copies of
    them (kept per weight, not per token) are left out: `tokens` differs from every weight dimension."""
    import contextlib

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from adgen.train.peft_setup import Precision, apply_method

    kept = []
    for layers in (1, 2):
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(str(model_dir), num_hidden_layers=layers)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if cfg.method == "full" else torch.bfloat16)
        model = apply_method(base, cfg, Precision("bf16", "bfloat16", "bf16", "bfloat16")).train()
        uncast = contextlib.nullcontext()
        if cfg.method == "lora":  # the trainer's run.lora_inputs_uncast
            from peft.helpers import disable_input_dtype_casting

            uncast = disable_input_dtype_casting(model)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        weight_shapes = {tuple(p.shape) for p in model.parameters()}
        seen: dict = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params and tuple(t.shape) not in weight_shapes:
                seen[s.data_ptr()] = s.nbytes()
            return t

        ids = torch.randint(0, 500, (1, tokens))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), uncast, \
                torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, use_cache=False)
        kept.append(sum(seen.values()))
    return (kept[1] - kept[0]) / tokens


@pytest.fixture(scope="module")
def mha_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama config with as many K/V heads as query heads (sdpa then never repeats K/V) and sizes that
    tell h, i and the KV width apart."""
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("tiny-mha")
    LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=320, num_hidden_layers=2, num_attention_heads=3,
                num_key_value_heads=3, tie_word_embeddings=False).save_pretrained(out)
    return out


@pytest.mark.parametrize("overrides", [
    {"method": "lora", "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}},
    {"method": "lora", "lora": {"r": 16, "target_modules": "all-linear", "dropout": 0.0}},
    {"method": "full", "precision": "bf16"},
])
def test_activation_formula_equals_what_autograd_keeps(mha_llama_dir, overrides):
    """transformers' decoder layer under bf16 autocast: the formula counts each saved tensor. (Dropout is 0 here:
    CPU's dropout keeps its mask in the input's dtype, CUDA's in one byte per element, which the formula uses.)"""
    from adgen.plan.arch import model_shape
    from adgen.plan.memory import layer_bytes_per_token, training_dtypes

    cfg = load_train_config(None, {"model": str(mha_llama_dir), "train_data": "x", **overrides})
    shape = model_shape(cfg)
    predicted = layer_bytes_per_token(shape, cfg, training_dtypes(cfg), 1)
    # equal to the byte here (3700, 4724, 5844 bytes); 0.2% leaves room for another CPU's attention kernel
    assert _saved_bytes_per_token_per_layer(mha_llama_dir, cfg) == pytest.approx(predicted, rel=0.002)


