"""adgen.train: batching, loss, methods, guard rails, artefacts (tiny random Llama + real Llama-3 tokenizer)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import (assert_within, backprop_bound, decoder_chain, eval_losses, head_bounds, read_metrics,
                           tiny_config, train_losses)

from adgen.data.chat import IGNORE_INDEX, ChatFormatter, Example, encode_records
from adgen.errors import AdgenError, ConfigError, ModelError
from adgen.train.collate import DataOrder, pack, pad


@pytest.fixture(scope="module")
def tiny_examples(llama3_tokenizer, adgen_train_path):
    from adgen.data.records import read_records

    records = read_records(adgen_train_path).records[:6]
    fmt = ChatFormatter(llama3_tokenizer, system_prompt=None, max_length=96)
    examples, _ = encode_records(fmt, records)
    return examples


@pytest.fixture(scope="module")
def tiny_model(tiny_llama3_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    return model.eval()


# ---- batching ----------------------------------------------------------------------------------


def test_pack_restarts_positions_and_never_targets_across_examples():
    a = Example([1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = Example([4, 5], [IGNORE_INDEX, 5])
    batch = pack([a, b])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # token 3 (end of a) must not predict 4 (start of b): its target is -100
    assert batch.targets.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch.attention_mask is None and batch.num_padded == batch.num_tokens == 5
    padded = pad([a, b], pad_id=0)
    assert padded.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded.targets.tolist() == [[2, 3, IGNORE_INDEX], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert padded.num_padded == 6 and padded.num_tokens == 5


def test_shared_prefix_is_put_once_and_stops_inside_every_prompt():
    head = list(range(100, 110))  # 10 tokens every example starts with
    a = Example(head + [1, 2, 3], [IGNORE_INDEX] * 11 + [2, 3])
    b = Example(head + [1, 4], [IGNORE_INDEX] * 11 + [4])  # same first prompt token after the head
    batch = pack([a, b], share_prefix=True)
    shared = 10  # not 11: token 1 is the last prompt token of b, and position 10 predicts a target
    assert batch.num_shared == shared
    assert batch.input_ids.tolist() == [head + [1, 2, 3] + [1, 4]]
    assert batch.position_ids.tolist() == [list(range(13)) + [10, 11]]
    plain = pack([a, b])
    assert sorted(t for t in batch.targets[0].tolist() if t != IGNORE_INDEX) == sorted(
        t for t in plain.targets[0].tolist() if t != IGNORE_INDEX)
    assert batch.num_tokens == plain.num_tokens == 25  # 13 + 12: as if each had its own head
    short = Example(head[:5] + [9], [IGNORE_INDEX] * 5 + [9])  # common prefix of 5 < the minimum: no sharing
    assert pack([a, short], share_prefix=True).num_shared == 0


def test_shared_prefix_packing_gives_the_padded_loss_and_gradients(tiny_llama3_dir, llama3_tokenizer, adgen_train_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adgen.data.records import read_records
    from adgen.train.loss import CausalLMLoss
    from adgen.train.packed_attention import enable_packed_attention

    fmt = ChatFormatter(llama3_tokenizer, max_length=192)  # the default system prompt: a long common start
    tiny_examples, _ = encode_records(fmt, read_records(adgen_train_path).records[:4])

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert enable_packed_attention(model.get_base_model())
    wrapper = CausalLMLoss(model)
    shared = pack(tiny_examples, share_prefix=True)
    assert len(tiny_examples) == 4 and shared.num_shared > 0 and shared.input_ids.shape[1] < shared.num_tokens
    filled = pack(tiny_examples, share_prefix=True, pad_id=0, pad_to_multiple_of=64)  # what collate() does
    assert filled.input_ids.shape[1] % 64 == 0 and filled.input_ids.shape[1] > shared.input_ids.shape[1]
    padded = pad(tiny_examples, pad_id=0)
    grads = []
    for b in (shared, filled, padded):
        kw = {"attention_mask": b.attention_mask} if b is padded else {"position_ids": b.position_ids}
        model.zero_grad()
        loss, n = wrapper(b.input_ids, b.targets, **kw)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        grads[-1].insert(0, loss.item())
    # Tolerances: the head's fp32 bounds, its logits reached through the decoder's chain of sums (by another route in
    # each layout), carried back to the adapters (tests/train_helpers.py)
    loss_bound, grad_bounds = _layout_bounds(model, wrapper, padded, filled.input_ids.shape[1])
    for other in grads[1:]:
        assert abs(grads[0][0] - other[0]) <= loss_bound
        for g_shared, g_other, bound in zip(grads[0][1:], other[1:], grad_bounds):
            assert_within(g_shared, g_other, bound, "adapter gradient")


def _layout_bounds(model, wrapper, padded, longest: int, grads: bool = True):
    """(loss bound, [bound per trained parameter's gradient] if `grads`) for two layouts of the same examples."""
    from adgen.train.loss import _head_returns_hidden

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with _head_returns_hidden(base.lm_head):
        hidden, tgt = wrapper.target_logits(padded.input_ids, padded.targets, attention_mask=padded.attention_mask)
    chain = decoder_chain(base.config, longest)
    loss_bound, gh_bound, _ = head_bounds(hidden.detach(), base.lm_head.weight.detach(), tgt, chain)
    params = [p for p in model.parameters() if p.requires_grad] if grads else []
    return loss_bound, backprop_bound(hidden, params, gh_bound) if params else []


def test_packed_rows_are_filled_to_a_multiple_without_new_targets():
    a = Example([1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = Example([4, 5], [IGNORE_INDEX, 5])
    batch = pack([a, b], pad_id=0, pad_to_multiple_of=8)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    # the fill continues the last example's positions (no new segment) and has no targets
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch.targets.tolist() == [[2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.num_tokens == 5 and batch.num_padded == 8 and batch.num_targets == 3
    assert pack([a, b], pad_id=0, pad_to_multiple_of=5).input_ids.shape[1] == 5  # already a multiple: no fill


def test_heap_is_trimmed_only_when_the_rss_outgrows_a_steps_working_set(monkeypatch):
    import ctypes

    from adgen.train import memory

    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    rss = iter([300, 310, 314, 316, 200, 320, 335, 337])  # the RSS after each step
    monkeypatch.setattr(memory, "rss_bytes", lambda: next(rss))
    maybe_trim = memory.heap_trimmer(torch.device("cpu"))
    trimmed = []
    for _ in range(8):
        before = len(calls)
        maybe_trim()
        trimmed.append(len(calls) > before)
    # reference 300 (the first step): 310 and 314 are within 5%, 316 is not -> trim; the next step (200) is the
    # new reference, so 320 trims; 335 is the reference after that trim, and 337 is within 5% of it
    assert trimmed == [False, False, False, True, False, True, False, False]


def test_data_order_is_a_function_of_the_step_and_splits_the_global_batch():
    lengths = [10 + (i * 7) % 50 for i in range(37)]
    one = DataOrder(lengths, batch_size=4, grad_accum=1, world_size=1, seed=3)
    two = DataOrder(lengths, batch_size=2, grad_accum=1, world_size=2, seed=3)
    for step in range(12):  # crosses epochs
        single = one.step_indices(step)[0]
        split = two.step_indices(step, rank=0)[0] + two.step_indices(step, rank=1)[0]
        assert single == split
    again = DataOrder(lengths, batch_size=4, grad_accum=1, seed=3)
    assert [again.step_indices(s) for s in (7, 3)] == [one.step_indices(7), one.step_indices(3)]
    epoch0 = [i for s in range(10) for i in one.step_indices(s)[0]][:37]
    assert sorted(epoch0) == list(range(37))  # every example once per epoch
    grouped = DataOrder(lengths, batch_size=4, grad_accum=1, seed=3, batching="grouped", group_size=4)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for s in range(8) for b in grouped.step_indices(s)]
    plain = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for s in range(8) for b in one.step_indices(s)]
    assert sum(spread) < sum(plain)  # length grouping really groups


# ---- loss --------------------------------------------------------------------------------------


def test_response_only_loss_equals_transformers_loss(tiny_model, tiny_examples):
    from adgen.train.loss import CausalLMLoss

    batch = pad(tiny_examples[:3], pad_id=0)
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    for i, ex in enumerate(tiny_examples[:3]):
        labels[i, : len(ex.labels)] = torch.tensor(ex.labels)
    with torch.no_grad():
        ref = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        wrapper = CausalLMLoss(tiny_model, ce_chunk=7)  # chunks of 7 rows exercise the chunked CE
        total, n = wrapper(batch.input_ids, batch.targets, attention_mask=batch.attention_mask)
    assert wrapper.select_logits  # logits only at target positions (transformers' logits_to_keep mask)
    assert n == sum(ex.num_label_tokens for ex in tiny_examples[:3])
    with torch.no_grad():
        loss_bound, _ = _layout_bounds(tiny_model, wrapper, batch, batch.input_ids.shape[1], grads=False)
    assert abs(float(total) - float(ref) * n) <= loss_bound  # (transformers' mean: one more rounding, within it)


def test_packed_loss_equals_padded_loss(tiny_model, tiny_examples):
    from adgen.train.loss import CausalLMLoss

    wrapper = CausalLMLoss(tiny_model)
    packed, padded = pack(tiny_examples), pad(tiny_examples, pad_id=0)
    with torch.no_grad():
        lp, n_p = wrapper(packed.input_ids, packed.targets, position_ids=packed.position_ids)
        ld, n_d = wrapper(padded.input_ids, padded.targets, attention_mask=padded.attention_mask)
        # the same row without restarting positions lets examples attend to each other: must differ
        leak, _ = wrapper(packed.input_ids, packed.targets)
    assert n_p == n_d
    with torch.no_grad():
        loss_bound, _ = _layout_bounds(tiny_model, wrapper, padded, packed.input_ids.shape[1], grads=False)
    assert abs(float(lp) - float(ld)) <= loss_bound
    assert abs(float(leak) - float(ld)) / n_d > 1e-3  # a property of the model, not of rounding


def _loss_and_grads(model, wrapper, batch):
    model.zero_grad(set_to_none=True)
    total, n = wrapper(batch.input_ids, batch.targets, position_ids=batch.position_ids)
    total.backward()
    return float(total.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_fused_head_loss_equals_logits_then_cross_entropy(tiny_llama3_dir, tiny_examples, monkeypatch):
    """The fused LM head + loss (no logits kept) gives the loss and every gradient of logits -> cross-entropy,
    the head's weight included (trained here), over several chunks of positions. Tolerances are bounds on fp32
    rounding computed from the tensors (tests/train_helpers.py), so they hold for any BLAS and summation order."""
    import adgen.train.linear_cross_entropy as lce
    from transformers import AutoModelForCausalLM

    from adgen.train.loss import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32)
    monkeypatch.setattr(lce, "CHUNK_BYTES", 5 * model.config.vocab_size * 4)  # 5 positions per chunk (fp32)
    monkeypatch.setattr(lce, "GRAD_ROWS", 2)  # each chunk's gradient matmul in blocks of 2, 2 and 1 rows
    batch = pack(tiny_examples)
    fused, plain = CausalLMLoss(model), CausalLMLoss(model, fused_head=False)
    assert fused.decide_logits_selection(batch) == "target positions only, head fused with the loss"
    assert plain.decide_logits_selection(batch) == "target positions only"
    assert int((batch.targets != IGNORE_INDEX).sum()) > 3 * 5
    loss_f, grads_f = _loss_and_grads(model, fused, batch)
    loss_p, grads_p = _loss_and_grads(model, plain, batch)
    assert set(grads_f) == set(grads_p) and "lm_head.weight" in grads_f

    # The two paths differ only in the head (same decoder forward, same backward below it): bound the head's results
    hidden, tgt = fused.target_hidden(batch.input_ids, batch.targets, position_ids=batch.position_ids)
    head = model.lm_head.weight
    loss_bound, gh_bound, gw_bound = head_bounds(hidden.detach(), head.detach(), tgt)
    assert abs(loss_f - loss_p) <= loss_bound, (loss_f, loss_p, loss_bound)
    assert_within(grads_f["lm_head.weight"], grads_p["lm_head.weight"], gw_bound, "lm_head.weight")
    h = hidden.detach().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h @ head.detach().T, tgt, reduction="sum")
    got = lce.linear_cross_entropy_sum(h, head.detach(), tgt)
    assert_within(torch.autograd.grad(got, h)[0], torch.autograd.grad(ref, h)[0], gh_bound, "hidden gradient")
    # ... and carry the hidden gradient's bound through the model's backward: the vocabulary-long sums of the head
    # (128k terms) dominate every other sum of this model's backward (< 1000 terms)
    names = [k for k in grads_p if k != "lm_head.weight"]
    params = dict(model.named_parameters())
    for k, bound in zip(names, backprop_bound(hidden, [params[k] for k in names], gh_bound)):
        assert_within(grads_f[k], grads_p[k], bound, k)
    assert not any(k.startswith("_fused") for k in fused.state_dict())  # the head is not registered twice
    with torch.no_grad():  # evaluation: the loss alone
        assert abs(float(fused(batch.input_ids, batch.targets, position_ids=batch.position_ids)[0]) - loss_p) <= loss_bound


def test_fused_head_is_refused_where_the_logits_are_not_the_heads_output():
    """Gemma-2 soft-caps its logits after the head: the check at setup sees it and keeps the plain path."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from adgen.train.loss import CausalLMLoss

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=2.0))
    examples = [Example(list(range(5, 25)), [IGNORE_INDEX] * 8 + list(range(13, 25))),
                Example(list(range(40, 52)), [IGNORE_INDEX] * 5 + list(range(45, 52)))]
    batch = pad(examples, pad_id=0)
    wrapper = CausalLMLoss(model)
    assert wrapper.decide_logits_selection(batch) == "target positions only"
    assert wrapper.fused_head is None
    with torch.no_grad():
        total, _ = wrapper(batch.input_ids, batch.targets, attention_mask=batch.attention_mask)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    keep = batch.targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], batch.targets[keep], reduction="sum")
    assert float(total) == pytest.approx(float(expected), rel=1e-5)


def test_packing_and_padding_train_the_same(tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.train import train

    runs = {}
    for batching in ("packed", "padded"):
        cfg = tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / batching, batching=batching, max_steps=3, max_length=160)
        runs[batching] = train(cfg)
    packed, padded = runs["packed"], runs["padded"]
    # packed rows are only filled up to the next multiple of ROW_MULTIPLE tokens (< 64 slots per row of ~500 here)
    assert 0.0 < packed.summary["padding_share"] < 0.13 and padded.summary["padding_share"] > 0.01
    assert len(packed.train_losses) == 3
    for a, b in zip(packed.train_losses, padded.train_losses):
        assert a == pytest.approx(b, rel=1e-4)


# ---- methods -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,over",
    [
        ("lora", {}),
        ("dora", {}),
        ("prefix", {"lr": 1e-1, "prefix": {"num_virtual_tokens": 8}}),
        ("full", {"lr": 2e-3}),
    ],
)
def test_method_lowers_the_loss(method, over, tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.train import train

    cfg = tiny_config(
        tiny_llama3_dir, adgen_train_path, tmp_path / method, method=method, max_steps=6, max_samples=4,
        eval_data=str(adgen_train_path), max_eval_samples=4, eval_on_start=True, **over,
    )
    result = train(cfg)
    ev = eval_losses(tmp_path / method)
    assert set(ev) == {0, 6}
    assert ev[6] < ev[0] - 0.03, ev  # the 4 training examples are being fitted
    assert math.isfinite(result.summary["final_train_loss"])
    artefact = tmp_path / method / ("model" if method == "full" else "adapter")
    assert (artefact / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).is_file()
    if method == "prefix":
        assert result.summary["batching"] == "grouped" and "prefix tuning" in result.summary["notes"][0]
    if method == "dora":
        assert json.loads((artefact / "adapter_config.json").read_text())["use_dora"] is True


def test_qlora_runs_real_nf4_steps_on_cpu(tiny_llama3_dir, adgen_train_path, tmp_path):
    pytest.importorskip("bitsandbytes")
    from adgen.train import train

    common = dict(method="qlora", max_steps=3, lr=1e-2, precision="bf16-frozen")
    result = train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "q", **common, eval_every=2,
                               eval_data=str(adgen_train_path), max_eval_samples=4, eval_on_start=True))
    ev = eval_losses(tmp_path / "q")
    assert ev[3] < ev[0] - 0.03, ev
    assert result.summary["total_parameters"] > result.summary["trainable_parameters"] > 0
    adapter_cfg = json.loads((tmp_path / "q" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA"
    # evaluating must not change training: bitsandbytes repacks CPU 4-bit weights for inference the
    # first time they run in eval mode, after which no gradient flows through them
    no_eval = train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "q2", **common))
    assert no_eval.train_losses == pytest.approx(result.train_losses, abs=1e-6)


def test_qlora_base_really_is_4bit(tiny_llama3_dir):
    pytest.importorskip("bitsandbytes")
    from adgen.train.config import LoraSection, TrainConfig
    from adgen.train.peft_setup import apply_method, load_base_model, resolve_precision

    cfg = TrainConfig(model=str(tiny_llama3_dir), method="qlora", train_data="x", lora=LoraSection(target_modules=["q_proj"]))
    prec = resolve_precision(cfg, "cpu")
    model = apply_method(load_base_model(cfg, str(tiny_llama3_dir), prec, torch.device("cpu")), cfg, prec)
    kinds = {type(p).__name__ for n, p in model.named_parameters() if "proj" in n and "lora" not in n}
    assert "Params4bit" in kinds
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.base_model.model.config.quantization_config.bnb_4bit_quant_type == "nf4"


# ---- resume / guard rails ----------------------------------------------------------------------


def test_resume_after_interruption_equals_uninterrupted(tiny_llama3_dir, adgen_train_path, tmp_path, monkeypatch):
    """In-process interruption right after the step-3 checkpoint (the SIGKILL version is in test_train_dist.py)."""
    from adgen.train import checkpoint as ckpt_mod
    from adgen.train import train

    over = {"max_steps": 6, "save_every": 3, "keep_checkpoints": 5, "lora": {"dropout": 0.1}, "eval_every": 0}
    train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "a", **over))

    original = ckpt_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = original(*args, **kwargs)
        if args[2] == 3:
            raise KeyboardInterrupt  # the process "dies" after the step-3 checkpoint
        return path

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "b", **over))
    monkeypatch.setattr(ckpt_mod, "save_checkpoint", original)
    assert not (tmp_path / "b" / "summary.json").exists()
    resumed = train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "b", **over), resume=True)
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert resumed.summary["status"] == "completed"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_llama3_dir, adgen_train_path, tmp_path, monkeypatch):
    from adgen.train import loss as loss_mod
    from adgen.train import train
    from adgen.train.state import TrainingDiverged

    calls = {"n": 0}
    original = loss_mod.CausalLMLoss.forward

    def forward(self, *a, **k):
        total, n = original(self, *a, **k)
        calls["n"] += 1
        if calls["n"] > 2:  # from step 3 on (one micro-batch per step)
            total = total * float("nan")
        return total, n

    monkeypatch.setattr(loss_mod.CausalLMLoss, "forward", forward)
    cfg = tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "nan", save_every=2, max_steps=6)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg)
    msg = str(e.value)
    assert "step 3" in msg and "lower lr" in msg and "step-2" in msg
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert [c.name for c in (tmp_path / "nan" / "checkpoints").iterdir()] == ["step-2"]
    assert max(train_losses(tmp_path / "nan")) == 2


def test_output_dir_of_another_run_needs_overwrite(tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.train.run_dir import prepare_output_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(AdgenError, match="--overwrite"):
        prepare_output_dir(run, overwrite=False, resume=False)
    prepare_output_dir(run, overwrite=True, resume=False)
    assert list(run.iterdir()) == []
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(AdgenError, match="does not look like an adgen run"):
        prepare_output_dir(other, overwrite=True, resume=False)
    assert (other / "cat.jpg").exists()


def test_fp16_is_refused_unless_forced():
    from adgen.train.config import TrainConfig

    with pytest.raises(ConfigError, match="NaN"):
        TrainConfig(train_data="x", precision="fp16").validate()
    TrainConfig(train_data="x", precision="fp16", allow_fp16=True).validate()
    with pytest.raises(ConfigError, match="bf16-frozen"):
        TrainConfig(train_data="x", precision="bf16-frozen", method="full").validate()


def test_qlora_without_bitsandbytes_or_support_says_so(monkeypatch):
    import builtins

    from adgen.train.peft_setup import check_4bit_support

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ModelError, match="pip install 'bitsandbytes"):
        check_4bit_support(torch.device("cpu"))
    monkeypatch.setattr(builtins, "__import__", real_import)
    bnb = pytest.importorskip("bitsandbytes")

    def unsupported(*a, **k):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", unsupported)
    with pytest.raises(ModelError, match="cannot run 4-bit NF4 on cpu"):
        check_4bit_support(torch.device("cpu"))


# ---- the command -------------------------------------------------------------------------------


def test_cli_train_writes_every_artefact(tiny_llama3_dir, adgen_train_path, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adgen.cli import main

    out = tmp_path / "run"
    argv = [
        "train", "--model", str(tiny_llama3_dir), "--train-data", str(adgen_train_path),
        "--eval-data", str(adgen_train_path), "--method", "lora", "--output-dir", str(out), "--max-steps", "4",
        "--max-samples", "8", "system_prompt=null", "eval_every=2", "save_every=2",
        "max_eval_samples=4", "max_length=64", "lora.target_modules=q_proj,v_proj", "lora.r=4", "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "peak memory" in printed
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "train_summary.md",
                 "attribute_vocab.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer_config.json", "checkpoints/step-4/optimizer.pt",
                 "checkpoints/step-4/rng/rank-0.pt", "checkpoints/step-2/adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and 0.0 <= r["padding"] < 0.2 and r["peak_mem_gb"] > 0 for r in train_rows)
    assert sorted(eval_losses(out)) == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["tokens_per_s"] > 0
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lora"]["r"] == 4 and resolved["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert resolved["batching"] == "packed"  # defaults are written too
    vocab = json.loads((out / "attribute_vocab.json").read_text())
    assert vocab["values"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir))
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert peft_model.peft_config["default"].r == 4
    # a second run into the same directory is refused ...
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    # ... and --resume of the finished run with more steps continues from its last checkpoint
    assert main(argv[:-1] + ["--no-progress", "--resume", "--max-steps", "5"]) == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]


def test_prefix_tuning_over_a_4bit_base(tiny_llama3_dir, adgen_train_path, tmp_path):
    """P-Tuning v2 over an NF4 base (ChatGLM's ptuning with QUANTIZATION_BIT=4)."""
    pytest.importorskip("bitsandbytes")
    from adgen.train import train

    cfg = tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "p4", method="prefix", load_in_4bit=True,
                      max_steps=3, lr=1e-1, prefix={"num_virtual_tokens": 4}, precision="fp32",
                      eval_data=str(adgen_train_path), max_eval_samples=4, max_samples=4, eval_on_start=True)
    result = train(cfg)
    ev = eval_losses(tmp_path / "p4")
    assert ev[3] < ev[0], ev
    assert result.summary["batching"] == "grouped"
    assert json.loads((tmp_path / "p4" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"


def test_config_forms_of_lora_targets_and_recipes_load(tmp_path):
    from pathlib import Path

    from adgen.train.config import load_train_config

    for value, expected in (("all-linear", "all-linear"), ("q_proj", ["q_proj"]), ("q_proj,v_proj", ["q_proj", "v_proj"])):
        cfg = load_train_config(None, [f"lora.target_modules={value}", "train_data=x"])
        cfg.validate()
        cfg.validate()  # idempotent
        assert cfg.lora.target_modules == expected
    (tmp_path / "c.yaml").write_text("lora:\n  target_modules: all-linear\n  rslora: true\n")
    assert load_train_config(tmp_path / "c.yaml", ["train_data=x"]).validate().lora.target_modules == "all-linear"
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'"):
        load_train_config(None, ["lora.rank=4"])
    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {p.name for p in recipes} >= {"llama3-8b-lora.yaml", "llama3-8b-qlora.yaml", "smollm2-135m.yaml"}
    for recipe in recipes:
        cfg = load_train_config(recipe).validate()
        if recipe.name == "llama3-8b-lora.yaml":  # the reference recipe
            assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules, cfg.lr, cfg.lr_scheduler) == (
                8, 16, ["q_proj", "v_proj"], 2e-4, "cosine")
            assert (cfg.batch_size, cfg.grad_accum) == (2, 4)
        if recipe.name == "llama3-8b-qlora.yaml":
            assert cfg.quantized and cfg.gradient_checkpointing


def test_resume_config_check_names_changed_keys_and_ignores_the_mutable_ones():
    from dataclasses import asdict

    from adgen.config import dict_diff
    from adgen.train.config import RESUME_MUTABLE_KEYS, TrainConfig

    old = asdict(TrainConfig())
    new = asdict(TrainConfig(lr=1e-3, epochs=3, eval_every=7))
    new["lora"]["r"] = 16
    assert dict_diff(old, new, ignore=RESUME_MUTABLE_KEYS) == ["lora.r: 8 -> 16", "lr: 0.0002 -> 0.001"]
    assert "epochs: 1.0 -> 3" in dict_diff(old, new)


def test_time_budget_replans_steps_and_the_lr_schedule(tiny_llama3_dir, adgen_train_path, tmp_path, monkeypatch):
    """max_minutes: after the probe steps the run keeps only the steps that fit, and the cosine schedule
    is re-planned to end there (the last step's lr is near the schedule's end, not a mid-run value)."""
    from adgen.train import schedule as schedule_mod
    from adgen.train import train

    seen = {}

    def fits_six(cfg, step, total, elapsed, per_step):
        seen.update(step=step, total=total)
        return 6

    monkeypatch.setattr(schedule_mod, "steps_in_budget", fits_six)
    cfg = tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "budget", max_steps=40, max_minutes=1.0,
                      lr_scheduler="cosine")
    result = train(cfg)
    assert seen == {"step": schedule_mod.BUDGET_PROBE_STEPS, "total": 40}
    assert result.steps == 6 and result.summary["total_steps"] == 6 and max(train_losses(tmp_path / "budget")) == 6
    lrs = [r["lr"] for r in read_metrics(tmp_path / "budget") if "lr" in r]
    assert lrs[-1] < 0.1 * cfg.lr < lrs[2]  # cosine brought down to the new end
    with pytest.raises(ConfigError, match="max_minutes"):
        tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "x", max_minutes=0).validate()


def test_steps_in_budget_uses_the_measured_step_time():
    from adgen.train.config import TrainConfig
    from adgen.train.schedule import steps_in_budget

    cfg = TrainConfig(train_data="x", max_minutes=1.0)
    # 30 s spent after 3 steps, 10 s a step from now on: 3 more fit in the minute
    assert steps_in_budget(cfg, step=3, total=100, elapsed=30.0, per_step=10.0) == 6
    assert steps_in_budget(cfg, step=3, total=5, elapsed=3.0, per_step=1.0) == 5  # never more than planned
    assert steps_in_budget(cfg, step=3, total=100, elapsed=300.0, per_step=10.0) == 3  # over budget: stop now


def test_top_layers_adapts_only_the_top_of_the_model(tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.train import train

    result = train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "top", max_steps=2,
                               lora={"top_layers": 1}))
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "top" / "adapter" / "adapter_model.safetensors"))
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in weights}
    assert layers == {1}  # the tiny model has 2 layers: only the top one is adapted
    assert result.steps == 2


def test_full_fine_tuning_of_the_top_layers_leaves_the_rest_as_it_was(tiny_llama3_dir, adgen_train_path, tmp_path):
    from safetensors.torch import load_file

    from adgen.train import train

    train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "full", max_steps=2, method="full",
                      top_layers=1, lr=1e-2))
    base = load_file(str(tiny_llama3_dir / "model.safetensors"))
    tuned = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k].float(), tuned[k].float())}
    assert changed and all(".layers.1." in k for k in changed)  # the top layer learned; nothing else moved
    assert any(".layers.1.mlp" in k for k in changed)


def test_lean_norm_and_mlp_blocks_train_as_the_models_own(tiny_llama3_dir, adgen_train_path, tmp_path):
    """Full fine-tuning with the lean RMSNorm / SwiGLU blocks (on by default) gives the losses of the model's own
    modules, step by step (fp32: the same math), and the summary says they were used."""
    from adgen.train import train

    for lean in (True, False):
        train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / f"lean-{lean}", max_steps=4, method="full",
                          lr=1e-3, log_every=1, lean_layers=lean))
    on, off = train_losses(tmp_path / "lean-True"), train_losses(tmp_path / "lean-False")
    assert len(on) == 4 and on.keys() == off.keys()
    assert all(on[k] == pytest.approx(off[k], rel=1e-5) for k in on), (on, off)
    assert on[4] != pytest.approx(on[1], rel=1e-3)  # it trained
    summary = json.loads((tmp_path / "lean-True" / "summary.json").read_text())
    assert "lean norm / MLP blocks" in json.dumps(summary)


def test_lora_under_bf16_autocast_trains_without_casting_adapter_inputs(tiny_llama3_dir, adgen_train_path, tmp_path,
                                                                      monkeypatch):
    """bf16 LoRA: the adapters get their inputs in bf16 during the training forward (PEFT would copy them to fp32 for
    autocast to copy them back), with the losses of the casting path, step by step."""
    from contextlib import nullcontext

    import adgen.train.loop as loop
    import adgen.train.trainer as T

    dtypes: set = set()
    in_step = [False]
    setup_model, train_step = T.setup_model, loop.train_step

    def record_adapter_inputs(run, data, objective):
        net = setup_model(run, data, objective)
        for name, m in net.model.named_modules():
            if name.endswith("lora_A.default"):
                m.register_forward_pre_hook(lambda mod, args: dtypes.add(args[0].dtype) if in_step[0] else None)
        return net

    def step(s, progress):
        in_step[0] = True
        try:
            return train_step(s, progress)
        finally:
            in_step[0] = False

    monkeypatch.setattr(T, "setup_model", record_adapter_inputs)
    monkeypatch.setattr(loop, "train_step", step)
    over = {"max_steps": 3, "precision": "bf16", "log_every": 1,
            "lora": {"dropout": 0.0, "target_modules": "q_proj,v_proj"}}
    T.train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "uncast", **over))
    assert dtypes == {torch.bfloat16}
    dtypes.clear()
    monkeypatch.setattr(loop, "lora_inputs_uncast", lambda s: nullcontext())
    T.train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "cast", **over))
    assert dtypes == {torch.float32}  # PEFT's own cast, for comparison
    uncast, cast = train_losses(tmp_path / "uncast"), train_losses(tmp_path / "cast")
    assert len(uncast) == 3 and all(uncast[k] == pytest.approx(cast[k], rel=1e-6) for k in cast), (uncast, cast)


def test_a_finished_run_keeps_nothing_alive(tiny_llama3_dir, adgen_train_path, tmp_path, monkeypatch):
    """train() hands everything back: what runs next in the process (the demo's evaluation) has the memory."""
    import gc
    import weakref

    import adgen.train.trainer as T

    refs = []
    setup_optimization = T.setup_optimization

    def keep_refs(run, data, net, objective):
        opt = setup_optimization(run, data, net, objective)
        refs.extend(weakref.ref(x) for x in (net.model, opt.optimizer, run.accelerator))
        return opt

    monkeypatch.setattr(T, "setup_optimization", keep_refs)
    T.train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "run", max_steps=2))
    gc.collect()
    assert len(refs) == 3 and all(r() is None for r in refs)


def test_top_layers_is_refused_for_prefix_tuning(tiny_llama3_dir, adgen_train_path, tmp_path):
    with pytest.raises(ConfigError, match="top_layers"):
        tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "p", method="prefix", top_layers=1).validate()


def test_generation_metrics_during_training_and_the_best_checkpoint(tiny_llama3_dir, adgen_train_path,
                                                                     adgen_dev_path, tmp_path):
    from adgen.train import train

    out = tmp_path / "gen"
    result = train(tiny_config(tiny_llama3_dir, adgen_train_path, out, max_steps=4, eval_data=str(adgen_dev_path),
                               max_eval_samples=4, gen_eval_every=2, gen_eval_samples=2, gen_max_new_tokens=8,
                               best_metric="rouge-1"))
    rows = [r for r in read_metrics(out) if "gen_eval" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        g = r["gen_eval"]
        assert g["n"] == 2 and {"rouge-1", "bleu-4", "attr_coverage", "ended_share", "never_stopped_share",
                                  "compliance_violation_rate"} <= set(g)
        assert g["ended_share"] + g["never_stopped_share"] + g["loop_share"] == pytest.approx(1.0)
    s = result.summary
    assert s["best_metric"] == "rouge-1" and s["best_step"] in (2, 4) and s["final_gen_eval"]["n"] == 2
    assert (out / "best" / "adapter_config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert "best rouge-1" in (out / "train_summary.md").read_text()


def test_early_stopping_on_a_generation_metric_keeps_the_best(tiny_llama3_dir, adgen_train_path, adgen_dev_path,
                                                              tmp_path, monkeypatch):
    import adgen.train.gen_eval as gen_eval
    from safetensors.torch import load_file

    from adgen.train import train

    scripted = iter([0.2, 0.5, 0.4, 0.3, 0.9, 0.9])

    def fake_metrics(*a, **k):
        return {"n": 2, "rouge-1": next(scripted), "bleu-4": 0.0, "attr_coverage": 0.0, "repetition_rate": 0.0,
                "ended_share": 1.0, "never_stopped_share": 0.0, "loop_share": 0.0, "example": ""}

    monkeypatch.setattr(gen_eval, "generation_metrics", fake_metrics)
    out = tmp_path / "early"
    result = train(tiny_config(tiny_llama3_dir, adgen_train_path, out, max_steps=10, eval_data=str(adgen_dev_path),
                               gen_eval_every=1, best_metric="rouge-1", early_stopping_patience=2))
    s = result.summary
    assert s["status"] == "early_stopped" and s["steps"] == 4 and max(train_losses(out)) == 4
    assert (s["best_step"], s["best_value"]) == (2, 0.5)
    best = load_file(str(out / "best" / "adapter_model.safetensors"))
    last = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(best[k], last[k]) for k in best)  # best/ is step 2's weights, not the last ones
    with pytest.raises(ConfigError, match="gen_eval_every"):
        tiny_config(tiny_llama3_dir, adgen_train_path, out, eval_data=str(adgen_dev_path), best_metric="bleu-4").validate()
    with pytest.raises(ConfigError, match="best_metric"):
        tiny_config(tiny_llama3_dir, adgen_train_path, out, best_metric="accuracy").validate()


def test_report_to_tensorboard_writes_the_per_step_scalars(tiny_llama3_dir, adgen_train_path, adgen_dev_path,
                                                           tmp_path):
    """`report_to=[tensorboard]`: accelerate's tracker writes event files under the run directory; read back
    with TensorBoard's own reader they hold each logged step's train loss, lr, tokens/s, the eval loss and the
    generation metrics, and the config as hyperparameters."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adgen.train import train

    out = tmp_path / "tb"
    train(tiny_config(tiny_llama3_dir, adgen_train_path, out, max_steps=4, log_every=1, eval_every=2,
                      eval_data=str(adgen_dev_path), max_eval_samples=4, gen_eval_every=2, gen_eval_samples=2,
                      gen_max_new_tokens=6, report_to=["tensorboard"]))
    event_files = list((out / "tracking").rglob("events.out.tfevents.*"))
    assert event_files
    scalars: dict[str, list] = {}
    for f in event_files:
        acc = EventAccumulator(str(f.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    assert [s for s, _ in sorted(scalars["loss"])] == [1, 2, 3, 4]
    rows = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert dict(scalars["loss"]) == pytest.approx(rows, rel=1e-6)  # the same numbers as metrics.jsonl
    assert {"lr", "tokens_per_s", "peak_mem_gb", "eval_loss", "gen_eval/rouge-1", "gen_eval/ended_share"} <= set(scalars)
    assert sorted(s for s, _ in scalars["eval_loss"]) == [2, 4]


def test_report_to_names_the_fix_for_an_unknown_tracker(tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.errors import ConfigError

    with pytest.raises(ConfigError, match="report_to.*tensorbord.*tensorboard"):
        tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "x", max_steps=1, report_to=["tensorbord"]).validate()


# ---- LoRA variants: LoRA+, PiSSA / OLoRA initialisation, NEFTune ---------------------------------
@pytest.mark.parametrize("over,key", [
    ({"lora": {"init": "svd"}}, "lora.init"),
    ({"method": "full", "lora": {"init": "pissa"}}, "lora.init"),
    ({"method": "qlora", "lora": {"init": "olora"}}, "lora.init"),
    ({"lora": {"plus_lr_ratio": 0}}, "lora.plus_lr_ratio"),
    ({"method": "full", "lora": {"plus_lr_ratio": 16}}, "lora.plus_lr_ratio"),
    ({"neftune_alpha": -1}, "neftune_alpha"),
])
def test_lora_variant_keys_are_validated(tiny_llama3_dir, adgen_train_path, tmp_path, over, key):
    from adgen.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "x", max_steps=1, **over).validate()


def test_lora_plus_trains_b_at_a_higher_lr(tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.train import train
    from adgen.train.peft_setup import optimizer_groups

    cfg = tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "plus", max_steps=2,
                      lora={"plus_lr_ratio": 16})
    result = train(cfg)
    assert result.status == "completed" and all(math.isfinite(v) for v in train_losses(tmp_path / "plus").values())

    class Named(torch.nn.Module):  # the groups by parameter name, on a stand-in with LoRA-like names
        def __init__(self):
            super().__init__()
            self.lora_A = torch.nn.Linear(4, 2, bias=False)
            self.lora_B = torch.nn.Linear(2, 4, bias=True)

    groups = optimizer_groups(Named(), cfg)
    assert [len(g["params"]) for g in groups] == [1, 0, 2] and groups[2]["lr"] == pytest.approx(cfg.lr * 16)
    assert "lr" not in groups[0]  # A keeps the optimizer's lr


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora"])
def test_pissa_and_olora_adapters_load_on_the_original_base(tiny_llama3_dir, adgen_train_path, tmp_path,
                                                            monkeypatch, init):
    """PiSSA / OLoRA move part of each weight into the adapter; the saved adapter is converted so that the
    original base + adapter gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import adgen.train.trainer as trainer

    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    seen = {}
    real = trainer.save_final

    def spy(accelerator, cfg, out, model, wrapped, tokenizer, name=None):
        if name is None:
            model.eval()
            with torch.no_grad():
                seen["logits"] = model(input_ids=ids).logits
        return real(accelerator, cfg, out, model, wrapped, tokenizer, name)

    monkeypatch.setattr(trainer, "save_final", spy)
    out = tmp_path / init
    trainer.train(tiny_config(tiny_llama3_dir, adgen_train_path, out, max_steps=3, lr=1e-2, lora={"init": init}))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(input_ids=ids).logits
    assert (out / "lora_init" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2 * 8  # converted: rank 2r (r = 8)
    assert not torch.allclose(loaded, plain, atol=1e-3)  # it learned something
    assert torch.allclose(loaded, seen["logits"], atol=1e-4), (loaded - seen["logits"]).abs().max()


def test_neftune_noise_only_while_training(tiny_llama3_dir, adgen_train_path, tmp_path):
    from transformers import AutoModelForCausalLM

    from adgen.train import train
    from adgen.train.peft_setup import add_neftune_noise

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir))
    ids = torch.tensor([[1, 50, 60, 70]])
    clean = model.get_input_embeddings()(ids)
    add_neftune_noise(model, 5.0)
    emb = model.get_input_embeddings()
    emb.train()
    noisy = emb(ids)
    bound = 5.0 / (4 * clean.shape[-1]) ** 0.5
    assert not torch.equal(noisy, clean) and (noisy - clean).abs().max() <= bound + 1e-6
    emb.eval()
    assert torch.equal(emb(ids), clean)  # evaluation and generation see clean embeddings

    plain = train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "a", max_steps=2))
    noised = train(tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "b", max_steps=2, neftune_alpha=15))
    assert plain.status == noised.status == "completed"
    assert train_losses(tmp_path / "a")[1] != train_losses(tmp_path / "b")[1]


def test_parameter_counts_of_lora_and_of_top_layer_fine_tuning(tiny_llama3_dir):
    """LoRA r on q/v: r x (in + out) per adapted projection (PEFT's count); full FT of the top layer: its weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adgen.train.peft_setup import count_parameters

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir))
    total = sum(p.numel() for p in base.parameters())
    top = base.model.layers[-1]
    for p in base.parameters():
        p.requires_grad = False
    for p in top.parameters():
        p.requires_grad = True
    assert count_parameters(base) == (sum(p.numel() for p in top.parameters()), total)

    r, c = 4, base.config
    head_dim = c.hidden_size // c.num_attention_heads
    q_out, v_out = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    lora = get_peft_model(base, LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
    expected = c.num_hidden_layers * r * ((c.hidden_size + q_out) + (c.hidden_size + v_out))
    assert count_parameters(lora) == (expected, total + expected)
