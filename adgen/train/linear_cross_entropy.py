"""LM head + cross-entropy in one pass over chunks of positions, without keeping any logits.

The plain way keeps, per optimizer step, the logits of every target position (positions x vocabulary, in
the compute dtype), their fp32 copy and the softmax that cross-entropy saves for backward: on SmolLM2
(49k vocabulary) ~2,000 target positions are ~1 GB, the largest tensors of the step, and each is a fresh
mmap the kernel must zero (glibc maps blocks over 32 MiB anew every time). Here the forward walks the
positions in chunks of at most `CHUNK_ELEMENTS` logits, computes each chunk's loss and, when a gradient is
wanted, at once the gradient of the loss with respect to the chunk's hidden states (softmax - one-hot,
times the head's weight) and to the head's weight if it is trained; backward only scales what was kept.
Peak memory for the head drops to one chunk; no logits are recomputed.

Hand-written because the libraries that do this (Liger-Kernel's fused linear cross-entropy, Apple's
cut-cross-entropy) are Triton kernels for GPUs; this is plain PyTorch and runs wherever the model does.
Its equality with logits -> `F.cross_entropy` (loss and gradients) is tested in tests/test_train.py.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 6 * 1024 * 1024  # logits per chunk: 24 MiB in fp32, under glibc's largest mmap threshold


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, want_hidden_grad, want_weight_grad):
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        n = hidden.shape[0]
        chunks = -(-n // _chunk_rows(weight.shape[0]))
        rows = max(1, -(-n // max(chunks, 1)))  # equal chunks: a matmul of a few leftover rows costs nearly a full one
        for start in range(0, n, rows):
            h = hidden[start : start + rows].to(compute_dtype)
            t = targets[start : start + rows]
            logits = (h @ w.T).float()
            picked = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp and softmax in place, one pass each (torch.logsumexp allocates two chunk-sized temporaries)
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()
            sums = exps.sum(dim=-1, keepdim=True)
            lse = (top + sums.log()).squeeze(1)
            total += (lse - picked).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            probs = exps.div_(sums)
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # d(loss) / d(logits)
            g = probs.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = (g @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (g.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over N positions of cross_entropy(hidden @ weight.T, targets): hidden [N, H], weight [V, H], targets [N].

    Computes in the autocast dtype when autocast is on for hidden's device (as the head's matmul would),
    else in hidden's dtype; log-sum-exp and the loss always in fp32."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden.dtype
    grad_on = torch.is_grad_enabled()  # ctx.needs_input_grad stays True under no_grad: evaluation would pay for grads
    return _LinearCrossEntropySum.apply(hidden, weight, targets, dtype, grad_on and hidden.requires_grad,
                                        grad_on and weight.requires_grad)
