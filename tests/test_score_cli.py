"""`adgen score`: the field's numbers on a prediction file, in-process and as the installed command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adgen.cli import main

PROTOCOL = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
EDGE_PREDICTIONS = ["", " ", "\n\t", "。。。", "Here's a creative advertisement for this dress.", "气质的气质，" * 40]


def field_means(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """The field's protocol (DESIGN.md §3), transcribed: per-example scores, then round(np.mean, 4)."""
    import logging

    import jieba
    import numpy as np
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.CRITICAL)
    scores: dict[str, list[float]] = {k: [] for k in PROTOCOL}
    for pred, label in pairs:
        hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for k, v in result.items():
            scores[k].append(round(v["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"].append(round(bleu * 100, 4))
    return {k: round(float(np.mean(v)), 4) for k, v in scores.items()}


@pytest.fixture(scope="module")
def prediction_file(tmp_path_factory, adgen_dev_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A LLaMA-Factory-style generated_predictions.jsonl on real dev labels, with the edge cases."""
    records = [json.loads(line) for line in adgen_dev_path.read_text(encoding="utf-8").splitlines()[:40]]
    rows, pairs = [], []
    for i, r in enumerate(records):
        label = r["summary"]
        options = [label, records[i - 1]["summary"], label[: len(label) // 2], *EDGE_PREDICTIONS]
        pred = options[i % len(options)]
        prompt = f"<|start_header_id|>user<|end_header_id|>\n\n{r['content']}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        rows.append({"prompt": prompt, "predict": pred, "label": label})
        pairs.append((pred, label))
    path = tmp_path_factory.mktemp("score") / "generated_predictions.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")
    return path, pairs


def run_json(capsys, *argv: str) -> dict:
    assert main(["score", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_equals_field_code(capsys, prediction_file):
    path, pairs = prediction_file
    summary = run_json(capsys, str(path))
    assert summary["n"] == len(pairs)
    expected = field_means(pairs)
    assert {k: round(summary[k], 4) for k in PROTOCOL} == expected
    # the prompts carry the attributes, so faithfulness is scored for every line
    assert summary["n_with_attributes"] == len(pairs)
    for key in ("attr_coverage", "attr_contradiction_rate", "contradictions_per_example", "hallucinated_per_example"):
        assert isinstance(summary[key], float)
    for key in ("chinese_share", "repetition_rate", "distinct-1", "distinct-2", "length_chars"):
        assert isinstance(summary[key], float)


def test_field_options_and_no_attributes(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    pairs = [("白色连衣裙", "白色的连衣裙，简约大方"), ("", "黑色"), ("A white dress", "白色连衣裙")]
    path.write_text("".join(json.dumps({"output": p, "target": l}) + "\n" for p, l in pairs), encoding="utf-8")
    summary = run_json(capsys, str(path), "--pred-field", "output", "--label-field", "target")
    assert {k: round(summary[k], 4) for k in PROTOCOL} == field_means(pairs)
    assert "attr_coverage" not in summary and "n_with_attributes" not in summary


def test_content_gives_faithfulness(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"content": "类型#裙*颜色#白色", "predict": "黑色连衣裙", "label": "白色连衣裙"},
        {"content": "类型#裙*颜色#白色", "predict": "白色连衣裙", "label": "白色连衣裙"},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "per.jsonl"
    summary = run_json(capsys, str(path), "--per-example", str(out))
    assert summary["attr_coverage"] == 0.5
    assert summary["attr_contradiction_rate"] == 0.5
    per = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [p["line"] for p in per] == [1, 2]
    assert per[0]["contradictions"] == [{"key": "颜色", "value": "黑色", "input": ["白色"]}]


def test_table_output(capsys, prediction_file):
    path, pairs = prediction_file
    assert main(["score", str(path)]) == 0
    out = capsys.readouterr().out
    expected = field_means(pairs)
    for key in PROTOCOL:
        assert key in out and f"{expected[key]:.4f}" in out
    assert "attr_coverage" in out


def test_bad_line_is_a_clear_error(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"predict": "a", "label": "b"}\n\n{"predict": "a"}\n', encoding="utf-8")
    assert main(["score", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: no 'label' field" in err and "--label-field" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_installed_command(prediction_file):
    path, pairs = prediction_file
    adgen = Path(sys.executable).with_name("adgen")
    assert adgen.exists(), f"{adgen}: the adgen console script is not installed in this environment"
    proc = subprocess.run([str(adgen), "score", str(path), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert {k: round(summary[k], 4) for k in PROTOCOL} == field_means(pairs)
    assert "Building prefix dict" not in proc.stderr  # jieba's startup chatter is silenced


def test_table_shows_the_compliance_rate_and_terms(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"predict": "顶级面料，最佳选择", "label": "白色连衣裙"}, {"predict": "白色连衣裙", "label": "白色连衣裙"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert main(["score", str(path)]) == 0
    out = capsys.readouterr().out
    assert "compliance_violation_rate" in out and "0.5000" in out
    assert "最佳 ×1" in out and "顶级 ×1" in out and "adgen-ad-law-absolute-terms" in out
