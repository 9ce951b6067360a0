"""Per-example attention for packed rows: same numbers as running each example alone."""

import pytest
import torch
from train_helpers import assert_within, gamma_prob, logits_bound
from transformers import AutoModelForCausalLM

from adgen.train import packed_attention
from adgen.train.packed_attention import PACKED_ATTENTION, enable_packed_attention, segment_bounds


@pytest.fixture()
def tiny_model(tiny_llama3_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32).eval()


def _logits(model, **inputs):
    """(logits, bound): how far another fp32 route to the same logits may put them (tests/train_helpers.py)."""
    out = model(**inputs, output_hidden_states=True)
    return out.logits, logits_bound(model, out.hidden_states[-1], inputs["input_ids"].shape[1])


def test_segment_bounds_cut_at_every_position_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 2, 3, 0, 1, 2]])
    assert segment_bounds(pos) == [
        [(0, 3, 0), (3, 5, 0), (5, 9, 0)],
        [(0, 2, 0), (2, 9, 0)],
        [(0, 4, 0), (4, 6, 2), (6, 9, 0)],  # positions 2, 3 continue the row's first 2 tokens
    ]
    # a jump past the first segment's length is a new sequence, not a continuation of it
    assert segment_bounds(torch.tensor([[0, 1, 5, 6, 0, 1]])) == [[(0, 2, 0), (2, 4, 0), (4, 6, 0)]]


def test_packed_row_equals_each_example_alone(tiny_model):
    a = torch.tensor([11, 12, 13, 14, 15])
    b = torch.tensor([21, 22, 23])
    c = torch.tensor([31, 32, 33, 34, 35, 36, 37])
    with torch.no_grad():
        alone = [tiny_model(input_ids=x.unsqueeze(0)).logits[0] for x in (a, b, c)]
        assert enable_packed_attention(tiny_model)
        assert tiny_model.config._attn_implementation == PACKED_ATTENTION
        row = torch.cat([a, b, c]).unsqueeze(0)
        pos = torch.cat([torch.arange(len(x)) for x in (a, b, c)]).unsqueeze(0)
        packed, bound = _logits(tiny_model, input_ids=row, position_ids=pos)
    assert_within(packed[0], torch.cat(alone), bound[0], "logits")


def test_padded_batches_and_generation_still_use_the_mask(tiny_model):
    prompts = torch.tensor([[0, 0, 41, 42, 43], [51, 52, 53, 54, 55]])  # left padding in row 0
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kwargs = dict(input_ids=prompts, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = tiny_model.generate(**kwargs)
        assert enable_packed_attention(tiny_model)
        assert torch.equal(tiny_model.generate(**kwargs), reference)


def test_new_tokens_after_a_cache_see_the_whole_cache(tiny_model):
    """A prefill in two parts (3 tokens cached, then 4 at once, no mask) equals one 7-token forward."""
    from transformers import DynamicCache

    from adgen.generation.engine import _cache_kwarg

    ids = torch.tensor([[41, 42, 43, 44, 45, 46, 47]])
    name = _cache_kwarg(tiny_model)  # `cache` in transformers 5.x, `past_key_values` before
    with torch.no_grad():
        assert enable_packed_attention(tiny_model)
        whole = tiny_model(input_ids=ids).logits[0, 3:]
        cache = DynamicCache()
        tiny_model(input_ids=ids[:, :3], use_cache=True, **{name: cache})
        rest, bound = _logits(tiny_model, input_ids=ids[:, 3:], position_ids=torch.arange(3, 7)[None], use_cache=True,
                              **{name: cache})
    assert_within(rest[0], whole, bound[0], "logits")


def test_shared_prefix_rows_equal_each_example_alone(tiny_model):
    prefix = torch.tensor([1, 2, 3, 4])
    a = torch.cat([prefix, torch.tensor([11, 12, 13])])
    b = torch.cat([prefix, torch.tensor([21, 22, 23, 24, 25])])
    with torch.no_grad():
        alone = [tiny_model(input_ids=x.unsqueeze(0)).logits[0] for x in (a, b)]
        assert enable_packed_attention(tiny_model)
        row = torch.cat([prefix, a[4:], b[4:]]).unsqueeze(0)
        pos = torch.cat([torch.arange(4), torch.arange(4, len(a)), torch.arange(4, len(b))]).unsqueeze(0)
        packed, bound = _logits(tiny_model, input_ids=row, position_ids=pos)
    packed, bound = packed[0], bound[0]
    assert_within(packed[:4], alone[0][:4], bound[:4], "prefix")
    assert_within(packed[4:7], alone[0][4:], bound[4:7], "first example")
    assert_within(packed[7:], alone[1][4:], bound[7:], "second example")


def test_unpadded_batches_of_several_rows(tiny_model):
    ids = torch.randint(0, 1000, (3, 9))
    with torch.no_grad():
        reference, bound = _logits(tiny_model, input_ids=ids, attention_mask=torch.ones_like(ids))
        assert enable_packed_attention(tiny_model)
        assert_within(tiny_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, reference, bound, "mask")
        assert_within(tiny_model(input_ids=ids).logits, reference, bound, "no mask")


def test_a_model_that_would_leak_between_examples_keeps_its_attention(tiny_model, monkeypatch):
    # simulate an attention that never sees the restarts: one segment per row
    monkeypatch.setattr(packed_attention, "segment_bounds", lambda pos: [[(0, pos.shape[1], 0)]] * pos.shape[0])
    assert not enable_packed_attention(tiny_model)
    assert tiny_model.config._attn_implementation == "sdpa"


def test_each_example_runs_at_a_rounded_length(tiny_model, monkeypatch):
    """Few distinct kernel shapes (PyTorch keeps kernels per sequence length), same numbers as exact lengths."""
    import torch.nn.functional as F

    prefix = torch.tensor([1, 2, 3, 4])
    a = torch.cat([prefix, torch.arange(11, 48)])  # 41 tokens: its attention borrows the next example's tokens
    b = torch.cat([prefix, torch.arange(51, 56)])  # last in the row: zero-padded to 32
    row = torch.cat([prefix, a[4:], b[4:]]).unsqueeze(0)
    pos = torch.cat([torch.arange(len(a)), torch.arange(4, len(b))]).unsqueeze(0)
    lengths = []
    real_sdpa, (real_fwd, real_bwd) = F.scaled_dot_product_attention, packed_attention._cpu_flash_ops()

    def recording_sdpa(q, k, v, **kw):  # the per-segment path (GPUs, dropout)
        lengths.append(q.shape[-2])
        return real_sdpa(q, k, v, **kw)

    def recording_fwd(q, *args, **kw):  # the one-node CPU path
        lengths.append(q.shape[-2])
        return real_fwd(q, *args, **kw)

    with torch.no_grad():
        alone = [tiny_model(input_ids=x.unsqueeze(0)).logits[0] for x in (a, b)]
        assert enable_packed_attention(tiny_model)
        monkeypatch.setattr(packed_attention.F, "scaled_dot_product_attention", recording_sdpa)
        monkeypatch.setattr(packed_attention, "_cpu_flash_ops", lambda: (recording_fwd, real_bwd))
        packed, bound = _logits(tiny_model, input_ids=row, position_ids=pos)
    assert lengths and all(n % packed_attention.SEGMENT_MULTIPLE == 0 for n in lengths)
    assert set(lengths) == {64, 32}
    packed, bound = packed[0], bound[0]
    assert_within(packed[: len(a)], alone[0], bound[: len(a)], "first example")
    assert_within(packed[len(a):], alone[1][4:], bound[len(a):], "second example")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_node_cpu_attention_gives_the_per_segment_gradients(dtype, monkeypatch):
    """The CPU path that runs a whole row's segments in one autograd node (gradients written straight into one
    buffer, K/V repeated inside) equals the same segments through autograd one by one: outputs and the gradients
    of q, k and v, with a shared prefix, grouped-query heads, a borrowed tail and a zero-padded last segment."""
    gen = torch.Generator().manual_seed(0)
    lengths, prefix = [45, 20, 37], 9  # a causal first example, then two continuing its first 9 tokens
    pos = torch.cat([torch.arange(lengths[0]), *(torch.arange(prefix, prefix + n) for n in lengths[1:])]).unsqueeze(0)
    T = int(pos.shape[1])
    q0 = torch.randn(1, 8, T, 16, generator=gen)
    k0, v0 = torch.randn(1, 2, T, 16, generator=gen), torch.randn(1, 2, T, 16, generator=gen)
    g = torch.randn(1, T, 8, 16, generator=gen)
    segments = segment_bounds(pos)[0]
    assert [c for _, _, c in segments] == [0, prefix, prefix]

    def run(one_node: bool, dtype=dtype):
        if not one_node:
            monkeypatch.setattr(packed_attention, "_cpu_flash_ops", lambda: None)
        q, k, v = (x.clone().to(dtype).requires_grad_() for x in (q0, k0, v0))
        out = packed_attention._row_attention(q, k, v, segments, 0.0, 0.25)
        out.backward(g.to(dtype))
        monkeypatch.undo()
        return [out.float(), *(x.grad.float() for x in (q, k, v))]

    if dtype == torch.float32:  # both paths within fp32 rounding of an fp64 reference
        exact, bounds = _dense_attention(q0, k0, v0, g, segments, 0.25)
        for one_node in (True, False):
            for got, ref, bound, what in zip(run(one_node), exact, bounds, ["output", "dq", "dk", "dv"]):
                assert_within(got, ref, bound, f"{what}, one node: {one_node}")
        return
    # bf16: the one-node backward runs its kernel in fp32, so both bf16 paths are held against the fp32 result;
    # the one-node path must be as close to it as the per-segment bf16 autograd path, and close in absolute terms.
    exact = run(False, torch.float32)
    for one, per_segment, ref, what in zip(run(True), run(False), exact, ["output", "dq", "dk", "dv"]):
        err_one, err_seg = ((one - ref).norm() / ref.norm()).item(), ((per_segment - ref).norm() / ref.norm()).item()
        assert err_one <= 1e-2 and err_one <= 1.1 * err_seg, (what, err_one, err_seg)


def _dense_attention(q, k, v, g, segments, scale):
    """The row's attention in fp64 over a dense mask built from the segments (causal within each, plus the row's
    first `context` keys for a continuation): [output [1, T, H, D], dq, dk, dv], and for each a bound on an fp32
    computation's error: the sums of the absolute values of its terms (the same formulas on |.|, P >= 0) times
    gamma of the chain of sums (scores over D, softmax and output over the keys, dP and its row dot over D, dq / dk
    over the keys, dk / dv over the query heads sharing a K/V head), plus the scores' errors in P (relative error
    <= 2 max |score error|)."""
    T, (heads, kv_heads, dim) = q.shape[2], (q.shape[1], k.shape[1], q.shape[3])
    groups = heads // kv_heads
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for s, e, context in segments:
        allowed[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        allowed[s:e, :context] = True
    q, k, v = q.double(), k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    go = g.double().transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
    out, out_abs = probs @ v, probs @ v.abs()
    dp, dp_abs = go @ v.transpose(-1, -2), go.abs() @ v.abs().transpose(-1, -2)
    row, row_abs = (go * out).sum(-1, keepdim=True), (go.abs() * out_abs).sum(-1, keepdim=True)
    ds, ds_abs = probs * (dp - row), probs * (dp_abs + row_abs)
    pt, ds_t, ds_abs_t = probs.transpose(-1, -2), ds.transpose(-1, -2), ds_abs.transpose(-1, -2)

    def per_kv_head(x):  # the query heads sharing a K/V head sum into it (repeat_interleave's order)
        return x.unflatten(1, (kv_heads, groups)).sum(2)

    exact = [out.transpose(1, 2), ds @ k * scale, per_kv_head(ds_t @ q * scale), per_kv_head(pt @ go)]
    terms = [out_abs.transpose(1, 2), ds_abs @ k.abs() * scale, per_kv_head(ds_abs_t @ q.abs() * scale),
             per_kv_head(pt @ go.abs())]
    score_err = gamma_prob(dim) * (q.abs() @ k.abs().transpose(-1, -2) * scale).masked_fill(~allowed, 0)
    rel = gamma_prob(3 * dim + 2 * T + groups) + 2 * float(score_err.amax())
    return exact, [rel * t for t in terms]
