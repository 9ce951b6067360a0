"""Shared fixtures: the real files in ../shared and tiny random models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAMA3_TOKENIZER = SHARED / "llama3-tokenizer"
ADGEN_DEV = SHARED / "adgen" / "dev.json"
ADGEN_TRAIN = SHARED / "adgen" / "train.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _require(path: Path) -> Path:
    # ../shared is part of the project's contract (CI has it): a missing file is a failure, not a skip.
    assert path.exists(), f"{path} is missing: tests need ../shared beside the repo"
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    return _require(LLAMA3_TOKENIZER)


@pytest.fixture(scope="session")
def adgen_dev_path() -> Path:
    return _require(ADGEN_DEV)


@pytest.fixture(scope="session")
def adgen_train_path() -> Path:
    return _require(ADGEN_TRAIN)


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))


def build_tiny_llama(out_dir: Path, tokenizer, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random LlamaForCausalLM (2 layers, hidden 64) saved with `tokenizer` as a local HF directory."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>") if t in tokenizer.get_vocab()]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos or tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory, llama3_tokenizer) -> Path:
    """Local HF dir: tiny random Llama weights + the real Llama-3 tokenizer (with its chat template)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama3"), llama3_tokenizer)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The built-in SmolLM2-135M-Instruct, converted once to a cached safetensors directory."""
    from adgen.models import resolve_model

    return Path(resolve_model("smollm2-135m").path)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_chatml_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """Tiny random Llama weights + the real SmolLM2 (ChatML) tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-chatml"), smollm2_tokenizer)


def _random_lora(model_dir: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj, r=4) with random, non-zero weights: adapter on != off."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama3_lora_dir(tmp_path_factory, tiny_llama3_dir) -> Path:
    """A random LoRA adapter for tiny_llama3_dir."""
    return _random_lora(tiny_llama3_dir, tmp_path_factory.mktemp("tiny-llama3-lora"), seed=1)


@pytest.fixture(scope="session")
def tiny_llama3_lora_b_dir(tmp_path_factory, tiny_llama3_dir) -> Path:
    """A second random LoRA adapter for tiny_llama3_dir (another brand's tone, for multi-adapter serving)."""
    return _random_lora(tiny_llama3_dir, tmp_path_factory.mktemp("tiny-llama3-lora-b"), seed=2)
