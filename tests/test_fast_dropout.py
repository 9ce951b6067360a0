"""The adapters' CPU dropout: the distribution of nn.Dropout from fewer random draws, swapped into PEFT's LoRA layers."""

import pytest
import torch
from torch import nn

from adgen.train.fast_dropout import FastDropout, keep_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_each_element_is_dropped_with_probability_p(p):
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([1000, 4000]), p)
    assert keep.dtype == torch.int16 and set(keep.unique().tolist()) == {0, 1}
    drop = 1 - keep.double()
    sd = (p * (1 - p) / (keep.numel() / 4)) ** 0.5
    for lane in range(4):  # each 64-bit draw feeds four neighbours: each of the four is uniform on its own
        assert abs(drop.view(-1)[lane::4].mean().item() - p) < 5 * sd
    pairs = drop.view(-1, 4)  # and the four are independent: P(two neighbours both dropped) = p^2
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - p * p) < 5 * (p * p / pairs.shape[0]) ** 0.5


def test_training_output_and_gradient_are_dropouts():
    torch.manual_seed(0)
    x = torch.randn(64, 96, dtype=torch.bfloat16, requires_grad=True)
    d = FastDropout(0.25).train()
    y = d(x)
    kept = y != 0
    assert 0.6 < kept.float().mean().item() < 0.9
    torch.testing.assert_close(y[kept], (x.detach()[kept] * (1 / 0.75)).to(y.dtype), rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.to(x.dtype) * (1 / 0.75), rtol=0, atol=0)


def test_seeded_like_torch_and_identity_outside_training():
    x = torch.randn(32, 48)
    d = FastDropout(0.3).train()
    torch.manual_seed(7)
    a = d(x)
    torch.manual_seed(7)
    assert torch.equal(d(x), a)  # reproducible from torch's seed
    assert not torch.equal(d(x), a)  # and a fresh mask per call
    assert torch.equal(d.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)


def test_swapped_into_lora_layers(tiny_llama3_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    keys = set(model.state_dict())
    n_lora = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict))
    assert use_fast_dropout(model) == n_lora > 0
    assert all(isinstance(m.lora_dropout["default"], FastDropout) for m in model.modules()
               if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict))
    assert set(model.state_dict()) == keys  # the saved adapter is the same
    for m in model.modules():  # LoRA B starts at zero: give it a value so that the dropout shows in the output
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B["default"].weight, std=0.5)
    ids = torch.arange(3, 19).unsqueeze(0)
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
