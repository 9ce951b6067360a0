"""The lean RMSNorm / SwiGLU blocks (adgen/train/lean_layers.py): same loss and gradients, less kept for backward."""

import copy

import pytest
import torch
from train_helpers import assert_within, backprop_bound, decoder_chain, head_bounds, logits_bound

from adgen.train.lean_layers import make_layers_lean


def _llama(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # trained-looking norms (not all ones), so their weight gradient matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def _loss_and_grads(model, ids, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    return float(loss.detach()), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, ids, autocast: bool) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        if t.dim() >= 2 and t.shape[-2] == ids.shape[1]:  # per-token tensors only (not weights or their casts)
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids).logits.float().sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("train", ["all", "lower frozen", "a zero in a norm's weight"])
def test_fp32_lean_layers_give_the_same_loss_and_gradients(train):
    plain = _llama()
    if train == "lower frozen":  # the demo's top-layers fine-tune: layer 0 and the embeddings frozen
        for name, p in plain.named_parameters():
            p.requires_grad_("layers.1." in name or "lm_head" in name)
    if train == "a zero in a norm's weight":  # the norm cannot recover its input from its output: keeps the input
        with torch.no_grad():
            plain.model.layers[0].input_layernorm.weight[5] = 0.0
    lean = copy.deepcopy(plain)
    assert make_layers_lean(lean) == 2 * 3  # two norms and one MLP per layer
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    loss_p, grads_p = _loss_and_grads(plain, ids, autocast=False)
    loss_l, grads_l = _loss_and_grads(lean, ids, autocast=False)
    loss_bound, grad_bounds = _fp32_bounds(plain, ids)
    assert abs(loss_l - loss_p) <= loss_bound
    assert grads_l.keys() == grads_p.keys() == grad_bounds.keys() and grads_p
    for k in grads_p:
        assert_within(grads_l[k], grads_p[k], grad_bounds[k], k)


def _fp32_bounds(model, ids):
    """How far two fp32 computations of `_loss_and_grads` (other kernels, other formulas) may be apart: the head's
    bounds with the decoder's chain of sums, forward and backward, carried back to every parameter (train_helpers)."""
    out = model(input_ids=ids, output_hidden_states=True)
    hidden, n = out.hidden_states[-1][0, :-1], ids.shape[1] - 1  # the mean over n positions
    chain = 2 * decoder_chain(model.config, ids.shape[1])
    loss_bound, gh_bound, gw_bound = head_bounds(hidden.detach(), model.lm_head.weight.detach(), ids[0, 1:], chain)
    names = [k for k, p in model.named_parameters() if p.requires_grad and k != "lm_head.weight"]
    params = dict(model.named_parameters())
    bounds = dict(zip(names, backprop_bound(hidden, [params[k] for k in names], gh_bound / n)))
    if model.lm_head.weight.requires_grad:
        bounds["lm_head.weight"] = gw_bound / n
    model.zero_grad(set_to_none=True)
    return loss_bound / n, bounds


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_bf16_autocast_lean_layers_match_and_keep_less_for_backward(storage):
    """fp32 weights (full fine-tuning) or bf16 weights (LoRA's frozen base) under bf16 autocast: the loss and
    gradients agree to bf16 rounding, and the tensors kept for backward shrink by over a third."""
    plain = _llama(dtype=storage)
    lean = copy.deepcopy(plain)
    assert make_layers_lean(lean) == 6
    ids = torch.randint(0, 96, (1, 48), generator=torch.Generator().manual_seed(2))
    loss_p, grads_p = _loss_and_grads(plain, ids, autocast=True)
    loss_l, grads_l = _loss_and_grads(lean, ids, autocast=True)
    assert loss_l == pytest.approx(loss_p, rel=2e-3)
    for k in grads_p:
        diff = (grads_l[k] - grads_p[k]).norm() / grads_p[k].norm().clamp_min(1e-12)
        assert diff < 3e-2, (k, float(diff))
    kept_plain, kept_lean = _saved_bytes(plain, ids, True), _saved_bytes(lean, ids, True)

    assert kept_lean < 0.66 * kept_plain, (kept_lean, kept_plain)


def test_a_norm_or_mlp_that_computes_something_else_keeps_its_own_forward():
    """Gemma-style norms (x / rms * (1 + weight)) and a GELU MLP look like Llama's by their attributes; the probe
    at swap time tells them apart and leaves them as they are."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    class OnePlusNorm(LlamaRMSNorm):
        def forward(self, x):
            xf = x.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return ((1 + self.weight) * xf * rstd).to(x.dtype)

    class GeluMLP(LlamaMLP):
        def forward(self, x):
            return self.down_proj(torch.nn.functional.gelu(self.gate_proj(x)) * self.up_proj(x))

    model = _llama()
    for layer in model.model.layers:
        norm = OnePlusNorm(64, eps=layer.input_layernorm.variance_epsilon)
        layer.input_layernorm = norm
        mlp = GeluMLP(model.config)
        mlp.load_state_dict(layer.mlp.state_dict())
        layer.mlp = mlp
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    assert make_layers_lean(model) == 2  # only the post-attention norms, which are Llama's
    assert all("forward" not in layer.input_layernorm.__dict__ and "forward" not in layer.mlp.__dict__
               for layer in model.model.layers)
    with torch.no_grad():
        assert_within(model(input_ids=ids).logits, out.logits, logits_bound(model, out.hidden_states[-1], 16), "logits")
