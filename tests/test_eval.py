"""adgen eval: the run directory (predictions, metrics.json, report.md), honest metrics, resume."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from adgen.cli import main
from adgen.errors import AdgenError
from adgen.generation import DecodingConfig, Generation

N_TINY = 6

from fake_generator import FakeGeneratorBase


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- a stub generator: fast, and with texts that score non-trivially -------------------------


class StubGenerator(FakeGeneratorBase):
    """Answers from a content -> label map: part of the label plus one input value (known scores)."""

    backend = "stub"

    def __init__(self, labels: dict[str, str], *, fail_after_calls: int | None = None, batch_size: int = 2,
                 model_name: str = "stub-model") -> None:
        self.labels = labels
        self.batch_size = batch_size
        self.model_name = model_name
        self.adapter = None
        self.calls: list[list[str]] = []
        self.fail_after_calls = fail_after_calls

    @staticmethod
    def text_for(content: str, label: str) -> str:
        # Varies per record: a prefix of the label whose length depends on the content, plus a value.
        cut = 5 + (len(content) * 7) % 30
        return label[:cut] + content.split("*")[-1].split("#")[-1]

    def generate(self, prompts, config):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt  # a kill in the middle of the run
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            text = self.text_for(p, self.labels[p])
            finish = "length" if len(p) % 3 == 0 else "stop"
            out.append(Generation(text, len(p), len(text) // 2 + 1, finish))
        return out


@pytest.fixture(scope="module")
def dev_records(adgen_dev_path):
    from adgen.data.records import read_records

    return read_records(adgen_dev_path).records[:8]


@pytest.fixture()
def stub(dev_records):
    return StubGenerator({r.content: r.summary for r in dev_records})


# ---- the tiny model, end to end through the CLI ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama3_dir, adgen_dev_path):
    out = tmp_path_factory.mktemp("eval") / "tiny-run"
    rc = main([
        "eval", "--model", str(tiny_llama3_dir), "--data", str(adgen_dev_path), "--limit", str(N_TINY),
        "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu", "--output-dir", str(out), "--no-progress",
    ])
    assert rc == 0
    return out


def test_tiny_eval_writes_all_three_artefacts(tiny_run, adgen_dev_path, tiny_llama3_dir):
    from adgen.data.records import read_records

    names = sorted(p.name for p in tiny_run.iterdir())
    assert names == ["generated_predictions.jsonl", "metrics.json", "report.md"]  # no partial/state left
    rows = _rows(tiny_run / "generated_predictions.jsonl")
    records = read_records(adgen_dev_path).records[:N_TINY]
    assert len(rows) == N_TINY  # --limit: the first N records, one row each, in input order
    assert [r["line"] for r in rows] == [rec.line for rec in records]
    assert [r["content"] for r in rows] == [rec.content for rec in records]
    assert [r["label"] for r in rows] == [rec.summary for rec in records]
    for r in rows:
        assert {"prompt", "predict", "finish_reason", "rouge-l", "bleu-4", "attr_coverage"} <= set(r)
        assert r["content"] in r["prompt"] and r["prompt"].startswith("<|begin_of_text|>")
        assert 1 <= r["completion_tokens"] <= 6
    m = json.loads((tiny_run / "metrics.json").read_text(encoding="utf-8"))
    assert m["n"] == m["metrics"]["n"] == N_TINY
    assert m["data"]["sha256"] == _sha256(adgen_dev_path)
    assert m["data"]["path"] == str(Path(adgen_dev_path).resolve())
    assert m["data"]["limit"] == N_TINY and m["data"]["records_in_file"] == 1070
    assert m["model"] == str(tiny_llama3_dir) and m["adapter"] is None
    assert m["decoding"]["max_new_tokens"] == 6 and m["decoding"]["greedy"] is True
    assert m["protocol"].startswith("jieba+rouge_chinese f*100")
    assert m["engine"] == {"backend": "hf", "device": "cpu", "dtype": "float32", "batch_size": 4,
                           "continuous_batching": True}
    t = m["timings"]
    tokens = sum(r["completion_tokens"] for r in rows)
    assert t["generated_tokens"] == tokens and t["generated_records"] == N_TINY
    assert t["tokens_per_s"] == pytest.approx(tokens / t["generation_s"], rel=0.01)
    assert t["samples_per_s"] == pytest.approx(N_TINY / t["generation_s"], rel=0.01)
    length = sum(r["finish_reason"] == "length" for r in rows)
    assert m["hit_max_new_tokens_share"] == pytest.approx(length / N_TINY)
    report = (tiny_run / "report.md").read_text(encoding="utf-8")
    assert "| ROUGE-L" in report and "## Best 3 by ROUGE-L" in report and "## Worst 3 by ROUGE-L" in report
    assert f"{length}/{N_TINY} outputs" in report


def _check_metrics_match_recomputed(run_dir: Path) -> None:
    """The honest check: recompute every mean from predict/label/content in the predictions file."""
    from adgen.data.attributes import parse_attributes
    from adgen.metrics import AttributeVocab, faithfulness, read_predictions, score_pair, score_predictions, text_stats

    m = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["metrics"]
    rows = _rows(run_dir / "generated_predictions.jsonl")
    # 1. by hand, from the library's per-example functions
    pairs = [score_pair(r["predict"], r["label"]) for r in rows]
    for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert m[key] == pytest.approx(statistics.fmean(p[key] for p in pairs), abs=1e-9), key
        assert [r[key] for r in rows] == [p[key] for p in pairs]  # per-example scores are the protocol's
    stats = [text_stats(r["predict"]) for r in rows]
    for key in ("length_chars", "distinct-1", "repetition_rate"):
        vals = [s[key] for s in stats if s[key] is not None]
        assert m[key] == pytest.approx(statistics.fmean(vals), abs=1e-9), key
    vocab = AttributeVocab.default()
    faith = [faithfulness(parse_attributes(r["content"]), r["predict"], vocab) for r in rows]
    cov = [f["attr_coverage"] for f in faith if f["attr_coverage"] is not None]
    assert m["attr_coverage"] == pytest.approx(statistics.fmean(cov), abs=1e-9)
    assert m["attr_contradiction_rate"] == pytest.approx(statistics.fmean(f["n_contradictions"] > 0 for f in faith))
    # 2. as `adgen score` would, from the file alone
    again = score_predictions(read_predictions(run_dir / "generated_predictions.jsonl"))
    assert set(again) == set(m)
    for key, value in again.items():
        assert (value is None and m[key] is None) or m[key] == pytest.approx(value, abs=1e-9), key


def test_eval_without_continuous_batching_writes_the_same_predictions(tiny_run, tmp_path, tiny_llama3_dir,
                                                                      adgen_dev_path):
    out = tmp_path / "padded"
    assert main(["eval", "--model", str(tiny_llama3_dir), "--data", str(adgen_dev_path), "--limit", str(N_TINY),
                 "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu", "--output-dir", str(out),
                 "--no-progress", "--no-continuous-batching"]) == 0
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["engine"]["continuous_batching"] is False
    keep = ("line", "predict", "finish_reason", "completion_tokens")
    assert ([{k: r[k] for k in keep} for r in _rows(out / "generated_predictions.jsonl")]
            == [{k: r[k] for k in keep} for r in _rows(tiny_run / "generated_predictions.jsonl")])


def test_tiny_eval_metrics_match_recomputed(tiny_run):
    _check_metrics_match_recomputed(tiny_run)


def test_stub_eval_metrics_match_recomputed_and_rows_follow_records(tmp_path, stub, dev_records, adgen_dev_path):
    from adgen.evaluation import run_eval

    result = run_eval(stub, dev_records[:6], tmp_path / "run", DecodingConfig(max_new_tokens=8), data_path=adgen_dev_path)
    rows = _rows(tmp_path / "run" / "generated_predictions.jsonl")
    assert len(rows) == 6 and rows == json.loads(json.dumps(result.rows))
    # generation runs longest-first in batches; every row must still hold its own record's text
    for r, rec in zip(rows, dev_records[:6]):
        assert (r["line"], r["content"], r["label"]) == (rec.line, rec.content, rec.summary)
        assert r["predict"] == StubGenerator.text_for(rec.content, rec.summary)
    assert sorted(len(c) for call in stub.calls for c in call) == sorted(len(r.content) for r in dev_records[:6])
    m = result.metrics["metrics"]
    assert 5 < m["rouge-l"] < 100 and m["bleu-4"] > 0  # non-trivial numbers, so the check below means something
    _check_metrics_match_recomputed(tmp_path / "run")


def test_report_shows_best_and_worst_by_rouge_l(tmp_path, stub, dev_records):
    from adgen.evaluation import run_eval

    result = run_eval(stub, dev_records[:6], tmp_path / "run", DecodingConfig(max_new_tokens=8))
    report = result.report_path.read_text(encoding="utf-8")
    by_score = sorted(result.rows, key=lambda r: (-r["rouge-l"], -r["bleu-4"], r["index"]))
    best, worst = report.split("## Best 3 by ROUGE-L")[1].split("## Worst 3 by ROUGE-L")
    for r in by_score[:3]:
        assert r["predict"] in best and r["predict"] not in worst
    for r in by_score[3:]:
        assert r["predict"] in worst
    first_best = best.index(by_score[0]["predict"])
    assert all(first_best < best.index(r["predict"]) for r in by_score[1:3])
    length = sum(r["finish_reason"] == "length" for r in result.rows)
    assert 0 < length < 6
    assert f"{length}/6 outputs ({length / 6:.0%}) hit max_new_tokens=8" in report
    assert "greedy, max_new_tokens=8" in report


# ---- resume ----------------------------------------------------------------------------------


def test_killed_eval_resumes_and_gives_the_same_artefacts(tmp_path, dev_records):
    from adgen.evaluation import run_eval

    labels = {r.content: r.summary for r in dev_records}
    records = dev_records[:7]
    config = DecodingConfig(max_new_tokens=8)
    full = run_eval(StubGenerator(labels), records, tmp_path / "full", config)

    run_dir = tmp_path / "killed"
    dying = StubGenerator(labels, fail_after_calls=2)  # batch size 2: 4 records done, then a "kill"
    with pytest.raises(KeyboardInterrupt):
        run_eval(dying, records, run_dir, config)
    partial = run_dir / "generations.partial.jsonl"
    assert len(_rows(partial)) == 4
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "generated_predictions.jsonl").exists()
    with open(partial, "ab") as f:  # a kill in the middle of a write leaves half a line
        f.write(b'{"line": 99, "content": "\xe7\xb1')

    again = StubGenerator(labels)
    result = run_eval(again, records, run_dir, config)
    assert sum(len(c) for c in again.calls) == 3  # only the missing records were generated
    assert result.metrics["timings"]["resumed_records"] == 4
    assert result.metrics["timings"]["generated_records"] == 3
    assert result.rows == full.rows
    assert result.metrics["metrics"] == full.metrics["metrics"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["generated_predictions.jsonl", "metrics.json", "report.md"]


def test_other_settings_or_finished_run_in_the_dir_is_an_error(tmp_path, dev_records):
    from adgen.evaluation import run_eval

    labels = {r.content: r.summary for r in dev_records}
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_eval(StubGenerator(labels, fail_after_calls=1), dev_records[:4], run_dir, DecodingConfig(max_new_tokens=8))
    with pytest.raises(AdgenError, match=r"different run \(decoding.max_new_tokens: 8 -> 16\)"):
        run_eval(StubGenerator(labels), dev_records[:4], run_dir, DecodingConfig(max_new_tokens=16))
    done = run_eval(StubGenerator(labels), dev_records[:4], run_dir, DecodingConfig(max_new_tokens=16), overwrite=True)
    assert done.metrics["timings"]["resumed_records"] == 0
    with pytest.raises(AdgenError, match="already holds a finished evaluation"):
        run_eval(StubGenerator(labels), dev_records[:4], run_dir, DecodingConfig(max_new_tokens=16))


# ---- vocabulary choice, CLI errors -----------------------------------------------------------


def test_vocab_comes_from_option_then_adapter_run_then_builtin(tmp_path):
    from adgen.evaluation import resolve_vocab
    from adgen.evaluation.run import BUILTIN_VOCAB
    from adgen.metrics import AttributeVocab

    train_out = tmp_path / "train-out"
    (train_out / "adapter").mkdir(parents=True)
    (train_out / "checkpoints" / "step-4" / "adapter").mkdir(parents=True)
    AttributeVocab.from_records(["颜色#红色"] * 2).save(train_out / "attribute_vocab.json")
    explicit = tmp_path / "mine.json"
    AttributeVocab.from_records(["颜色#蓝色"] * 3).save(explicit)

    vocab, source = resolve_vocab(None, train_out / "adapter")
    assert source == str((train_out / "attribute_vocab.json").resolve()) and vocab.values == {"颜色": {"红色": 2}}
    _, source = resolve_vocab(None, train_out / "checkpoints" / "step-4" / "adapter")
    assert source == str((train_out / "attribute_vocab.json").resolve())
    vocab, source = resolve_vocab(explicit, train_out / "adapter")
    assert source == str(explicit.resolve()) and vocab.values == {"颜色": {"蓝色": 3}}
    vocab, source = resolve_vocab(None, tmp_path / "elsewhere")
    assert source == BUILTIN_VOCAB and vocab is AttributeVocab.default()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--limit", "0"], "--limit must be >= 1"),
        (["--data", "/nonexistent/dev.json"], "/nonexistent/dev.json"),
        (["--vocab", "/nonexistent/vocab.json"], "no such attribute vocabulary"),
    ],
)
def test_cli_errors_are_clear_and_early(tmp_path, adgen_dev_path, capsys, extra, message):
    args = ["eval", "--model", "/nonexistent-model", "--data", str(adgen_dev_path), "-o", str(tmp_path / "x"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("adgen: error:") and message in err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_finished_run_dir_before_loading_the_model(tmp_path, adgen_dev_path, capsys):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}", encoding="utf-8")
    rc = main(["eval", "--model", "/nonexistent-model", "--data", str(adgen_dev_path), "-o", str(tmp_path / "done")])
    assert rc == 2 and "already holds a finished evaluation" in capsys.readouterr().err


# ---- the real built-in model -----------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_eval_20_dev_records_via_cli(tmp_path, smollm2_dir, adgen_dev_path):
    import subprocess

    out = tmp_path / "smol"
    proc = subprocess.run(
        [sys.executable, "-m", "adgen", "eval", "--model", "smollm2-135m", "--data", str(adgen_dev_path),
         "--limit", "20", "--max-new-tokens", "48", "--batch-size", "10", "--output-dir", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=1500,  # a hang guard: 1-2 min on 2 idle cores
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROUGE-L" in proc.stdout and "samples/s" in proc.stdout  # the summary table
    rows = _rows(out / "generated_predictions.jsonl")
    assert len(rows) == 20 and all(r["prompt"].count("<|im_start|>") >= 2 for r in rows)  # ChatML prompt
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["n"] == 20 and m["model"] == "smollm2-135m" and m["data"]["sha256"] == _sha256(adgen_dev_path)
    assert all(math.isfinite(m["metrics"][k]) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"))
    assert m["timings"]["tokens_per_s"] > 0
    assert "## Worst 3 by ROUGE-L" in (out / "report.md").read_text(encoding="utf-8")
