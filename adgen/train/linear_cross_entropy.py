"""LM head + cross-entropy in one pass over chunks of positions, without keeping any logits.

The plain way keeps, per optimizer step, the logits of every target position (positions x vocabulary, in
the compute dtype), their fp32 copy and the softmax that cross-entropy saves for backward: on SmolLM2
(49k vocabulary) ~2,000 target positions are ~1 GB, the largest tensors of the step, and each is a fresh
mmap the kernel must zero (glibc maps blocks over 32 MiB anew every time). Here the forward walks the
positions in chunks of at most `CHUNK_BYTES` of logits, computes each chunk's loss and, when a gradient is
wanted, at once the gradient of the loss with respect to the chunk's hidden states (softmax - one-hot,
times the head's weight) and to the head's weight if it is trained; backward only scales what was kept.
Peak memory for the head drops to one chunk; no logits are recomputed.

Hand-written because the libraries that do this (Liger-Kernel's fused linear cross-entropy, Apple's
cut-cross-entropy) are Triton kernels for GPUs; this is plain PyTorch and runs wherever the model does.
Its equality with logits -> `F.cross_entropy` (loss and gradients) is tested in tests/test_train.py.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 96 * 1024 * 1024  # logits per chunk: SmolLM2's ~900 target rows in one chunk in bf16, in two in fp32
GRAD_ROWS = 256  # rows per matmul of the gradient (softmax - one-hot) @ weight, a product over the whole vocabulary

# Measured on SmolLM2's head (49k x 576, bf16, 2 cores; BENCHMARKS.md 8): the logits' matmul of ~900 rows took
# 88 ms in one call and 194 ms in chunks of 114 rows (oneDNN repacks the 56 MB weight per call); the gradient's
# matmul, whose reduction runs over the vocabulary, was fastest in blocks of 228-304 rows (133 ms; 206 ms in one
# call). The logits go into one reused buffer: a fresh 90 MB tensor a step is a fresh mmap the kernel zeroes.
_logits_buffers: dict[tuple, torch.Tensor] = {}


def _chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (max(vocab, 1) * dtype.itemsize))


def _equal_blocks(n: int, most: int) -> list[tuple[int, int]]:
    """[0, n) as near-equal blocks of at most `most`: a block of a few leftover rows costs nearly a full matmul."""
    size = -(-n // -(-n // max(most, 1)))
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _logits_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (device, dtype)
    buf = _logits_buffers.get(key)
    if buf is None or buf.numel() < rows * vocab:
        _logits_buffers.pop(key, None)  # free the smaller buffer before the larger one is allocated
        buf = _logits_buffers[key] = torch.empty(rows * vocab, dtype=dtype, device=device)
    return buf[: rows * vocab].view(rows, vocab)


def release_buffers() -> None:
    """Drop the reused logits buffer (the run is over)."""
    _logits_buffers.clear()


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, want_hidden_grad, want_weight_grad):
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        n = hidden.shape[0]
        on_cpu = hidden.device.type == "cpu"
        for start, stop in _equal_blocks(n, _chunk_rows(weight.shape[0], compute_dtype)):
            h = hidden[start:stop].to(compute_dtype)
            t = targets[start:stop]
            if on_cpu:  # softmax in place in the reused buffer (CPU's kernel reads a row before it writes it)
                logits = torch.mm(h, w.T, out=_logits_buffer(h.shape[0], w.shape[0], compute_dtype, h.device))
                probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
            else:
                probs = torch.softmax(h @ w.T, dim=-1)
            # softmax in the compute dtype (fp32 inside the kernel): one pass where fp32 log-sum-exp took seven,
            # two of them dtype copies; the loss is -log p(target), its bf16 rounding 2^-9 relative to p
            rows_t = torch.arange(t.shape[0], device=t.device)
            picked = probs[rows_t, t]
            # out of place: `picked` itself is needed for the gradient below (in fp32, .float() returns it as is)
            total -= picked.float().clamp_min(torch.finfo(torch.float32).tiny).log_().sum()
            if grad_hidden is None and grad_weight is None:
                continue
            probs[rows_t, t] = picked - 1  # d(loss) / d(logits) = softmax - one-hot
            if grad_hidden is not None:
                for lo, hi in _equal_blocks(probs.shape[0], GRAD_ROWS):
                    grad_hidden[start + lo : start + hi] = (probs[lo:hi] @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (probs.T @ h).float()
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
    else in hidden's dtype (the softmax too, fp32 inside its kernel); the loss summed in fp32."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden.dtype
    grad_on = torch.is_grad_enabled()  # ctx.needs_input_grad stays True under no_grad: evaluation would pay for grads
    return _LinearCrossEntropySum.apply(hidden, weight, targets, dtype, grad_on and hidden.requires_grad,
                                        grad_on and weight.requires_grad)
