"""DPO: pairs from the model's own samples (`adgen pairs`), the loss in adgen's loop, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import read_metrics, tiny_config, train_losses

from adgen.errors import ConfigError, DataError

CONTENT = "类型#裙*颜色#黑色*风格#简约*裙长#连衣裙"
GOOD = "这款黑色连衣裙简约大方，版型利落，穿出优雅气质。"
WRONG_COLOUR = "这款白色连衣裙简约大方，穿出优雅气质。"
LOOP = "这款连衣裙穿着舒适，" * 12


def test_chosen_ends_and_covers_rejected_is_the_loop():
    from adgen.metrics import AttributeVocab
    from adgen.train.pairs import choose_pair

    row = {"line": 3, "content": CONTENT, "candidates": [WRONG_COLOUR, LOOP, GOOD],
           "candidate_finish_reasons": ["stop", "length", "stop"]}
    pair, why = choose_pair(row, AttributeVocab.default())
    assert why == "" and pair["chosen"] == GOOD and pair["rejected"] == LOOP
    assert pair["rejected_finish"] == "length" and "never stopped" in pair["why_kinds"] and pair["line"] == 3
    # without the loop, the contradicting one is rejected
    row = {**row, "candidates": [WRONG_COLOUR, GOOD], "candidate_finish_reasons": ["stop", "stop"]}
    pair, _ = choose_pair(row, AttributeVocab.default())
    assert pair["rejected"] == WRONG_COLOUR and pair["why_kinds"][0] == "contradicts"


def test_no_pair_without_a_good_sample_unless_the_reference_stands_in():
    from adgen.metrics import AttributeVocab
    from adgen.train.pairs import PairRules, choose_pair

    row = {"content": CONTENT, "summary": GOOD, "candidates": [LOOP, WRONG_COLOUR],
           "candidate_finish_reasons": ["length", "stop"]}
    pair, why = choose_pair(row, AttributeVocab.default())
    assert pair is None and why == "no sample fit to be chosen"
    pair, _ = choose_pair(row, AttributeVocab.default(), PairRules(reference_fallback=True))
    assert pair["chosen"] == GOOD and pair["chosen_source"] == "reference" and pair["rejected"] == LOOP


def test_pairs_cli_writes_pairs_and_a_summary(tmp_path, capsys):
    from adgen.cli import main

    gen = tmp_path / "samples.jsonl"
    rows = [{"line": 1, "content": CONTENT, "candidates": [LOOP, GOOD], "candidate_finish_reasons": ["length", "stop"]},
            {"line": 2, "content": CONTENT, "candidates": [GOOD, GOOD], "candidate_finish_reasons": ["stop", "stop"]}]
    gen.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--input", str(gen), "--output", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [p["line"] for p in lines] == [1]
    said = capsys.readouterr().out
    assert "1 pairs from 2 records" in said and "no sample fit to be rejected: 1" in said


def test_read_pairs_names_the_line_and_the_fix(tmp_path):
    from adgen.train.pairs import read_pairs

    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"content": CONTENT, "chosen": GOOD, "rejected": LOOP}, ensure_ascii=False) + "\n"
                 + json.dumps({"content": CONTENT, "chosen": GOOD}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: missing or empty rejected"):
        read_pairs(p)


def test_dpo_config_needs_pairs_and_a_positive_beta(tiny_llama3_dir, adgen_train_path, tmp_path):
    with pytest.raises(ConfigError, match="preference_data"):
        tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "a", objective="dpo").validate()
    with pytest.raises(ConfigError, match="dpo_beta"):
        tiny_config(tiny_llama3_dir, adgen_train_path, tmp_path / "a", objective="dpo",
                    preference_data="p.jsonl", dpo_beta=0).validate()


def test_sequence_logps_are_the_same_packed_padded_and_one_by_one(tiny_llama3_dir, llama3_tokenizer):
    from transformers import AutoModelForCausalLM

    from adgen.data.chat import ChatFormatter
    from adgen.train.dpo import collate_pairs, encode_pairs, sequence_logps
    from adgen.train.loss import CausalLMLoss
    from adgen.train.pairs import PreferencePair

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama3_dir), dtype=torch.float32).eval()
    fmt = ChatFormatter(llama3_tokenizer, system_prompt=None, max_length=64)
    pairs, _ = encode_pairs(fmt, [PreferencePair(CONTENT, GOOD, LOOP), PreferencePair(CONTENT, WRONG_COLOUR, GOOD[:9], True, True)])
    assert pairs[0].chosen.input_ids[-1] == fmt.end_of_turn_id  # ended: the end-of-turn token is scored
    assert pairs[0].rejected.truncated  # the loop was cut: no end-of-turn token
    lm = CausalLMLoss(model)
    with torch.no_grad():
        packed = collate_pairs(pairs, "packed", 0)
        padded = collate_pairs(pairs, "padded", 0)
        a = sequence_logps(lm, packed, packed.counts)
        b = sequence_logps(lm, padded, padded.counts)
        one = []
        for ex in [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]:
            ids = torch.tensor([ex.input_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            start = next(i for i, x in enumerate(ex.labels) if x != -100)
            one.append(sum(float(logp[t - 1, ex.input_ids[t]]) for t in range(start, len(ex.input_ids))))
    assert a.tolist() == pytest.approx(one, abs=1e-3) and b.tolist() == pytest.approx(one, abs=1e-3)


def _pair_file(path, train_path, n=8):
    """Chosen = the reference copy (ended); rejected = a loop of its first characters (cut at the limit)."""
    from adgen.data.records import read_records

    lines = []
    for r in read_records(train_path).records[:n]:
        lines.append({"content": r.content, "chosen": r.summary[:30], "rejected": (r.summary[:4] + "，") * 8,
                      "chosen_finish": "stop", "rejected_finish": "length"})
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return path


def _dpo(model_dir, train_path, out, pairs, **over):
    return tiny_config(model_dir, train_path, out, objective="dpo", preference_data=str(pairs), dpo_beta=0.5,
                       max_length=96, **over)


def test_dpo_starts_at_log2_and_learns_to_prefer_the_chosen_copy(tiny_llama3_dir, adgen_train_path, tmp_path):
    from adgen.train import train

    pairs = _pair_file(tmp_path / "pairs.jsonl", adgen_train_path)
    out = tmp_path / "dpo"
    result = train(_dpo(tiny_llama3_dir, adgen_train_path, out, pairs, max_steps=8, lr=1e-2))
    rows = [r for r in read_metrics(out) if "loss" in r]
    # step 1: the policy is the reference, so every margin is 0 and the loss is log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and rows[0]["reward_margin"] == pytest.approx(0, abs=1e-4)
    assert rows[-1]["loss"] < 0.5 * math.log(2) and rows[-1]["reward_accuracy"] == 1.0 and rows[-1]["reward_margin"] > 0
    assert result.summary["objective"] == "dpo" and (out / "reference_logps.json").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_full_dpo_resumed_equals_uninterrupted(tiny_llama3_dir, adgen_train_path, tmp_path, monkeypatch):
    """method=full: after the resume the model has trained, so the reference must come from the run directory."""
    from adgen.train import checkpoint as ckpt_mod
    from adgen.train import train

    pairs = _pair_file(tmp_path / "pairs.jsonl", adgen_train_path)
    over = {"method": "full", "max_steps": 4, "save_every": 2, "keep_checkpoints": 3, "lr": 1e-3}
    train(_dpo(tiny_llama3_dir, adgen_train_path, tmp_path / "a", pairs, **over))
    original = ckpt_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = original(*args, **kwargs)
        if args[2] == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_dpo(tiny_llama3_dir, adgen_train_path, tmp_path / "b", pairs, **over))
    monkeypatch.setattr(ckpt_mod, "save_checkpoint", original)
    train(_dpo(tiny_llama3_dir, adgen_train_path, tmp_path / "b", pairs, **over), resume=True)
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert a[4] < a[1]


def test_text_with_an_unknown_token_marker_is_never_chosen():
    from adgen.metrics import AttributeVocab
    from adgen.train.pairs import choose_pair

    broken = GOOD.replace("版型", "<UNK>")
    row = {"content": CONTENT, "candidates": [broken, GOOD, LOOP], "candidate_finish_reasons": ["stop", "stop", "length"]}
    pair, _ = choose_pair(row, AttributeVocab.default())
    assert pair["chosen"] == GOOD
    row = {"content": CONTENT, "candidates": [broken, WRONG_COLOUR], "candidate_finish_reasons": ["stop", "stop"]}
    assert choose_pair(row, AttributeVocab.default())[0] is None
