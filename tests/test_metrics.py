"""adgen.metrics: the field's protocol against a transcription of it, faithfulness and text stats on hand-made cases."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from adgen.errors import DataError
from adgen.metrics import (
    AttributeVocab,
    PredictionRow,
    aggregate,
    extract_attribute_string,
    faithfulness,
    read_predictions,
    score_all,
    score_example,
    score_pair,
    score_predictions,
    text_stats,
)
from adgen.metrics import scoring
from adgen.metrics.text_stats import chinese_share, distinct_n, repetition_rate

# ---------------------------------------------------------------------------------------------
# The reference: LLaMA-Factory's compute_metrics / ChatGLM-6B's, transcribed straight from DESIGN.md §3.


def field_scores(pred: str, label: str) -> dict[str, float]:
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.CRITICAL)
    hypothesis = list(jieba.cut(pred))
    reference = list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    out = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    out["bleu-4"] = round(bleu * 100, 4)
    return out


def field_means(pairs: list[tuple[str, str]]) -> dict[str, float]:
    import numpy as np

    per = [field_scores(p, l) for p, l in pairs]
    return {k: round(float(np.mean([s[k] for s in per])), 4) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}


EDGE_PREDICTIONS = [
    "",
    " ",
    "\n\t \u3000",
    "。。。",
    "Here's a creative advertisement for this dress: simple, elegant and white.",
    "这款连衣裙Here's the copy",
    "白",
    "白色",
    "气质的气质，气质的气质，" * 30,
]


@pytest.fixture(scope="module")
def dev_records(adgen_dev_path: Path) -> list[dict]:
    lines = adgen_dev_path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:80]]


def prediction_pairs(dev_records: list[dict]) -> list[tuple[str, str]]:
    """(prediction, label) pairs on real dev labels: identical, another summary, truncated, shuffled, edge cases."""
    rng = random.Random(0)
    pairs: list[tuple[str, str]] = []
    for i, r in enumerate(dev_records):
        label = r["summary"]
        kind = i % 5
        if kind == 0:
            pred = label
        elif kind == 1:
            pred = dev_records[i - 1]["summary"]
        elif kind == 2:
            pred = label[: max(1, len(label) // 3)]  # truncated generation (max_new_tokens hit)
        elif kind == 3:
            chars = list(label)
            rng.shuffle(chars)
            pred = "".join(chars)
        elif i % 10 == 4:
            pred = f"\n {label} \n"  # stray whitespace around a good generation: counts for BLEU
        else:
            pred = EDGE_PREDICTIONS[(i // 10) % len(EDGE_PREDICTIONS)]
        pairs.append((pred, label))
    pairs += [(p, dev_records[0]["summary"]) for p in EDGE_PREDICTIONS]
    pairs += [(dev_records[1]["summary"], label) for label in ("", "   ", "BRAND <UNK>")]
    return pairs


# ---------------------------------------------------------------------------------------------
# protocol


def test_score_pair_equals_field_code_on_dev_and_edge_cases(dev_records):
    pairs = prediction_pairs(dev_records)
    for pred, label in pairs:
        assert score_pair(pred, label) == field_scores(pred, label), (pred[:30], label[:30])


def test_means_equal_field_code_to_4_decimals(dev_records):
    pairs = prediction_pairs(dev_records)
    summary = score_predictions([{"predict": p, "label": l} for p, l in pairs])
    expected = field_means(pairs)
    assert summary["n"] == len(pairs)
    for key, value in expected.items():
        assert round(summary[key], 4) == value, key


def test_protocol_edge_values():
    assert score_pair("", "白色连衣裙") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    assert score_pair("   ", "白色连衣裙")["rouge-1"] == 0.0
    assert isinstance(score_pair("", "白色")["bleu-4"], float)  # nltk returns int 0 here
    same = score_pair("白色连衣裙，简约大方。", "白色连衣裙，简约大方。")
    assert same == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    english = score_pair("A simple white dress.", "白色连衣裙，简约大方。")
    assert english["rouge-1"] == 0.0 and english["bleu-4"] < 1.0


def test_long_looping_prediction_does_not_fail():
    label = "白色连衣裙，简约大方，显瘦又百搭。"
    pred = "气质的连衣裙，" * 600  # a generation that never stopped
    assert score_pair(pred, label) == field_scores(pred, label)


# ---------------------------------------------------------------------------------------------
# text statistics


def test_chinese_share():
    assert chinese_share("白色连衣裙，简约大方。") == 1.0
    assert chinese_share("Here's a creative advertisement for this dress.") == 0.0
    assert chinese_share("白色dress") == pytest.approx(2 / 7)
    assert chinese_share("123 。，") is None
    assert chinese_share("") is None


def test_repetition_rate():
    # 4-grams of "气质的气质，气质的气质，": 9 in all, 6 distinct.
    assert repetition_rate("气质的气质，气质的气质，") == pytest.approx(1 - 6 / 9)
    assert repetition_rate("气质的气质，" * 20) > 0.9
    assert repetition_rate("白色连衣裙简约大方") == 0.0
    assert repetition_rate("白色") == 0.0
    assert repetition_rate("白色 连衣裙\n白色 连衣裙") == repetition_rate("白色连衣裙白色连衣裙")


def test_distinct_n():
    assert distinct_n("白白黑", 1) == pytest.approx(2 / 3)
    assert distinct_n("白白白", 2) == pytest.approx(1 / 2)
    assert distinct_n("白色连衣裙", 2) == 1.0
    assert distinct_n("白 白", 1) == 0.5  # whitespace is not a character of the copy
    assert distinct_n("白", 2) is None
    stats = text_stats("")
    assert stats == {"chinese_share": None, "repetition_rate": 0.0, "distinct-1": None, "distinct-2": None, "length_chars": 0}
    assert text_stats("白色 dress")["length_chars"] == 8


# ---------------------------------------------------------------------------------------------
# faithfulness


@pytest.fixture(scope="module")
def vocab() -> AttributeVocab:
    return AttributeVocab.default()


def test_contradiction_colour(vocab):
    f = faithfulness([("类型", "裙"), ("颜色", "白色")], "黑色连衣裙，简约大方。", vocab)
    assert f["contradictions"] == [{"key": "颜色", "value": "黑色", "input": ["白色"]}]
    assert f["n_contradictions"] == 1
    assert f["attr_coverage"] == 0.0 and f["attr_missing"] == ["白色"]


def test_full_coverage_no_contradiction(vocab):
    attrs = [("类型", "裙"), ("颜色", "白色"), ("裙长", "连衣裙"), ("衣领型", "v领")]
    f = faithfulness(attrs, "这款白色连衣裙采用V领设计。", vocab)
    assert f["attr_coverage"] == 1.0
    assert f["n_contradictions"] == 0 and f["n_hallucinated"] == 0


def test_supported_variants_are_not_contradictions(vocab):
    # a more specific shade of an input colour, and an input shade named generally
    assert faithfulness([("颜色", "蓝色")], "深蓝色的衬衫", vocab)["n_contradictions"] == 0
    assert faithfulness([("颜色", "米白色")], "白色的衬衫", vocab)["n_contradictions"] == 0
    # vague colour words commit to nothing
    assert faithfulness([("颜色", "白色")], "纯色的设计，白色", vocab)["n_contradictions"] == 0
    assert faithfulness([("类型", "上衣")], "纯色的设计，深色更显瘦", vocab)["n_hallucinated"] == 0


def test_exclusive_groups_and_one_char_values(vocab):
    dress = [("类型", "裙"), ("裙长", "连衣裙")]
    assert faithfulness(dress, "一条长裙", vocab)["n_contradictions"] == 0  # kind vs length: compatible
    # 半身裙 contradicts 连衣裙 even though it contains the 1-character input value 裙
    f = faithfulness(dress, "一条半身裙", vocab)
    assert f["contradictions"] == [{"key": "裙长", "value": "半身裙", "input": ["连衣裙"]}]
    # longest match: 中长裙 is one mention, not 长裙
    f = faithfulness([("裙长", "短裙")], "中长裙的设计", vocab)
    assert [c["value"] for c in f["contradictions"]] == ["中长裙"]
    # ... and "POLO领" is the collar, not the shirt style "polo" followed by 领
    f = faithfulness([("衣领型", "圆领")], "POLO领设计", vocab)
    assert [c["value"] for c in f["contradictions"]] == ["polo领"]
    # non-exclusive keys never contradict
    assert faithfulness([("风格", "复古")], "简约又休闲", vocab)["n_contradictions"] == 0


def test_hallucinated_attributes(vocab):
    f = faithfulness([("类型", "上衣"), ("衣样式", "衬衫")], "红色的衬衫，真丝面料", vocab)
    assert f["hallucinated"] == [{"keys": ["颜色"], "value": "红色"}]
    # style words are not checkable facts
    assert faithfulness([("类型", "上衣")], "复古又简约的衬衫", vocab)["n_hallucinated"] == 0
    # 高腰 is a value of 裙腰型 and 裤腰型: either key in the input makes it a checked fact, not a new one
    trousers = [("类型", "裤")]
    assert faithfulness(trousers, "高腰设计", vocab)["hallucinated"] == [{"keys": ["裙腰型", "裤腰型"], "value": "高腰"}]
    assert faithfulness([*trousers, ("裤腰型", "高腰")], "高腰设计", vocab)["n_hallucinated"] == 0
    f = faithfulness([*trousers, ("裤腰型", "高腰")], "中腰设计", vocab)
    assert (f["n_hallucinated"], f["contradictions"]) == (0, [{"key": "裤腰型", "value": "中腰", "input": ["高腰"]}])
    # 松紧腰 is not a waist height: no contradiction with 高腰
    assert faithfulness([*trousers, ("裤腰型", "高腰")], "松紧腰设计", vocab)["n_contradictions"] == 0


def test_coverage_skips_type_and_counts_values_once(vocab):
    f = faithfulness([("类型", "上衣"), ("颜色", "纯色"), ("图案", "纯色"), ("风格", "复古")], "纯色衬衫", vocab)
    assert f["attr_coverage"] == 0.5 and f["attr_missing"] == ["复古"]
    assert faithfulness([("类型", "上衣")], "衬衫", vocab)["attr_coverage"] is None


def test_english_output(vocab):
    s = score_example({"predict": "Here's a creative ad: a white V-neck dress.", "label": "白色连衣裙", "content": "类型#裙*颜色#白色"})
    assert s["chinese_share"] == 0.0
    assert s["attr_coverage"] == 0.0  # "white" is not 白色


# ---------------------------------------------------------------------------------------------
# vocabulary


def test_default_vocab_is_small_and_sane(vocab):
    assert vocab.values["颜色"]["白色"] >= 2 and "黑色" in vocab.values["颜色"]
    assert all(n >= vocab.min_count for vs in vocab.values.values() for n in vs.values())
    assert 10 < sum(map(len, vocab.values.values())) < 1000
    assert vocab.keys_of("V领") == {"衣领型", "裙领型"}
    assert vocab.keys_of("潮") == frozenset()  # 1-character values are never matched


def test_default_vocab_is_what_the_script_builds(tmp_path, adgen_train_path):
    import runpy

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_attribute_vocab.py"
    out = tmp_path / "vocab.json"
    runpy.run_path(str(script), run_name="build")["main"](["--train", str(adgen_train_path), "--out", str(out)])
    shipped = Path(__file__).resolve().parents[1] / "adgen" / "resources" / "attribute_vocab.json"
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(shipped.read_text(encoding="utf-8"))


def test_vocab_from_records_save_load(tmp_path):
    class Rec:  # anything with .attributes, like adgen.data.records.Record
        attributes = [("颜色", "白色"), ("风格", "简约")]

    vocab = AttributeVocab.from_records([Rec(), "颜色#白色*颜色#黑色", [("颜色", "黑色")], "风格#潮"], min_count=2, source="t")
    assert vocab.values == {"颜色": {"白色": 2, "黑色": 2}}
    path = tmp_path / "v.json"
    vocab.save(path)
    again = AttributeVocab.load(path)
    assert again == vocab
    assert faithfulness([("颜色", "白色")], "黑色", again)["n_contradictions"] == 1


def test_vocab_load_errors(tmp_path):
    with pytest.raises(DataError, match="no such"):
        AttributeVocab.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"颜色": ["白色"]}', encoding="utf-8")
    with pytest.raises(DataError, match="not an adgen attribute vocabulary"):
        AttributeVocab.load(bad)


# ---------------------------------------------------------------------------------------------
# prediction files and aggregation


def test_extract_attribute_string():
    llama3 = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n类型#裙*颜色#白色*衣领型#v领<|eot_id|>"
    assert extract_attribute_string(llama3) == "类型#裙*颜色#白色*衣领型#v领"
    chatml = "<|im_start|>system\n你是文案#写手<|im_end|>\n<|im_start|>user\n输入：类型#裤*裤长#九分裤<|im_end|>"
    assert extract_attribute_string(chatml) == "类型#裤*裤长#九分裤"
    assert extract_attribute_string("写一段广告") is None
    # adgen's own system prompt explains the format with "属性#取值": the input after it wins
    from adgen.data.chat import DEFAULT_SYSTEM_PROMPT

    prompt = f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n类型#裙<|im_end|>\n<|im_start|>assistant\n"
    assert extract_attribute_string(prompt) == "类型#裙"


def test_read_predictions(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "user\n\n类型#裙*颜色#白色<|eot_id|>", "predict": "白色", "label": "白色裙子"},
        {"content": "类型#裙*颜色#黑色", "predict": "", "label": "黑色"},
        {"predict": "x", "label": "y"},
    ]
    path.write_bytes(("\ufeff" + "\r\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\r\n\r\n").encode())
    rows = read_predictions(path)
    assert [r.attributes for r in rows] == [[("类型", "裙"), ("颜色", "白色")], [("类型", "裙"), ("颜色", "黑色")], None]
    assert [r.line for r in rows] == [1, 2, 3]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"p\.jsonl:2: not valid JSON"),
        ('{"pred": "a", "label": "b"}', r"p\.jsonl:2: no 'predict' field.*--pred-field"),
        ('{"predict": "a", "label": null}', r"p\.jsonl:2: 'label' must be a string"),
        ('{"predict": "a", "label": "b", "content": "类型裙"}', r"p\.jsonl:2: bad \"content\""),
        ("[1, 2]", r"p\.jsonl:2: expected a JSON object"),
    ],
)
def test_read_predictions_errors_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "p.jsonl"
    path.write_text('{"predict": "a", "label": "b"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=match):
        read_predictions(path)


def test_aggregate_means_and_faithfulness_keys(vocab):
    rows = [
        {"predict": "黑色、红色连衣裙", "label": "白色连衣裙", "content": "类型#裙*颜色#白色"},
        {"predict": "白色连衣裙，红色腰带", "label": "白色连衣裙", "content": "类型#裙*颜色#白色*裙长#连衣裙"},
        {"predict": "", "label": "白色连衣裙", "content": "类型#裙*颜色#白色"},
        {"predict": "Plain English.", "label": "白色连衣裙"},  # no input: left out of the attribute means
    ]
    per = score_all(rows, vocab)
    summary = aggregate(per)
    assert summary["n"] == 4 and summary["n_with_attributes"] == 3
    assert summary["attr_coverage"] == pytest.approx((0 + 1 + 0) / 3)
    assert summary["attr_contradiction_rate"] == pytest.approx(2 / 3)  # 黑色 + 红色; 红色 vs 白色
    assert summary["contradictions_per_example"] == pytest.approx((2 + 1 + 0) / 3)
    assert summary["chinese_share"] == pytest.approx((1 + 1 + 0) / 3)  # the empty text has none
    assert summary["rouge-1"] == pytest.approx(sum(p["rouge-1"] for p in per) / 4)
    plain = score_predictions([PredictionRow("白色", "白色")])
    assert "attr_coverage" not in plain and plain["bleu-4"] == field_scores("白色", "白色")["bleu-4"]


def test_parallel_scoring_gives_identical_numbers(dev_records, monkeypatch):
    rows = [{"predict": p, "label": l, "content": r["content"]} for (p, l), r in zip(prediction_pairs(dev_records), dev_records)]
    rows = rows[:24]
    serial = score_all(rows)
    monkeypatch.setattr(scoring, "_PARALLEL_MIN_ROWS", 1)
    assert score_all(rows, workers=2) == serial


def test_every_example_is_checked_for_forbidden_terms_in_workers_too(monkeypatch):
    rows = [{"predict": "顶级面料" if i % 3 == 0 else "耐克同款" if i % 3 == 1 else "白色连衣裙", "label": "白色连衣裙"}
            for i in range(6)]
    serial = score_all(rows, forbidden_terms=["耐克"])
    assert [s["compliance_terms"] for s in serial[:3]] == [["顶级"], ["耐克"], []]
    monkeypatch.setattr(scoring, "_PARALLEL_MIN_ROWS", 1)
    assert score_all(rows, workers=2, forbidden_terms=["耐克"]) == serial  # the merchant's list reaches the workers
    summary = aggregate(serial)
    assert summary["compliance_violation_rate"] == pytest.approx(4 / 6)
