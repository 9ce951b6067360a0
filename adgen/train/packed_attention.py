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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "adgen_packed_sdpa"

# Each example's attention runs on a length rounded up to this multiple. PyTorch's CPU flash-attention builds and
# keeps kernels for every new sequence length (bf16 backward: ~5 MB and ~9 ms each, per thread; torch 2.13), so with
# the exact lengths of a dataset's examples a run's memory grew ~45 MB a step and every new length ran at half
# speed. Rounded, a few dozen lengths cover every example (BENCHMARKS.md section 8).
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


def _segment_attention(q, k, v, s, e, context, dropout, scaling):
    n = e - s
    m = -(-n // SEGMENT_MULTIPLE) * SEGMENT_MULTIPLE
    qs, ks, vs = (_rounded_slice(x, s, m) for x in (q, k, v))
    if not context:
        out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling)
        return out[..., :n, :]
    keys = torch.cat([k[..., :context, :], ks], dim=-2)
    values = torch.cat([v[..., :context, :], vs], dim=-2)
    # the whole prefix, then causal over the segment's own tokens
    mask = torch.ones(m, context + m, dtype=torch.bool, device=q.device)
    mask[:, context:] = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out[..., :n, :]


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

    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: one K/V head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    rows = []
    position_ids = position_ids.view(-1, q_len).expand(query.shape[0], q_len)  # (1, T) when the model made them
    for b, segments in enumerate(segment_bounds(position_ids)):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        parts = [_segment_attention(q, k, v, s, e, ctx, dropout, scaling) for s, e, ctx in segments]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None  # [B, T, heads, D], as transformers expects


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


def enable_packed_attention(model) -> bool:
    """Switch a transformers model to per-example attention for packed rows, if it is provably correct.

    Models whose attention does not receive `position_ids` (some remote-code ones) would let packed
    examples see each other; a two-copy probe catches that, and the model keeps its own attention.
    """
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
