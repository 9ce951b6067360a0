"""The kernel choices inside a LoRA training step on CPU, each against its alternative, in one process.

    python bench/step_kernels.py        # ~10 s here; last line: attention_bwd_fp32_vs_bf16=X swiglu_bwd_speedup=Y

Shapes: one packed row of the train bench (`bench/train_throughput.py --quick`), SmolLM2-135M (9 query heads and
3 K/V heads of 64, MLP width 1536): a causal first example of 416 tokens, then three examples of 384 / 352 / 320
tokens continuing a 169-token shared prompt prefix (additive mask); 1,408 tokens for the MLP.

1. Attention backward (`adgen/train/packed_attention.py`): PyTorch's CPU flash-attention backward kernel run in
   bf16 (the forward's dtype) vs in fp32 from the bf16 forward's inputs cast up (what adgen does). The
   query heads sharing a K/V head sit in the batch dimension, K/V read through a stride-0 view, as adgen runs it.
2. SwiGLU backward elementwise work (`adgen/train/lean_layers.py`): the gradient of silu(gate) * up written in
   fp32 (the first lean version) vs aten's own `silu_backward` and two multiplies in the compute dtype (what
   autograd runs for transformers' module, bit-identical to it).

Medians of 15 timed calls after 2 warm-ups; both sides of each pair in the same process, interleaved.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from machine import cpu_flags, cpu_kind

HEADS, KV_HEADS, HEAD_DIM, PREFIX = 9, 3, 64, 169
SEGMENTS = [(416, 0), (384, PREFIX), (352, PREFIX), (320, PREFIX)]  # (query tokens, prefix they continue)


def timed_pair(a, b, repeats: int = 15) -> tuple[float, float]:
    """Median ms of a and of b, called alternately (a slow spell of the host hits both)."""
    for _ in range(2):
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for f, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            f()
            out.append(1e3 * (time.perf_counter() - t))
    return statistics.median(ta), statistics.median(tb)


def attention_backward() -> tuple[float, float]:
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    groups = HEADS // KV_HEADS
    total_bf16 = total_fp32 = 0.0
    for m, context in SEGMENTS:
        keys = context + m
        q = torch.randn(groups, KV_HEADS, m, HEAD_DIM).bfloat16()
        k, v = (torch.randn(1, KV_HEADS, keys, HEAD_DIM).bfloat16().expand(groups, -1, -1, -1) for _ in range(2))
        mask = None
        if context:
            keep = torch.ones(m, keys, dtype=torch.bool)
            keep[:, context:] = torch.ones(m, m, dtype=torch.bool).tril()
            mask = torch.zeros(m, keys).masked_fill(~keep, float("-inf"))
        causal = not context
        mask_bf16 = None if mask is None else mask.bfloat16()
        out, lse = fwd(q, k, v, 0.0, causal, attn_mask=mask_bf16, scale=HEAD_DIM**-0.5)
        grad = torch.randn_like(out)

        def in_bf16():
            return bwd(grad, q, k, v, out, lse, 0.0, causal, attn_mask=mask_bf16, scale=HEAD_DIM**-0.5)

        def in_fp32():
            f = torch.float32
            return bwd(grad.to(f), q.to(f), k.to(f), v.to(f), out.to(f), lse, 0.0, causal, attn_mask=mask,
                       scale=HEAD_DIM**-0.5)

        ms_bf16, ms_fp32 = timed_pair(in_bf16, in_fp32)
        total_bf16, total_fp32 = total_bf16 + ms_bf16, total_fp32 + ms_fp32
        print(f"  attention backward, {m} queries + {context} prefix: bf16 kernel {ms_bf16:6.2f} ms, "
              f"fp32 kernel (inputs cast) {ms_fp32:6.2f} ms", flush=True)
    print(f"  one row (4 segments), one layer: bf16 {total_bf16:.1f} ms, fp32 {total_fp32:.1f} ms")
    return total_bf16, total_fp32


def swiglu_backward() -> tuple[float, float, bool]:
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(1, 1408, 1536, generator=gen).bfloat16() for _ in range(2))
    grad_hidden = (torch.randn(1, 1408, 1536, generator=gen) * 0.01).bfloat16()

    def fp32_formula():
        gh, g = grad_hidden.float(), gate.float()
        sig = torch.sigmoid(g)
        return (gh * g * sig).bfloat16(), (gh * up.float() * sig * (1 + g * (1 - sig))).bfloat16()

    def aten_ops():
        return grad_hidden * F.silu(gate), torch.ops.aten.silu_backward(grad_hidden * up, gate)

    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    (F.silu(g) * u).backward(grad_hidden)
    same = all(torch.equal(a, b) for a, b in zip(aten_ops(), (u.grad, g.grad)))
    ms_formula, ms_aten = timed_pair(fp32_formula, aten_ops)
    print(f"  SwiGLU backward elementwise, 1408 x 1536 bf16: fp32 formula {ms_formula:.2f} ms, aten ops "
          f"{ms_aten:.2f} ms (bit-identical to autograd's gradients: {same})")
    return ms_formula, ms_aten, same


def main() -> None:
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU flags: {cpu_flags()} -> {cpu_kind()}")
    if cpu_kind().startswith("fp32 only"):  # adgen trains in fp32 there: no bf16 kernel to weigh (and it crawls)
        raise SystemExit("no fast bf16 on this CPU: adgen runs these steps in fp32 throughout; nothing to compare")
    bf16, fp32 = attention_backward()
    formula, aten, _ = swiglu_backward()
    print(f"attention_bwd_fp32_vs_bf16={fp32 / bf16:.2f} swiglu_bwd_speedup={formula / aten:.2f}")


if __name__ == "__main__":
    main()
