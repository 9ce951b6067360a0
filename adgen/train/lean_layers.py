"""RMSNorm and SwiGLU MLP blocks that keep less for the backward pass, for Llama-shaped decoder layers.

Under bf16 autocast a Llama decoder layer, as transformers writes it, keeps ~38 KB per token for the
backward pass (SmolLM2-135M; probe and figures in docs/BENCHMARK_NOTES.md section 8): each RMSNorm keeps its fp32
input *and* its fp32 output; autocast casts that output to bf16 once per projection that reads it (q, k, v:
three copies; gate, up: two); the MLP keeps gate, silu(gate), up and their product. Everything but one
bf16 copy of each norm's output, 1/rms, gate and up can be recomputed from those with elementwise work:

- `_RMSNorm`: keeps 1/rms (one float per token) and its output, which the projections keep anyway; returns
  that output already in the autocast dtype, so the projections share one copy.
- `_SwiGLU`: keeps its input, gate and up; recomputes silu(gate) * up in backward (bit-identical to the
  forward's) instead of keeping two more intermediate-size tensors.

No matmul is recomputed, so a step costs what it cost (measured in docs/BENCHMARK_NOTES.md section 8). Hand-written because
the libraries with such blocks (Liger-Kernel, Unsloth) are Triton kernels for GPUs; this is plain PyTorch.
`make_layers_lean` swaps the forward of each norm / MLP only after checking that the swapped module gives
its original outputs on a probe (a model whose norm or MLP differs, e.g. Gemma's 1 + weight, keeps its own).
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _RMSNorm(torch.autograd.Function):
    """transformers' LlamaRMSNorm (weight * (x / rms(x)).to(x.dtype)), its output cast to `cast_to` when given.

    Keeps 1/rms and its own output, which the projections reading it keep anyway (the same storage): backward
    recovers x / rms as output / weight, to the output's precision (bf16 under autocast, like the matmuls'
    own saved inputs). A weight with a zero in it cannot be divided by: then the input is kept instead
    (`from_output` False; decided once when the forward is swapped in, see `make_layers_lean`)."""

    @staticmethod
    def forward(ctx, x, weight, eps, cast_to, from_output=True):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)
        ctx.y_dtype, ctx.x_dtype = y.dtype, x.dtype
        if cast_to is not None and y.dtype != cast_to and y.is_floating_point():
            y = y.to(cast_to)
        ctx.from_output = from_output
        ctx.save_for_backward(y if ctx.from_output else x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad):
        kept, rstd, weight = ctx.saved_tensors
        # Mixed-dtype ops promote inside their one kernel (no separate cast pass); in-place where the input is spent.
        xhat_f = torch.div(kept, weight.float()) if ctx.from_output else torch.mul(kept, rstd)
        g = grad.to(ctx.y_dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g * xhat_f.to(ctx.x_dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gx = (g * weight).to(ctx.x_dtype).float()  # the gradient reaching the normalised input, as autograd has it
            mean_dot = torch.linalg.vecdot(gx, xhat_f).unsqueeze(-1).div_(gx.shape[-1])
            grad_x = gx.addcmul_(xhat_f, mean_dot, value=-1).mul_(rstd).to(ctx.x_dtype)
        return grad_x, grad_weight, None, None, None


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _SwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) for bias-free linears; the matmuls run in `dtype` (the autocast dtype or x's)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, dtype):
        xc = x.to(dtype)
        gate = F.linear(xc, w_gate.to(dtype))
        up = F.linear(xc, w_up.to(dtype))
        out = F.linear(F.silu(gate) * up, w_down.to(dtype))
        ctx.save_for_backward(xc, gate, up, w_gate, w_up, w_down)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        dtype = gate.dtype
        grad_out = grad_out.to(dtype)
        grad_w_down = None
        if ctx.needs_input_grad[3]:
            hidden = F.silu(gate) * up  # the forward's exact values: same ops on the same inputs
            grad_w_down = (_rows(grad_out).T @ _rows(hidden)).to(w_down.dtype)
            del hidden
        grad_hidden = grad_out @ w_down.to(dtype)
        # The ops autograd itself runs for silu(gate) * up (aten's fused silu_backward; bit-identical gradients):
        # four passes over the intermediate-size tensors instead of ~14 in fp32 (17.2 -> 3.9 ms a SmolLM2 layer).
        grad_up = grad_hidden * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)
        del grad_hidden
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_gate @ w_gate.to(dtype)).add_(grad_up @ w_up.to(dtype)).to(ctx.x_dtype)
        grad_w_gate = (_rows(grad_gate).T @ _rows(xc)).to(w_gate.dtype) if ctx.needs_input_grad[1] else None
        grad_w_up = (_rows(grad_up).T @ _rows(xc)).to(w_up.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w_gate, grad_w_up, grad_w_down, None


def lean_rms_norm_forward(self, hidden_states):
    cast_to = _autocast_dtype(hidden_states.device.type) if getattr(self, "_adgen_feeds_projections", False) else None
    # No per-call look at the weight's values: on a GPU `bool(tensor)` waits for the device, once per norm per step
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, cast_to,
                          not getattr(self, "_adgen_weight_has_zero", True))


def lean_swiglu_forward(self, x):
    dtype = _autocast_dtype(x.device.type) or x.dtype
    return _SwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, dtype)


def _plain_linear(m) -> bool:
    """A bias-free torch Linear with no hooks (not a LoRA / 4-bit layer, whose forward differs)."""
    return (type(m) is nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks
            and m.weight.is_floating_point())


def _is_rms_norm(m) -> bool:
    return (isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", None), float) and not m._forward_hooks)


def _is_swiglu(m) -> bool:
    return all(_plain_linear(getattr(m, name, None)) for name in ("gate_proj", "up_proj", "down_proj")) \
        and hasattr(m, "act_fn") and not m._forward_hooks


def _same_outputs(module, lean_forward, width: int) -> bool:
    """The lean forward equals the module's own on a random fp32 probe (no autocast): the same function."""
    weight = next(module.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, width, generator=gen).to(weight.device)
    ref_module = module
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        if weight.dtype != torch.float32:  # compare the functions, not the storage dtype's rounding
            ref_module = copy.deepcopy(module).float()
        expected = ref_module(x)
        got = lean_forward(ref_module, x)
    return expected.shape == got.shape and bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5))


def _has_zero(weight: torch.Tensor) -> bool:
    """Checked once at swap time (one host sync), not per forward. The weights are then the loaded checkpoint's; a
    trained norm weight reaching exactly 0.0 later would need an update landing on it exactly (not re-checked)."""
    return bool((weight.detach() == 0).any())


# Families whose decoder layers only feed these norms' outputs to linear projections (pre-norm), which autocast
# casts them for anyway: there the norm hands out the cast copy. (In e.g. OLMo-2 post_attention_layernorm
# normalises the attention's output into the residual stream, which stays fp32: no cast there.)
_PRE_NORM_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
_PRE_NORMS = {"input_layernorm", "post_attention_layernorm"}


def make_layers_lean(model: nn.Module) -> int:
    """Swap the forward of every RMSNorm and SwiGLU MLP inside the model's decoder layers for the lean one,
    per module class once its probe agrees; returns how many modules were swapped (0 = not a Llama shape)."""
    verdict: dict[tuple[type, str], bool] = {}
    swapped = 0
    pre_norm = getattr(getattr(model, "config", None), "model_type", None) in _PRE_NORM_FAMILIES
    for name, module in model.named_modules():
        if ".layers." not in f".{name}." or "forward" in module.__dict__:
            continue
        if _is_rms_norm(module):
            kind, lean, width = "norm", lean_rms_norm_forward, module.weight.shape[0]
        elif _is_swiglu(module):
            kind, lean, width = "mlp", lean_swiglu_forward, module.gate_proj.in_features
        else:
            continue
        key = (type(module), kind)
        if key not in verdict:
            verdict[key] = _same_outputs(module, lean, width)
        if verdict[key]:
            module.forward = types.MethodType(lean, module)
            if kind == "norm":
                module._adgen_feeds_projections = pre_norm and name.rsplit(".", 1)[-1] in _PRE_NORMS
                module._adgen_weight_has_zero = _has_zero(module.weight)
            swapped += 1
    return swapped
