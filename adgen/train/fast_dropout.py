"""The adapters' input dropout on CPU from a quarter of the random draws.

PyTorch's CPU dropout draws one Bernoulli sample per element from its mt19937 generator (`bernoulli_`): on
SmolLM2's LoRA recipe (q_proj + v_proj, dropout 0.05) that was 60 draws of 1408 x 576 per step, ~14 ms each on 2
cores: 17% of the forward, more than every attention kernel of the step's forward together. Here each 64-bit draw of
the same generator gives four independent uniform 16-bit integers, one per element, and an element is dropped when
its integer falls in the lowest round(p * 65536) of the 65536 values (p = 0.05 -> P(drop) = 0.050003). Kept
elements are scaled by 1 / (1 - p), as `nn.Dropout` does: the same distribution of outputs; forward + backward of
one such tensor 12.2 -> 5.2 ms (best of 25; docs/BENCHMARK_NOTES.md section 8). Hand-written because no library offers a faster CPU
dropout; seeded by torch's generator, so a run is reproducible from its seed as before (not bit-identical to
`nn.Dropout`'s masks).

Used only for CPU tensors in training mode; elsewhere (CUDA's dropout is fast; eval mode; p = 0 or 1) it is
`nn.Dropout` itself.
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """An int16 tensor of `shape`: 0 (drop) with probability round(p * 65536) / 65536, else 1, independently per
    element. int16 because comparing into an int16 result is the cheapest of the CPU's options (bool was ~3x slower)."""
    n = shape.numel()
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-(1 << 63), None)  # all 64 bits
    uniform16 = words.view(torch.int16)[:n].view(shape)  # each uniform on [-32768, 32767]
    return uniform16.clone().ge_(round(p * _LEVELS) - _LEVELS // 2)


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training-mode mask comes from `keep_mask` (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        # autograd keeps only the int16 mask (the product's other factor needs no gradient)
        return x.mul(keep_mask(x.shape, self.p, x.device)).mul_(1.0 / (1.0 - self.p))


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every plain `nn.Dropout` in the model's LoRA layers (PEFT's `lora_dropout`) for a `FastDropout` of the
    same p and mode; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        holder = getattr(module, "lora_dropout", None)
        if not isinstance(holder, nn.ModuleDict):
            continue
        for name, dropout in list(holder.items()):
            if type(dropout) is nn.Dropout and not dropout.inplace:
                fast = FastDropout(dropout.p)
                fast.train(dropout.training)
                holder[name] = fast
                swapped += 1
    return swapped
