"""Per-example attention for packed rows: same numbers as running each example alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from adgen.train import packed_attention
from adgen.train.packed_attention import PACKED_ATTENTION, enable_packed_attention, segment_bounds


@pytest.fixture()
def tiny_model(tiny_llama3_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32).eval()


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
        packed = tiny_model(input_ids=row, position_ids=pos).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-4)


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
        rest = tiny_model(input_ids=ids[:, 3:], position_ids=torch.arange(3, 7)[None], use_cache=True,
                          **{name: cache}).logits[0]
    assert torch.allclose(rest, whole, atol=1e-5)


def test_shared_prefix_rows_equal_each_example_alone(tiny_model):
    prefix = torch.tensor([1, 2, 3, 4])
    a = torch.cat([prefix, torch.tensor([11, 12, 13])])
    b = torch.cat([prefix, torch.tensor([21, 22, 23, 24, 25])])
    with torch.no_grad():
        alone = [tiny_model(input_ids=x.unsqueeze(0)).logits[0] for x in (a, b)]
        assert enable_packed_attention(tiny_model)
        row = torch.cat([prefix, a[4:], b[4:]]).unsqueeze(0)
        pos = torch.cat([torch.arange(4), torch.arange(4, len(a)), torch.arange(4, len(b))]).unsqueeze(0)
        packed = tiny_model(input_ids=row, position_ids=pos).logits[0]
    torch.testing.assert_close(packed[:4], alone[0][:4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[4:7], alone[0][4:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[7:], alone[1][4:], atol=1e-5, rtol=1e-4)


def test_unpadded_batches_of_several_rows(tiny_model):
    ids = torch.randint(0, 1000, (3, 9))
    with torch.no_grad():
        reference = tiny_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert enable_packed_attention(tiny_model)
        torch.testing.assert_close(tiny_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, reference)
        torch.testing.assert_close(tiny_model(input_ids=ids).logits, reference)


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
        packed = tiny_model(input_ids=row, position_ids=pos).logits[0]
    assert lengths and all(n % packed_attention.SEGMENT_MULTIPLE == 0 for n in lengths)
    assert set(lengths) == {64, 32}
    torch.testing.assert_close(packed[: len(a)], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[len(a):], alone[1][4:], atol=1e-5, rtol=1e-4)


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

    if dtype == torch.float32:
        for one, ref, what in zip(run(True), run(False), ["output", "dq", "dk", "dv"]):
            torch.testing.assert_close(one, ref, atol=1e-5, rtol=1e-4, msg=what)
        return
    # bf16: the one-node backward runs its kernel in fp32, so both bf16 paths are held against the fp32 result;
    # the one-node path must be as close to it as the per-segment bf16 autograd path, and close in absolute terms.
    exact = run(False, torch.float32)
    for one, per_segment, ref, what in zip(run(True), run(False), exact, ["output", "dq", "dk", "dv"]):
        err_one, err_seg = ((one - ref).norm() / ref.norm()).item(), ((per_segment - ref).norm() / ref.norm()).item()
        assert err_one <= 1e-2 and err_one <= 1.1 * err_seg, (what, err_one, err_seg)
