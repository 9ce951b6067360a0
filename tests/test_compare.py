"""adgen compare: the markdown table (right numbers, best bold, deltas), the PNG chart, clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from adgen.cli import main
from adgen.errors import AdgenError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(rouge_l: float, coverage: float, repetition: float, *, sha: str = "ab" * 32, n: int = 20,
             tokens_per_s: float = 50.0, hit_max: float = 0.5) -> dict:
    """A metrics.json as `adgen eval` writes it (only the fields compare reads, plus context)."""
    return {
        "format": "adgen-eval",
        "protocol": "jieba+rouge_chinese f*100, nltk sentence_bleu char method3 *100, mean over examples",
        "n": n,
        "metrics": {
            "n": n, "rouge-1": rouge_l + 6.0, "rouge-2": rouge_l / 4, "rouge-l": rouge_l, "bleu-4": rouge_l / 3,
            "chinese_share": 0.9, "repetition_rate": repetition, "distinct-1": 0.5, "distinct-2": 0.8,
            "length_chars": 100.0, "n_with_attributes": n, "attr_coverage": coverage,
            "attr_contradiction_rate": 0.1, "contradictions_per_example": 0.1, "hallucinated_per_example": 0.2,
        },
        "hit_max_new_tokens_share": hit_max,
        "decoding": {"max_new_tokens": 64, "greedy": True, "description": "greedy, max_new_tokens=64"},
        "model": "smollm2-135m",
        "adapter": None,
        "data": {"path": "/data/dev.json", "sha256": sha, "records": n},
        "timings": {"samples_per_s": tokens_per_s / 50, "tokens_per_s": tokens_per_s},
    }


def _write_run(path: Path, metrics: dict) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return path


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _table_row(md: str, label: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_compare_two_runs_table_numbers_best_and_deltas(tmp_path):
    from adgen.evaluation import compare_runs

    a = _write_run(tmp_path / "zero-shot", _metrics(rouge_l=10.0, coverage=0.30, repetition=0.40, hit_max=0.85))
    b = _write_run(tmp_path / "lora", _metrics(rouge_l=22.5, coverage=0.75, repetition=0.05, tokens_per_s=40.0,
                                               hit_max=0.1))
    result = compare_runs([a, b], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "comparison.md").read_text(encoding="utf-8")
    assert md == result.markdown
    header = _table_row(md, "metric")
    assert header == ["metric", "zero-shot", "lora", "lora − zero-shot"]
    assert _table_row(md, "ROUGE-L") == ["ROUGE-L ↑", "10.00", "**22.50**", "+12.50"]
    assert _table_row(md, "ROUGE-1") == ["ROUGE-1 ↑", "16.00", "**28.50**", "+12.50"]
    assert _table_row(md, "BLEU-4") == ["BLEU-4 ↑", "3.33", "**7.50**", "+4.17"]
    assert _table_row(md, "attribute coverage") == ["attribute coverage ↑", "0.300", "**0.750**", "+0.450"]
    # lower is better: the smaller repetition is the bold one, and the delta is negative
    assert _table_row(md, "repetition") == ["repetition (4-gram) ↓", "0.400", "**0.050**", "-0.350"]
    # equal values: no best, zero delta
    assert _table_row(md, "Chinese share") == ["Chinese share ↑", "0.900", "0.900", "±0.000"]
    # length has no better direction: never bold
    assert "**" not in "".join(_table_row(md, "length (chars)"))
    assert _table_row(md, "hit max_new_tokens") == ["hit max_new_tokens (never stopped) ↓", "0.850", "**0.100**", "-0.750"]
    assert _table_row(md, "generated tokens/s") == ["generated tokens/s ↑", "**50.0**", "40.0", "-10.0"]
    assert "- **zero-shot**:" in md and "- **lora**:" in md and "greedy, max_new_tokens=64" in md
    assert "## Warnings" not in md  # same data, same n, same decoding

    png = (tmp_path / "cmp" / "comparison.png").read_bytes()
    width, height = _png_size(png)
    assert 800 <= width <= 2500 and 400 <= height <= 1500
    assert len(png) > 20_000  # bars, labels and a legend, not an empty canvas


def test_compare_cli_names_prints_table_and_writes_png(tmp_path, capsys):
    a = _write_run(tmp_path / "r1", _metrics(rouge_l=10.0, coverage=0.3, repetition=0.4))
    b = _write_run(tmp_path / "r2", _metrics(rouge_l=20.0, coverage=0.6, repetition=0.1))
    c = _write_run(tmp_path / "r3", _metrics(rouge_l=15.0, coverage=0.9, repetition=0.2, sha="cd" * 32, n=10))
    rc = main(["compare", str(a), str(b), str(c), "-o", str(tmp_path / "out"), "--names", "base,lora,qlora"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "base" in out and "qlora" in out and "20.00" in out and "ROUGE-L" in out
    md = (tmp_path / "out" / "comparison.md").read_text(encoding="utf-8")
    assert _table_row(md, "metric") == ["metric", "base", "lora", "qlora", "lora − base", "qlora − base"]
    assert _table_row(md, "ROUGE-L") == ["ROUGE-L ↑", "10.00", "**20.00**", "15.00", "+10.00", "+5.00"]
    assert "different data (sha256 differs)" in md and "different numbers of examples" in md
    assert "different data" in out  # warnings printed too
    _png_size((tmp_path / "out" / "comparison.png").read_bytes())


def test_compare_real_eval_runs(tmp_path, adgen_dev_path):
    """Runs written by run_eval itself (stub generators, greedy vs. a longer text) compare cleanly."""
    from adgen.data.records import read_records
    from adgen.evaluation import compare_runs, run_eval
    from adgen.generation import DecodingConfig, Generation

    records = read_records(adgen_dev_path).records[:4]
    labels = {r.content: r.summary for r in records}

    from fake_generator import FakeGeneratorBase

    class Stub(FakeGeneratorBase):
        backend, batch_size = "stub", 4

        def __init__(self, share: float) -> None:
            self.share, self.model_name = share, f"stub-{share}"

        def generate(self, prompts, config):
            return [Generation(labels[p][: int(len(labels[p]) * self.share)], 10, 5, "stop") for p in prompts]

    short = run_eval(Stub(0.2), records, tmp_path / "short", DecodingConfig(max_new_tokens=8))
    long = run_eval(Stub(0.8), records, tmp_path / "long", DecodingConfig(max_new_tokens=8))
    result = compare_runs([tmp_path / "short", tmp_path / "long"], tmp_path / "cmp")
    row = _table_row(result.markdown, "ROUGE-L")
    assert row[1] == f"{short.metrics['metrics']['rouge-l']:.2f}"
    assert row[2] == f"**{long.metrics['metrics']['rouge-l']:.2f}**"
    assert long.metrics["metrics"]["rouge-l"] > short.metrics["metrics"]["rouge-l"]
    assert _table_row(result.markdown, "examples (n)")[1:3] == ["4", "4"]
    _png_size(result.chart_path.read_bytes())


def test_duplicate_dir_names_are_told_apart(tmp_path):
    from adgen.evaluation.compare import load_runs

    a = _write_run(tmp_path / "exp1" / "eval", _metrics(10.0, 0.3, 0.1))
    b = _write_run(tmp_path / "exp2" / "eval", _metrics(11.0, 0.3, 0.1))
    assert [r.name for r in load_runs([a, b])] == ["exp1/eval", "exp2/eval"]


def test_flat_and_llamafactory_metric_files_are_read(tmp_path):
    from adgen.evaluation import load_run

    p = tmp_path / "predict_results.json"
    p.write_text(json.dumps({"predict_rouge-1": 30.0, "predict_rouge-2": 7.0, "predict_rouge-l": 25.0,
                             "predict_bleu-4": 8.0, "predict_runtime": 12.0}), encoding="utf-8")
    run = load_run(p)
    assert run.name == tmp_path.name
    assert (run.metrics["rouge-l"], run.metrics["bleu-4"]) == (25.0, 8.0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "no such run directory"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no metrics.json in this directory"),
        (lambda d: _write_partial(d / "partial"), "an unfinished eval"),
        (lambda d: _write_text(d / "bad" / "metrics.json", "{not json"), "not valid JSON"),
        (lambda d: _write_text(d / "list" / "metrics.json", "[1, 2]"), "expected a JSON object"),
        (lambda d: _write_text(d / "other" / "metrics.json", '{"loss": 1.0}'), "no ROUGE / BLEU-4 figures"),
    ],
)
def test_bad_run_dir_is_a_clear_error(tmp_path, capsys, make, message):
    from adgen.evaluation import compare_runs

    good = _write_run(tmp_path / "good", _metrics(10.0, 0.3, 0.1))
    bad = make(tmp_path)
    with pytest.raises(AdgenError, match=message):
        compare_runs([good, bad], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
    assert main(["compare", str(good), str(bad), "-o", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adgen: error:") and str(bad.name) in err and message in err


def test_names_must_match_the_runs(tmp_path):
    from adgen.evaluation import compare_runs

    a = _write_run(tmp_path / "a", _metrics(10.0, 0.3, 0.1))
    b = _write_run(tmp_path / "b", _metrics(11.0, 0.3, 0.1))
    with pytest.raises(AdgenError, match="--names gives 1 name"):
        compare_runs([a, b], tmp_path / "cmp", names=["only-one"])
    with pytest.raises(AdgenError, match="duplicates"):
        compare_runs([a, b], tmp_path / "cmp", names=["x", "x"])


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")
    return path.parent if path.name == "metrics.json" else path


def _write_partial(run_dir: Path) -> Path:
    run_dir.mkdir()
    (run_dir / "eval_state.json").write_text('{"fingerprint": {}}', encoding="utf-8")
    return run_dir
