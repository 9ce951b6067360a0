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
Its equality with logits -> `F.cross_entropy` (loss and gradients) is tested in tests/test_train.py, its fp32
loss math under bf16 (on the CPU and the CUDA branch) in tests/test_gpu_paths_kernels.py.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 96 * 1024 * 1024  # logits per chunk: SmolLM2's ~900 target rows in one chunk in bf16, in two in fp32
GRAD_ROWS = 256  # rows per matmul of the gradient (softmax - one-hot) @ weight, a product over the whole vocabulary

# Measured on SmolLM2's head (49k x 576, bf16, 2 cores; docs/BENCHMARK_NOTES.md section 8): the logits' matmul of ~900 rows took
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
    """Drop the reused logits / fp32 softmax buffers (the run is over)."""
    _logits_buffers.clear()


# The loss and its gradient (softmax - one-hot) are computed in fp32 on every device, as F.cross_entropy does under
# autocast (and Liger-Kernel's kernel): in bf16, p(target) near 1 kept ~3 significant digits, so -log p and p - 1
# (the largest entry of the gradient) were off by up to 2^-9 absolute -- all of the signal of a well-predicted
# token. Only then is the gradient rounded to the compute dtype for its matmuls. Measured on CPU for one SmolLM2
# chunk (912 x 49152 bf16 logits, forward + hidden gradient, Xeon shared with other jobs, 9 interleaved runs; a
# one-off script): +40 to +95 ms over the bf16 in-place softmax, 1-2% of a ~5 s bench step: one path, fp32.
MATH_DTYPE = torch.float32
MATH_ROWS = 16  # CPU: rows per fp32 block (3 MB for a 49k vocabulary, cache-sized) instead of a chunk-sized fp32 copy


def _math_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp32, or the compute dtype where that is wider (fp64)."""
    return torch.promote_types(compute_dtype, MATH_DTYPE)


def _uses_cpu_buffers(device: torch.device) -> bool:
    """CPU: logits in a buffer reused across steps, softmax in place (a fresh large tensor is a fresh mmap the kernel
    zeroes). Elsewhere (CUDA) the caching allocator does that, and plain out-of-place ops are the safe choice."""
    return device.type == "cpu"


def _softmax_minus_one_hot(logits: torch.Tensor, targets: torch.Tensor, cpu_buffers: bool,
                           want_grad: bool, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The summed -log p(target) of a chunk's rows, in fp32 math; with `want_grad`, `logits` is overwritten by
    softmax - one-hot (rounded once to the logits' dtype). With `weights` [rows] (fp32), row i's loss and its
    softmax - one-hot are scaled by weights[i] (in the math dtype, before that rounding). On CPU in blocks of
    `MATH_ROWS` rows (the fp32 copy stays in cache); elsewhere the chunk at once (one kernel per op)."""
    math = _math_dtype(logits.dtype)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for lo, hi in _equal_blocks(logits.shape[0], MATH_ROWS if cpu_buffers else logits.shape[0]):
        block, t = logits[lo:hi], targets[lo:hi]
        if block.dtype == math and cpu_buffers:  # in place (CPU's kernel reads a row before it writes it)
            probs = torch.ops.aten._softmax.out(block, -1, False, out=block)
        elif cpu_buffers:  # CPU has no bf16 -> fp32 softmax kernel: copy into a reused fp32 block, softmax in place
            probs = _logits_buffer(hi - lo, block.shape[1], math, block.device).copy_(block)
            probs = torch.ops.aten._softmax.out(probs, -1, False, out=probs)
        else:
            probs = torch.softmax(block, -1, dtype=math)
        rows = torch.arange(t.shape[0], device=t.device)
        picked = probs[rows, t]
        log_p = picked.float().clamp_min(torch.finfo(torch.float32).tiny).log()
        if weights is None:
            total -= log_p.sum()
        else:
            total -= (log_p * weights[lo:hi]).sum()
        if want_grad:
            probs[rows, t] = picked - 1  # d(loss) / d(logits) = softmax - one-hot
            if weights is not None:  # d(w x loss) / d(logits) = w x (softmax - one-hot)
                probs.mul_(weights[lo:hi, None].to(probs.dtype))
            if probs.data_ptr() != block.data_ptr():
                block.copy_(probs)
    return total


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, compute_dtype, want_hidden_grad, want_weight_grad):
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight_grad else None
        want_grad = grad_hidden is not None or grad_weight is not None
        cpu_buffers = _uses_cpu_buffers(hidden.device)
        for start, stop in _equal_blocks(hidden.shape[0], _chunk_rows(weight.shape[0], compute_dtype)):
            h = hidden[start:stop].to(compute_dtype)
            if cpu_buffers:
                logits = torch.mm(h, w.T, out=_logits_buffer(h.shape[0], w.shape[0], compute_dtype, h.device))
            else:
                logits = h @ w.T
            chunk_weights = None if row_weights is None else row_weights[start:stop]
            total += _softmax_minus_one_hot(logits, targets[start:stop], cpu_buffers, want_grad, chunk_weights)
            if grad_hidden is not None:
                for lo, hi in _equal_blocks(logits.shape[0], GRAD_ROWS):
                    grad_hidden[start + lo : start + hi] = (logits[lo:hi] @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum over N positions of cross_entropy(hidden @ weight.T, targets): hidden [N, H], weight [V, H], targets [N];
    with `row_weights` [N] (fp32, no gradient), of row_weights[i] x the cross-entropy of position i.

    The matmuls run in the autocast dtype when autocast is on for hidden's device (as the head's would), else in
    hidden's dtype; the softmax, the loss and softmax - one-hot in fp32 (see MATH_DTYPE); the loss summed in fp32."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden.dtype
    grad_on = torch.is_grad_enabled()  # ctx.needs_input_grad stays True under no_grad: evaluation would pay for grads
    return _LinearCrossEntropySum.apply(hidden, weight, targets, row_weights, dtype,
                                        grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
