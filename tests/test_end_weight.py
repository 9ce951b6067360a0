"""End-of-turn loss weighting (`TrainConfig.end_token_weight`): both loss paths (the fused head and the plain chunked
cross-entropy) weight exactly the targets that are the chat format's stop tokens, weight 1 and the eval loss are the
unweighted loss bit for bit, and the config key works from YAML and the CLI and refuses what cannot work.

Tolerances are bounds on fp32 rounding computed from the tensors (tests/train_helpers.py). The weighted comparisons
use W = 4, a power of two: multiplying by it is exact in floating point, so a weighted row's rounding error is exactly
W times the unweighted one's, and the unweighted bounds scaled by each row's weight hold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import assert_within, backprop_bound, eval_losses, head_bounds, tiny_config, train_losses

from adgen.data.chat import IGNORE_INDEX, ChatFormatter, Example
from adgen.data.records import read_records
from adgen.errors import ConfigError
from adgen.train.collate import pack
from adgen.train.loss import CausalLMLoss, chunked_cross_entropy_sum, end_token_weights

W = 4.0


def _short_examples(formatter: ChatFormatter, records, lengths) -> list[Example]:
    """One example per record with its copy cut to `lengths[i]` characters (SmolLM2 spends ~2 tokens a character):
    short ones end on the end-of-turn token, a long one is truncated at max_length (its end is cut)."""
    return [formatter.encode(r.content, r.summary[:n]) for r, n in zip(records, lengths)]


@pytest.fixture(scope="module")
def chatml(smollm2_tokenizer, adgen_train_path):
    """(formatter, examples): SmolLM2's ChatML format (stop id <|im_end|>), three ended examples and a truncated one."""
    formatter = ChatFormatter(smollm2_tokenizer, system_prompt=None, max_length=160)
    examples = _short_examples(formatter, read_records(adgen_train_path).records[:4], (12, 16, 20, 400))
    assert [e.truncated for e in examples] == [False, False, False, True]
    return formatter, examples


def _tiny_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def _loss_and_grads(model, wrapper, batch):
    model.zero_grad(set_to_none=True)
    total, n = wrapper(batch.input_ids, batch.targets, position_ids=batch.position_ids)
    total.backward()
    return total.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_end_weights_mark_exactly_the_end_of_turn_targets(chatml, llama3_tokenizer, adgen_train_path):
    """In a packed batch, the weighted targets are the last target of every example that ended (its end-of-turn id)
    and nothing else: not prompt-format tokens, not a truncated example's tail. Llama-3 has two stop ids
    (<|end_of_text|>, <|eot_id|>); its responses end on <|eot_id|>."""
    llama3 = ChatFormatter(llama3_tokenizer, system_prompt=None, max_length=96)
    llama3_examples = _short_examples(llama3, read_records(adgen_train_path).records[:4], (12, 16, 20, 400))
    for formatter, examples in (chatml, (llama3, llama3_examples)):
        targets = pack(examples).targets[0]
        kept = targets[targets != IGNORE_INDEX]
        weights = end_token_weights(kept, formatter.stop_token_ids, W)
        ends, offset = [], 0
        for e in examples:
            n = e.num_label_tokens
            if not e.truncated:
                ends.append(offset + n - 1)
                assert e.labels[-1] == formatter.end_of_turn_id
            offset += n
        assert len(ends) == 3 and offset == kept.numel()
        assert torch.nonzero(weights == W).flatten().tolist() == ends
        assert bool((weights[weights != W] == 1).all())
        assert set(kept[ends].tolist()) == {formatter.end_of_turn_id}
    assert llama3.stop_token_ids == [128001, 128009] and llama3.end_of_turn_id == 128009


def test_weighted_fused_and_plain_losses_equal_the_hand_computation(tiny_chatml_dir, chatml, monkeypatch):
    """Weight W on the end-of-turn targets: the fused head + loss and the plain logits -> chunked cross-entropy give
    sum_i w_i CE_i as F.cross_entropy(reduction="none") computes it, loss and every gradient (the head's included),
    over several chunks and fp32 blocks, so the weights are sliced at every chunk / block boundary."""
    import adgen.train.linear_cross_entropy as lce

    formatter, examples = chatml
    model = _tiny_model(tiny_chatml_dir)
    vocab = model.config.vocab_size
    monkeypatch.setattr(lce, "CHUNK_BYTES", 7 * vocab * 4)  # 7 positions per chunk (fp32)
    monkeypatch.setattr(lce, "MATH_ROWS", 3)  # each chunk's softmax in blocks of 3 or 4 rows
    monkeypatch.setattr(lce, "GRAD_ROWS", 2)
    batch = pack(examples)
    kw = {"end_ids": formatter.stop_token_ids, "end_weight": W}
    fused, plain = CausalLMLoss(model, **kw), CausalLMLoss(model, fused_head=False, ce_chunk=11, **kw)
    assert fused.decide_logits_selection(batch) == "target positions only, head fused with the loss"
    assert plain.decide_logits_selection(batch) == "target positions only"
    loss_f, n_f, grads_f = _loss_and_grads(model, fused, batch)
    loss_p, n_p, grads_p = _loss_and_grads(model, plain, batch)
    assert n_f == n_p == sum(e.num_label_tokens for e in examples)  # the normaliser counts targets, not weights

    hidden, tgt = fused.target_hidden(batch.input_ids, batch.targets, position_ids=batch.position_ids)
    weights = end_token_weights(tgt, formatter.stop_token_ids, W)
    assert int((weights == W).sum()) == 3
    h = hidden.detach().requires_grad_()
    head = model.lm_head.weight.detach().requires_grad_()
    hand = (F.cross_entropy(h @ head.T, tgt, reduction="none") * weights).sum()
    hand_gh, hand_gw = torch.autograd.grad(hand, (h, head))
    loss_bound, gh_bound, gw_bound = head_bounds(hidden.detach(), head.detach(), tgt)
    for loss in (loss_f, loss_p):
        assert abs(float(loss) - float(hand)) <= W * loss_bound, (float(loss), float(hand), loss_bound)
    for grads in (grads_f, grads_p):
        assert_within(grads["lm_head.weight"], hand_gw, W * gw_bound, "lm_head.weight")
    row_bound = gh_bound * weights[:, None]
    h2 = hidden.detach().requires_grad_()
    got = lce.linear_cross_entropy_sum(h2, head.detach(), tgt, weights)
    assert_within(torch.autograd.grad(got, h2)[0], hand_gh, row_bound, "hidden gradient (fused)")
    assert_within(got, hand, W * loss_bound, "loss (fused, direct)")
    names = [k for k in grads_p if k != "lm_head.weight"]
    params = dict(model.named_parameters())
    for k, bound in zip(names, backprop_bound(hidden, [params[k] for k in names], row_bound)):
        assert_within(grads_f[k], grads_p[k], bound, k)


def test_weight_one_and_the_eval_loss_are_the_unweighted_loss_bit_for_bit(tiny_chatml_dir, chatml):
    """end_token_weight=1 takes the unweighted path: loss and gradients identical to a loss module without weights,
    on both paths. A weighted module in eval mode (the eval loss) gives the plain token cross-entropy too."""
    formatter, examples = chatml
    model = _tiny_model(tiny_chatml_dir)
    batch = pack(examples)
    for fused_head in (True, False):
        plain = CausalLMLoss(model, fused_head=fused_head)
        one = CausalLMLoss(model, fused_head=fused_head, end_ids=formatter.stop_token_ids, end_weight=1.0)
        weighted = CausalLMLoss(model, fused_head=fused_head, end_ids=formatter.stop_token_ids, end_weight=W)
        for m in (plain, one, weighted):
            m.decide_logits_selection(batch)
        assert (plain.fused_head is not None) == fused_head
        loss0, _, grads0 = _loss_and_grads(model, plain, batch)
        loss1, _, grads1 = _loss_and_grads(model, one, batch)
        assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
        assert all(torch.equal(grads0[k], grads1[k]) for k in grads0)
        loss_w, _, _ = _loss_and_grads(model, weighted, batch)
        assert float(loss_w) > float(loss0)  # 3 more copies of 3 end-of-turn losses (each ~log 49152 here)
        for m in (plain, weighted):
            m.eval()
        with torch.no_grad():
            eval_plain = plain(batch.input_ids, batch.targets, position_ids=batch.position_ids)[0]
            eval_weighted = weighted(batch.input_ids, batch.targets, position_ids=batch.position_ids)[0]
        assert torch.equal(eval_plain, eval_weighted)
        model.train()


def test_only_the_end_rows_of_the_gradient_change():
    """On logits (plain path) the weighted gradient is the unweighted one with the end-of-turn rows times W, exactly
    (W is a power of two); the other rows are untouched. The fused path, on a random head, the same within bounds."""
    import adgen.train.linear_cross_entropy as lce

    torch.manual_seed(0)
    end_ids, vocab, n = (5, 9), 64, 23
    targets = torch.randint(0, vocab, (n,))
    targets[[0, 7, 8, 22]] = torch.tensor([5, 9, 5, 9])
    is_end = (targets == 5) | (targets == 9)  # (with any other position that drew 5 or 9)
    weights = end_token_weights(targets, end_ids, W)
    assert torch.equal(weights, torch.where(is_end, W, 1.0))

    logits = torch.randn(n, vocab, requires_grad=True)
    g_plain = torch.autograd.grad(chunked_cross_entropy_sum(logits, targets, chunk=5), logits)[0]
    g_weighted = torch.autograd.grad(chunked_cross_entropy_sum(logits, targets, chunk=5, weights=weights), logits)[0]
    assert torch.equal(g_weighted[~is_end], g_plain[~is_end])
    assert torch.equal(g_weighted[is_end], W * g_plain[is_end])

    hidden, head = torch.randn(n, 16, requires_grad=True), torch.randn(vocab, 16) * 0.3
    loss_u = lce.linear_cross_entropy_sum(hidden, head, targets)
    gh_u = torch.autograd.grad(loss_u, hidden)[0]
    loss_w = lce.linear_cross_entropy_sum(hidden, head, targets, weights)
    gh_w = torch.autograd.grad(loss_w, hidden)[0]
    loss_bound, gh_bound, _ = head_bounds(hidden.detach(), head, targets)
    assert_within(gh_w[~is_end], gh_u[~is_end], gh_bound[~is_end], "rows of other targets")
    assert_within(gh_w[is_end], W * gh_u[is_end], W * gh_bound[is_end], "end-of-turn rows")
    end_ce = F.cross_entropy(hidden.detach()[is_end] @ head.T, targets[is_end], reduction="sum")
    # |w - u - (W-1) end| <= (W + 1 + W - 1) / 2 one-computation bounds: each of the three sums is one computation
    assert abs(float(loss_w - loss_u - (W - 1) * end_ce)) <= W * loss_bound


def test_end_token_weight_is_a_config_key_from_yaml_and_the_cli(tmp_path):
    from adgen.cli import build_parser
    from adgen.commands.train import build_config
    from adgen.train.config import load_train_config

    args = build_parser().parse_args(["train", "--config", "demo-smollm2-135m", "end_token_weight=3"])
    assert build_config(args).validate().end_token_weight == 3.0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train_data: x.json\nend_token_weight: 2.5\n", encoding="utf-8")
    assert load_train_config(recipe).validate().end_token_weight == 2.5
    assert load_train_config(None, {"train_data": "x.json"}).end_token_weight == 1.0  # the default: unweighted
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"'end_token_weight' must be a finite number > 0"):
            load_train_config(None, [f"end_token_weight={bad}", "train_data=x.json"]).validate()
    with pytest.raises(ConfigError, match=r"'end_token_weight'.*objective=dpo.*end_token_weight=1"):
        load_train_config(None, {"objective": "dpo", "preference_data": "p.jsonl", "end_token_weight": 2}).validate()


def test_a_weighted_run_trains_on_the_weighted_loss_and_evaluates_the_plain_one(tiny_chatml_dir, adgen_train_path,
                                                                              tmp_path, capsys):
    """Through `train`: the objective takes the stop ids from the formatter, the logged train loss is the weighted
    one (higher at step 1, same model), the eval loss is the references' plain cross-entropy (equal at step 0)."""
    import json

    from adgen.train import train

    data = tmp_path / "short.jsonl"
    rows = [{"content": r.content, "summary": r.summary[:40]} for r in read_records(adgen_train_path).records[:4]]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    runs = {}
    for weight in (1.0, W):
        cfg = tiny_config(tiny_chatml_dir, data, tmp_path / f"w{weight:g}", max_length=192, max_samples=4,
                          batch_size=4, max_steps=1, eval_data=str(data), eval_on_start=True, end_token_weight=weight)
        runs[weight] = train(cfg).output_dir
    said = capsys.readouterr().err
    assert "end-of-turn targets <|im_end|> weigh 4x in the loss" in said
    assert train_losses(runs[W])[1] > train_losses(runs[1.0])[1]
    assert eval_losses(runs[W])[0] == eval_losses(runs[1.0])[0]
    assert eval_losses(runs[W])[1] != eval_losses(runs[1.0])[1]  # the weights changed the update
    assert "end_token_weight: 4.0" in (runs[W] / "config.yaml").read_text(encoding="utf-8")
