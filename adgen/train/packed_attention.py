"""Attention for packed rows that only computes the blocks that matter.

A packed row holds several examples back to back, with `position_ids` restarting for each one.
transformers' `sdpa` turns that into a block-diagonal 4D mask over the whole row, and the CPU kernel
then computes (and back-propagates) the full row x row score matrix: with 4 examples of ~500 tokens
that was 62% of a SmolLM2-135M LoRA step here, for scores that are masked away. This implementation
cuts the row wherever the positions restart and runs causal SDPA per example (no mask: the kernel skips
the upper triangle), which is what flash-attention's varlen kernels do on GPUs. A segment whose
positions restart at p > 0 continues a prompt prefix shared by the row's examples
(`collate.pack(share_prefix=True)`): it also attends to the row's first p tokens, so the common chat
header and system prompt are computed once per row instead of once per example.

Registered under `PACKED_ATTENTION` with transformers' `AttentionInterface` (and a mask function that
asks for no 4D mask when there is no padding). Anything that is not a whole packed row — a padding
mask, a KV cache during generation — goes to transformers' own `sdpa` path unchanged, so a model set
to this implementation still evaluates and generates correctly.

CPU only: on a GPU the per-row cut costs host syncs (`nonzero`, `.tolist()`) in every layer, one kernel launch
per example and repeated K/V heads, where transformers' own attention already isolates packed examples from
`position_ids` restarting at 0 with no attention mask (transformers >= 5: `masking_utils.find_packed_sequence_indices`
gives sdpa / eager a block-diagonal causal mask; flash_attention_2 runs its varlen kernel, on the `cu_seq_lens_*` /
`max_length_*` that `collate.pack` puts in `Batch.loss_kwargs`, else on ones it infers from the positions per
layer). `enable_packed_attention` leaves a model on any other device as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "adgen_packed_sdpa"

# Each example's attention runs on a length rounded up to this multiple. PyTorch's CPU flash-attention builds and
# keeps kernels for every new sequence length (bf16 backward: ~5 MB and ~9 ms each, per thread; torch 2.13), so with
# the exact lengths of a dataset's examples a run's memory grew ~45 MB a step and every new length ran at half
# speed. Rounded, a few dozen lengths cover every example (docs/BENCHMARK_NOTES.md section 8).
SEGMENT_MULTIPLE = 32


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """[(start, end, context), ...] per row.

    A segment starts wherever the position does not go up by one. `context` = the segment's first
    position when that is > 0 (a shared-prefix continuation: it also attends to the row's first
    `context` tokens, see `collate.pack(share_prefix=True)`), else 0. The first segment of a row
    never has context, and a restart at a position past the first segment's length gets none.
    """
    bounds = []
    for row in position_ids:
        starts = [0, *((row[1:] != row[:-1] + 1).nonzero().flatten() + 1).tolist()]
        ends = [*starts[1:], row.shape[0]]
        first = row[starts].tolist()
        head = ends[0]  # a continuation can only refer to (part of) the row's first segment
        bounds.append([(s, e, p if 0 < s and p <= head else 0) for s, e, p in zip(starts, ends, first)])
    return bounds


def _rounded_slice(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """x[..., start:start+length, :]: the row's following tokens where it has them, zeros past its end.

    The extra positions sit *after* the segment, so under a causal mask no real query sees them; their
    outputs are dropped, so their gradient is zero and nothing flows back into the tokens they borrowed."""
    end = start + length
    if end <= x.shape[-2]:
        return x[..., start:end, :]
    return F.pad(x[..., start:, :], (0, 0, 0, end - x.shape[-2]))


def _rounded(n: int) -> int:
    return -(-n // SEGMENT_MULTIPLE) * SEGMENT_MULTIPLE


def _segment_attention(q, k, v, s, e, context, groups, dropout, scaling):
    qs, ks, vs, mask = _segment_inputs(q, k, v, s, e, context, groups, torch.bool)
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=not context,
                                         scale=scaling)
    return out[..., : e - s, :]


_MASKS: dict = {}


def _continuation_mask(m: int, context: int, dtype, device) -> torch.Tensor:
    """The whole prefix, then causal over the segment's own m tokens: [m, context + m]; bool (True = attend) or
    additive (0 / -inf) in `dtype`. Kept per shape: rounded lengths make few, and every layer asks again."""
    key = (m, context, dtype, str(device))
    mask = _MASKS.get(key)
    if mask is None:
        keep = torch.ones(m, context + m, dtype=torch.bool, device=device)
        keep[:, context:] = torch.ones(m, m, dtype=torch.bool, device=device).tril()
        mask = keep
        if dtype != torch.bool:
            mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
        if len(_MASKS) > 256:
            _MASKS.clear()
        _MASKS[key] = mask
    return mask


def _cpu_flash_ops():
    ops = torch.ops.aten
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu") and \
            hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward
    return None


def _segment_inputs(q, k, v, s, e, context, groups, mask_dtype):
    """One segment's kernel inputs: its rounded rows (prefix first for a continuation), K/V heads repeated, and the
    continuation's mask in `mask_dtype` (bool for sdpa, additive in q's dtype for the CPU flash ops)."""
    m = _rounded(e - s)
    qs, ks, vs = (_rounded_slice(x, s, m) for x in (q, k, v))
    if context:
        ks = torch.cat([k[..., :context, :], ks], dim=-2)
        vs = torch.cat([v[..., :context, :], vs], dim=-2)
    if groups > 1:
        ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
    mask = _continuation_mask(m, context, mask_dtype, q.device) if context else None
    return qs, ks, vs, mask


def _groups_in_batch(x: torch.Tensor, groups: int) -> torch.Tensor:
    """A view of query-shaped [1, H, L, D] as [groups, H_kv, L, D], where [i, j] is query head j * groups + i: the
    heads that share K/V head j (grouped-query attention, paired as repeat_interleave pairs them) sit in the batch
    dimension, so the kernels read un-repeated K/V through a stride-0 batch view (`kv.expand(groups, ...)`).
    Writing into the view writes into x."""
    return x.unflatten(1, (-1, groups))[0].transpose(0, 1)


def _grouped_kernel_inputs(qs, ks, vs, groups: int):
    """A segment's q, k, v in the kernels' layout: `_groups_in_batch` queries, K/V as stride-0 batch views."""
    return _groups_in_batch(qs, groups), ks.expand(groups, -1, -1, -1), vs.expand(groups, -1, -1, -1)


class _PackedRowAttention(torch.autograd.Function):
    """Every segment of one packed row through PyTorch's CPU flash-attention kernels, forward and backward, in one
    autograd node. Through autograd per segment, each slice's backward wrote a zero-filled row-sized gradient
    and each K/V repeat and prefix copy was kept for backward; here the gradients go straight into one row-sized
    buffer each, and only q, the un-repeated k and v, the outputs and log-sum-exps are kept (docs/BENCHMARK_NOTES.md section 8).
    K/V heads are never repeated: the query heads sharing one sit in the batch dimension (`_groups_in_batch`), so
    a K/V gradient is a sum over that leading dimension instead of over repeated heads."""

    @staticmethod
    def forward(ctx, q, k, v, segments, scale):  # q [1, H, T, D]; k, v [1, H_kv, T, D]; one dtype
        fwd, _ = _cpu_flash_ops()
        groups = q.shape[1] // k.shape[1]
        out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device)
        kept = []
        for s, e, context in segments:
            qs, ks, vs, mask = _segment_inputs(q, k, v, s, e, context, 1, q.dtype)
            o, lse = fwd(*_grouped_kernel_inputs(qs, ks, vs, groups), 0.0, not context, attn_mask=mask, scale=scale)
            _groups_in_batch(out[:, s:e].transpose(1, 2), groups).copy_(o[..., : e - s, :])
            kept += [o, lse]
        ctx.segments, ctx.scale, ctx.groups = segments, scale, groups
        ctx.save_for_backward(q, k, v, *kept)
        return out  # [1, T, H, D], as transformers expects

    @staticmethod
    def backward(ctx, grad_out):
        _, bwd = _cpu_flash_ops()
        q, k, v, *kept = ctx.saved_tensors
        groups = ctx.groups
        # The backward kernel runs in fp32 even after a bf16 forward: PyTorch's CPU flash backward is ~20% faster
        # in fp32 than in bf16 on these shapes (the inputs are small to cast; docs/BENCHMARK_NOTES.md section 8), and exacter.
        work = torch.float32
        dtype, (q, k, v) = q.dtype, (x.to(work) for x in (q, k, v))  # cast once per row, not per segment
        # The segments tile the row in order and a continuation's prefix lies in the first segment, so every
        # gradient row is written once (its own segment) before any prefix sum adds to it: no zero-filled buffers.
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        g = grad_out.transpose(1, 2)  # [1, H, T, D]
        for i, (s, e, context) in enumerate(ctx.segments):
            n = e - s
            qs, ks, vs, mask = _segment_inputs(q, k, v, s, e, context, 1, work)
            o, lse = kept[2 * i], kept[2 * i + 1]
            go = torch.empty_like(o, dtype=work)
            go[..., :n, :] = _groups_in_batch(g[..., s:e, :], groups)
            go[..., n:, :] = 0  # the borrowed rows' outputs were dropped: no gradient reaches them
            gq, gk, gv = bwd(go, *_grouped_kernel_inputs(qs, ks, vs, groups), o.to(work), lse, 0.0, not context,
                             attn_mask=mask, scale=ctx.scale)
            _groups_in_batch(grad_q[..., s:e, :], groups).copy_(gq[..., :n, :])
            own = slice(context, context + n)  # keys after the segment's own n are only seen by borrowed rows
            for grad, part in ((grad_k, gk), (grad_v, gv)):
                _sum_heads(part[..., own, :], out=grad[..., s:e, :])
                if context:
                    _sum_heads(part[..., :context, :], add_to=grad[..., :context, :])
        return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), None, None


def _sum_heads(x: torch.Tensor, out: torch.Tensor | None = None, add_to: torch.Tensor | None = None) -> None:
    """The sum over x's leading dimension (the query heads sharing a K/V head) written into `out` or added to
    `add_to`, one slice at a time: 4x faster than `x.sum(0)` on the kernels' [groups, K, H, D]-strided gradients."""
    if out is not None:
        if x.shape[0] == 1:
            out.copy_(x)
            return
        torch.add(x[0:1], x[1:2], out=out)
        rest, add_to = x[2:], out
    else:
        rest = x
    for j in range(rest.shape[0]):
        add_to.add_(rest[j : j + 1])


def _row_attention(q, k, v, segments, dropout, scaling):
    """[1, T, H, D]: through the one-node CPU path where it applies, else per segment through autograd."""
    if q.device.type == "cpu" and not dropout and _cpu_flash_ops() is not None and scaling is not None:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        if dtype in (torch.float32, torch.bfloat16):
            with torch.autocast("cpu", enabled=False):
                return _PackedRowAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), segments, scaling)
    groups = q.shape[1] // k.shape[1]  # grouped-query attention: one K/V head serves `groups` query heads
    parts = [_segment_attention(q, k, v, s, e, ctx, groups, dropout, scaling) for s, e, ctx in segments]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2)


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, heads, T, D]
    key: torch.Tensor,  # [B, kv_heads, S, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    position_ids = kwargs.get("position_ids")
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or position_ids is None or q_len != kv_len or q_len <= 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is None and 1 < q_len < kv_len:
            # several new tokens after a cache, and `_packed_mask` asked for no mask: the new tokens see every
            # cached key, then causally each other (sdpa's is_causal alone would align them top-left)
            offset = kv_len - q_len
            keys = torch.arange(kv_len, device=query.device)
            attention_mask = (keys[None] <= torch.arange(offset, kv_len, device=query.device)[:, None])[None, None]

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    position_ids = position_ids.view(-1, q_len).expand(query.shape[0], q_len)  # (1, T) when the model made them
    rows = [_row_attention(query[b : b + 1], key[b : b + 1], value[b : b + 1], segments, dropout, scaling)
            for b, segments in enumerate(segment_bounds(position_ids))]
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.contiguous(), None  # [B, T, heads, D], as transformers expects


def _packed_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """No 4D mask when nothing is padded (the attention cuts the row itself); sdpa's mask otherwise."""
    if attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all())):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> str:
    """Make `PACKED_ATTENTION` a valid `attn_implementation`; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    return PACKED_ATTENTION


def _rows_are_isolated(model) -> bool:
    """A packed probe row must reproduce one sequence's logits: [seq | seq's tail after a shared 3-token
    prefix | seq again from position 0]. Catches attentions that never see the position ids."""
    seq = torch.arange(5, 12, device=model.device)
    n, cut = len(seq), 3
    input_ids = torch.cat([seq, seq[cut:], seq]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n), torch.arange(cut, n), torch.arange(n)]).unsqueeze(0).to(model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()[0]
    finally:
        model.train(was_training)
    alone, tail, again = logits[:n], logits[n : 2 * n - cut], logits[2 * n - cut :]
    tol = 1e-2 * (1 + alone.abs().max().item())
    return bool(torch.allclose(tail, alone[cut:], atol=tol, rtol=0) and torch.allclose(again, alone, atol=tol, rtol=0))


def packed_attention_applies(device: torch.device) -> bool:
    """This attention pays off on CPU only (its kernels are PyTorch's CPU flash ones; see the module docstring)."""
    return torch.device(device).type == "cpu"


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)  # transformers models: their first parameter's device
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def enable_packed_attention(model) -> bool:
    """Switch a transformers model on CPU to per-example attention for packed rows, if it is provably correct.

    A model on a GPU keeps its own attention (False): transformers' sdpa / flash_attention_2 isolate packed
    examples themselves. Models whose attention does not receive `position_ids` (some remote-code ones) would let
    packed examples see each other; a two-copy probe catches that, and the model keeps its own attention.
    """
    if not packed_attention_applies(_model_device(model)):
        return False
    previous = getattr(model.config, "_attn_implementation", None)
    if previous not in (None, "sdpa", "eager"):
        return False  # flash-attention & co. already handle packed rows
    try:
        model.set_attn_implementation(register_packed_attention())
    except (ValueError, TypeError, AttributeError):
        return False
    if getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION and _rows_are_isolated(model):
        return True
    model.set_attn_implementation(previous or "sdpa")
    return False
