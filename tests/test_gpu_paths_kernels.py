"""The training kernels on the paths a GPU takes, checked on CPU: the fused LM head's fp32 loss math, packed rows
through transformers' own attention, and the lean RMSNorm without a host sync per call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import BF16_EPS, FP32_EPS, assert_within, gamma, gamma_prob, logits_bound

import adgen.train.linear_cross_entropy as lce

# ---- fused LM head: loss and softmax - one-hot in fp32 (issue 31 item 9) -------------------------------------------


def _exact_bf16_head(n=48, vocab=40, width=32, seed=0):
    """hidden [n, width] in {-1, 0, 1}, weight [vocab, width] in multiples of 1/8 within [-1, 1], targets [n]: every
    logit is a multiple of 1/8 below 32 in magnitude, exact in bf16, so a bf16 matmul computes the logits exactly and
    the only differences from an fp64 reference are the loss math's and the gradient's own roundings. Rows predict
    their target with p from ~0.01 to ~0.999 (near 1, bf16 keeps p - 1 worst)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-8, 9, (vocab, width), generator=gen).double() / 8
    targets = torch.randint(0, vocab, (n,), generator=gen)
    hidden = torch.sign(weight[targets])  # aligned with the target's row: a large target logit
    keep = torch.rand(n, width, generator=gen) < torch.linspace(0.2, 1.0, n)[:, None]  # confidence varies by row
    flip = torch.where(torch.rand(n, width, generator=gen) < 0.15, -1.0, 1.0)
    hidden = hidden * keep * flip
    return hidden, weight, targets


def _fp64_reference(hidden, weight, targets):
    """Per-row loss, softmax, softmax - one-hot and the gradients, in fp64 (exact here up to 1e-16)."""
    logits = hidden @ weight.T
    probs = logits.softmax(-1)
    loss = torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]
    g = probs - F.one_hot(targets, weight.shape[0]).double()
    return loss, probs, g, g @ weight, g.T @ hidden


def _fused(hidden, weight, targets, dtype, autocast):
    """loss per row (one call each) and the gradients of the summed loss (one call over all rows, in chunks)."""
    h, w = (x.to(torch.float32 if autocast else dtype).requires_grad_() for x in (hidden, weight))
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        rows = torch.stack([lce.linear_cross_entropy_sum(h[i : i + 1], w, targets[i : i + 1]) for i in range(len(h))])
        lce.linear_cross_entropy_sum(h, w, targets).backward()
    return rows.detach(), h.grad, w.grad


@pytest.mark.parametrize("device_path", ["cpu", "cuda"])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16 tensors", "fp32 tensors under bf16 autocast"])
def test_fused_head_loss_and_gradients_in_bf16_are_fp32_accurate(device_path, autocast, monkeypatch):
    """bf16 matmuls, but the loss and softmax - one-hot in fp32 (as F.cross_entropy under autocast, and Liger's kernel):
    each result within the bound of its fp32 sums and its one rounding to bf16 of an fp64 reference. "cuda" runs the
    branch a CUDA device takes (no reused CPU buffers, softmax out of place over the whole chunk)."""
    assert lce._math_dtype(torch.bfloat16) == torch.float32 and lce._math_dtype(torch.float32) == torch.float32
    assert lce._uses_cpu_buffers(torch.device("cpu")) and not lce._uses_cpu_buffers(torch.device("cuda", 0))
    if device_path == "cuda":
        monkeypatch.setattr(lce, "_uses_cpu_buffers", lambda device: False)
    hidden, weight, targets = _exact_bf16_head()
    n, vocab = len(targets), weight.shape[0]
    monkeypatch.setattr(lce, "CHUNK_BYTES", 20 * vocab * 2)  # 20 rows per chunk: three chunks of 16
    monkeypatch.setattr(lce, "MATH_ROWS", 6)
    monkeypatch.setattr(lce, "GRAD_ROWS", 5)
    loss, grad_hidden, grad_weight = _fused(hidden, weight, targets, torch.bfloat16, autocast)
    ref_loss, probs, g, ref_gh, ref_gw = _fp64_reference(hidden, weight, targets)
    assert float(probs.gather(1, targets[:, None]).max()) > 0.99  # the case bf16 math gets wrong

    # p in fp32: exp per term, a sum of `vocab` terms, a division (each within an ulp): relative error <= delta
    delta = gamma(vocab + 4)
    assert_within(loss, ref_loss, delta + FP32_EPS * ref_loss, "loss per row")
    # softmax - one-hot: p's error, the subtraction's rounding, then one rounding to bf16 for the matmuls
    g_err = delta * probs + (FP32_EPS + BF16_EPS) * g.abs()
    # then the fp32 sums of the bf16 matmuls, and their outputs (for the weight, each chunk's) rounded to bf16
    gh_inner = g_err @ weight.abs() + gamma(vocab) * (g.abs() @ weight.abs())
    gw_inner = g_err.T @ hidden.abs() + (gamma(n) + BF16_EPS) * (g.abs().T @ hidden.abs())
    assert_within(grad_hidden, ref_gh, gh_inner + BF16_EPS * (ref_gh.abs() + gh_inner), "hidden gradient")
    assert_within(grad_weight, ref_gw, gw_inner + BF16_EPS * (ref_gw.abs() + gw_inner), "weight gradient")


# ---- packed rows through transformers' own attention, as on a GPU (item 10) ------------------------------------------


@pytest.fixture(scope="module")
def sdpa_llama(tiny_llama3_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def chat_examples(llama3_tokenizer, adgen_train_path):
    from adgen.data.chat import ChatFormatter, encode_records
    from adgen.data.records import read_records

    fmt = ChatFormatter(llama3_tokenizer, system_prompt=None, max_length=96)
    return encode_records(fmt, read_records(adgen_train_path).records[:5])[0]


def _token_losses(model, batch):
    """Per-target-token loss in row-major order (the examples' order for both layouts), and a bound on how far two
    fp32 computations of them may be apart."""
    from adgen.data.chat import IGNORE_INDEX

    kwargs = {"position_ids": batch.position_ids, "attention_mask": batch.attention_mask, **batch.loss_kwargs()}
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, output_hidden_states=True, use_cache=False,
                    **{k: v for k, v in kwargs.items() if v is not None})
    keep = batch.targets != IGNORE_INDEX
    logits, hidden, tgt = out.logits[keep], out.hidden_states[-1][keep], batch.targets[keep]
    loss = F.cross_entropy(logits, tgt, reduction="none")
    # A token's loss = log-sum-exp - its logit moves by at most twice its logits' largest error, plus the rounding
    # of the vocabulary-long sum and of the log
    logit_err = logits_bound(model, hidden, batch.input_ids.shape[1]).amax(-1)
    lse = torch.logsumexp(logits, -1)
    return loss, 2 * logit_err + 2 * (gamma_prob(model.config.vocab_size + 4) + FP32_EPS * (lse.abs() + loss))


def test_packed_rows_through_transformers_sdpa_give_the_padded_token_losses(sdpa_llama, chat_examples):
    """The standard path a GPU takes (transformers' sdpa; flash_attention_2 reads the same position ids): adgen's
    packed row, position ids restarting at 0 and no attention mask, gives every token the loss it has in a padded
    batch. Without the position ids the examples see each other, and the same check fails."""
    from adgen.train.collate import collate

    packed, padded = collate(chat_examples, "packed", pad_id=0), collate(chat_examples, "padded", pad_id=0)
    assert packed.attention_mask is None and packed.input_ids.shape[0] == 1 and padded.attention_mask is not None
    assert packed.input_ids.shape[1] % 64 == 0 and packed.num_padded > packed.num_tokens  # with the fill at the end
    loss_packed, bound = _token_losses(sdpa_llama, packed)
    loss_padded, bound_padded = _token_losses(sdpa_llama, padded)
    assert loss_packed.shape == loss_padded.shape
    assert_within(loss_packed, loss_padded, (bound + bound_padded) / 2, "per-token loss, packed vs padded")
    leaky = packed.__class__(**{**packed.__dict__, "position_ids": None, "cu_seq_lens": None})
    loss_leaky, _ = _token_losses(sdpa_llama, leaky)
    with pytest.raises(AssertionError):
        assert_within(loss_leaky, loss_padded, (bound + bound_padded) / 2, "leak")


def test_packed_rows_carry_the_flash_attention_boundaries_transformers_would_infer(chat_examples):
    """flash_attention_2 with a packed row: the collator's cu_seq_lens / max_length equal what transformers infers
    from the position ids (with host syncs, in every layer) and reach the model through the loss module."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from adgen.data.chat import IGNORE_INDEX, Example
    from adgen.train.collate import collate, pack

    packed = collate(chat_examples, "packed", pad_id=0)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(packed.position_ids)
    kw = packed.loss_kwargs()
    assert torch.equal(kw["cu_seq_lens_q"], cu_q) and torch.equal(kw["cu_seq_lens_k"], cu_k)
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["max_length_q"] == kw["max_length_k"] == int(max_q)
    assert isinstance(kw["max_length_q"], int)  # an int: no .item() sync in flash-attention's kwargs either
    assert packed.to("cpu").loss_kwargs().keys() == kw.keys()
    assert collate(chat_examples, "padded", pad_id=0).loss_kwargs() == {}
    # a shared prompt prefix is continued by later examples: not varlen segments (CPU packed attention only)
    head = list(range(100, 110))
    a, b = Example(head + [1, 2, 3], [IGNORE_INDEX] * 11 + [2, 3]), Example(head + [1, 4], [IGNORE_INDEX] * 11 + [4])
    assert pack([a, b], share_prefix=True).num_shared > 0 and pack([a, b], share_prefix=True).loss_kwargs() == {}
    plain = pack([a, b], pad_id=0, pad_to_multiple_of=8)  # 13 + 12 tokens, then a fill of 7 in the last example
    assert plain.cu_seq_lens.tolist() == [0, 13, 32] and plain.max_seq_len == 19


def test_loss_module_hands_the_boundaries_to_the_model(sdpa_llama, chat_examples, monkeypatch):
    from adgen.train.collate import collate
    from adgen.train.loss import CausalLMLoss

    seen = []
    real_forward = type(sdpa_llama).forward

    def recording_forward(self, *args, **kwargs):
        seen.append(set(kwargs))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(sdpa_llama), "forward", recording_forward)
    batch = collate(chat_examples[:2], "packed", pad_id=0)
    for fused in (True, False):
        wrapper = CausalLMLoss(sdpa_llama, fused_head=fused)
        wrapper.decide_logits_selection(batch)
        with torch.no_grad():
            wrapper(batch.input_ids, batch.targets, batch.position_ids, batch.attention_mask, **batch.loss_kwargs())
    assert seen and all({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"} <= s for s in seen)


def test_packed_attention_leaves_a_model_on_a_gpu_as_it_is(tiny_llama3_dir, monkeypatch):
    """On CUDA the per-example CPU attention is not switched on (its per-layer host syncs and per-example launches):
    the model keeps transformers' attention, and no probe forward runs."""
    from transformers import AutoModelForCausalLM

    from adgen.train import packed_attention

    assert packed_attention.packed_attention_applies(torch.device("cpu"))
    assert not packed_attention.packed_attention_applies(torch.device("cuda", 0))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))  # as if moved there
    monkeypatch.setattr(packed_attention, "_rows_are_isolated", lambda m: pytest.fail("probe forward on a GPU model"))
    assert packed_attention.enable_packed_attention(model) is False
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    assert packed_attention.enable_packed_attention(model) is True  # on CPU it still switches


# ---- lean RMSNorm: no host sync per call (item 11) -----------------------------------------------------------------


def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def test_lean_norm_reads_no_tensor_value_on_the_host_per_call(monkeypatch):
    """`bool(tensor)` / `.item()` / `.tolist()` wait for a GPU: the norm's weight is checked for zeros once, when the
    lean forward is swapped in, not in every call (forward and backward)."""
    from adgen.train.lean_layers import make_layers_lean

    model = _llama()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = 0.0  # this one must keep its input for backward
    assert make_layers_lean(model) == 6
    calls = []
    for name in ("__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    x = torch.randn(2, 5, 64, requires_grad=True)
    for norm in norms:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norm(x).float().sum().backward()
    monkeypatch.undo()
    assert calls == []
    assert [n._adgen_weight_has_zero for n in norms] == [False, False, True, False]


def test_lean_blocks_are_swapped_in_exactly_where_they_were(monkeypatch):
    """The gating is unchanged: the decoder layers' norms and MLPs (not the final norm), pre-norm casting only for
    the norms that feed projections, and a zero in a weight still means the input is kept for backward."""
    from adgen.train import lean_layers

    model = _llama()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[7] = 0.0
    assert lean_layers.make_layers_lean(model) == 6
    swapped = sorted(name for name, m in model.named_modules() if "forward" in m.__dict__)
    assert swapped == sorted(f"model.layers.{i}.{part}" for i in range(2)
                             for part in ("input_layernorm", "post_attention_layernorm", "mlp"))
    assert "forward" not in model.model.norm.__dict__
    kept = []
    real_apply = lean_layers._RMSNorm.apply
    monkeypatch.setattr(lean_layers._RMSNorm, "apply", lambda *a: kept.append(a[-1]) or real_apply(*a))
    model(input_ids=torch.randint(0, 96, (1, 7)))
    assert kept == [True, False, True, True]  # from_output per norm call: False where the weight has a zero
