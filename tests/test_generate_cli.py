"""`adgen generate`: single inputs, whole files, resuming after a kill, bad lines, candidates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adgen.cli import main
from adgen.generation import DecodingConfig, Generation, load_generator
from adgen.generation.bulk import pick_best
from adgen.generation.resumable import record_key, scan_output

CONTENTS = [
    "类型#裙*颜色#黑色",
    "类型#上衣*版型#宽松*版型#显瘦*图案#线条*衣样式#衬衫",
    "类型#裤*材质#牛仔布*风格#街头",
    "类型#裙*风格#简约*图案#纯色*裙长#连衣裙",
    "类型#上衣*颜色#白色*衣样式#卫衣",
    "类型#裤*裤长#九分裤*裤型#阔腿裤",
    "类型#裙*材质#雪纺*裙型#a字",
    "类型#上衣*风格#复古*衣领型#圆领",
    "类型#裙*颜色#红色*风格#性感",
    "类型#裤*颜色#蓝色*裤腰型#高腰",
    "类型#上衣*材质#棉*衣袖长#短袖",
    "类型#裙*图案#碎花*裙长#半身裙",
]


@pytest.fixture(scope="module")
def model_dir(tiny_llama3_dir) -> str:
    return str(tiny_llama3_dir)


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_generator(model_dir, dtype="fp32", device="cpu", batch_size=4)


def write_catalog(path: Path, contents=CONTENTS, bad_at: int | None = None) -> Path:
    lines = []
    for i, c in enumerate(contents):
        if bad_at is not None and len(lines) + 1 == bad_at:
            lines.append('{"content": "类型#裙", oops}')
        lines.append(json.dumps({"id": f"sku-{i}", "content": c}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(*args: str) -> int:
    return main(["generate", *args])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# ---- single input ---------------------------------------------------------------------------
def test_content_prints_the_copy(model_dir, tiny, capsys):
    assert run_cli("--model", model_dir, "--content", CONTENTS[0], "--max-new-tokens", "8") == 0
    out = capsys.readouterr().out
    expected = tiny.generate([CONTENTS[0]], DecodingConfig(max_new_tokens=8))[0].text
    assert expected.strip() and out == expected + "\n"
    assert run_cli("--model", model_dir, "--content", CONTENTS[0], "--max-new-tokens", "8", "--stream") == 0
    assert capsys.readouterr().out == expected + "\n"


def test_attributes_json(model_dir, capsys):
    rc = run_cli("--model", model_dir, "--attributes", '{"类型": "裙", "版型": ["宽松", "显瘦"]}',
                 "--max-new-tokens", "4", "--json")
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["content"] == "类型#裙*版型#宽松*版型#显瘦"
    assert obj["finish_reason"] == "length" and obj["completion_tokens"] == 4 and obj["prompt_tokens"] > 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attributes", "{bad json"], "--attributes: not valid JSON"),
        (["--attributes", '["a"]'], "JSON object"),
        (["--attributes", '{"类型": "裙#子"}'], "--attributes"),
        (["--input", "x.jsonl"], "--input needs --output"),
        (["--content", "类型#裙", "--output", "o.jsonl"], "--output goes with --input"),
        (["--content", "类型#裙", "-n", "3"], "add --do-sample"),
        (["--content", "类型#裙", "--top-p", "0"], "top_p"),
        (["--content", "类型#裙", "--backend", "vllm"], "pip install vllm"),
    ],
)
def test_argument_errors(args, message, model_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert run_cli("--model", model_dir, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("adgen: error:") and message in err


# ---- whole files ----------------------------------------------------------------------------
def test_bulk_generates_every_record_in_order(model_dir, tiny, tmp_path, capsys):
    src = write_catalog(tmp_path / "cat.jsonl", CONTENTS[:5])
    out = tmp_path / "ads.jsonl"
    assert run_cli("--model", model_dir, "--input", str(src), "--output", str(out), "--max-new-tokens", "6",
                   "--batch-size", "2") == 0
    rows = read_jsonl(out)
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["content"] for r in rows] == CONTENTS[:5] and [r["id"] for r in rows] == [f"sku-{i}" for i in range(5)]
    expected = [g.text for g in tiny.generate(CONTENTS[:5], DecodingConfig(max_new_tokens=6))]
    assert [r["predict"] for r in rows] == expected
    assert all(r["finish_reason"] == "length" and "candidates" not in r for r in rows)
    err = capsys.readouterr().err
    assert "5 generated, 0 already done" in err and "greedy" in err
    # a rerun finds everything done and changes nothing
    before = out.read_bytes()
    assert run_cli("--model", model_dir, "--input", str(src), "--output", str(out), "--max-new-tokens", "6") == 0
    assert out.read_bytes() == before and "0 generated, 5 already done" in capsys.readouterr().err


def test_bad_lines_fail_or_skip_with_line_numbers(model_dir, tmp_path, capsys):
    src = write_catalog(tmp_path / "cat.jsonl", CONTENTS[:3], bad_at=2)
    out = tmp_path / "ads.jsonl"
    assert run_cli("--model", model_dir, "--input", str(src), "--output", str(out), "--max-new-tokens", "2") == 2
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and "--on-error skip" in err and not out.exists()
    assert run_cli("--model", model_dir, "--input", str(src), "--output", str(out), "--max-new-tokens", "2",
                   "--on-error", "skip") == 0
    err = capsys.readouterr().err
    assert "line 2" in err and "skipped 1" in err
    assert [r["line"] for r in read_jsonl(out)] == [1, 3, 4]


def test_resume_cuts_a_partial_last_line(model_dir, tmp_path, capsys):
    src = write_catalog(tmp_path / "cat.jsonl", CONTENTS[:6])
    clean, out = tmp_path / "clean.jsonl", tmp_path / "ads.jsonl"
    args = ["--model", model_dir, "--input", str(src), "--max-new-tokens", "5", "--batch-size", "2"]
    assert run_cli(*args, "--output", str(clean)) == 0
    lines = clean.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6
    out.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed in the middle of a write
    assert scan_output(out, repair=False).records == 3
    capsys.readouterr()
    assert run_cli(*args, "--output", str(out)) == 0
    assert out.read_bytes() == clean.read_bytes()  # each record once, nothing lost, same order
    assert "3 generated, 3 already done" in capsys.readouterr().err


def test_overwrite_and_foreign_output(model_dir, tmp_path, capsys):
    src = write_catalog(tmp_path / "cat.jsonl", CONTENTS[:2])
    out = tmp_path / "ads.jsonl"
    out.write_text('{"something": "else"}\n', encoding="utf-8")
    args = ["--model", model_dir, "--input", str(src), "--output", str(out), "--max-new-tokens", "2"]
    assert run_cli(*args) == 2
    assert f"{out}:1:" in capsys.readouterr().err and out.read_text() == '{"something": "else"}\n'
    assert run_cli(*args, "--overwrite") == 0
    assert [r["line"] for r in read_jsonl(out)] == [1, 2]


def test_resume_regenerates_records_whose_content_changed(model_dir, tmp_path, capsys):
    src = write_catalog(tmp_path / "cat.jsonl", CONTENTS[:2])
    out = tmp_path / "ads.jsonl"
    args = ["--model", model_dir, "--input", str(src), "--output", str(out), "--max-new-tokens", "2"]
    assert run_cli(*args) == 0
    write_catalog(src, [CONTENTS[0], CONTENTS[5]])  # line 2 now holds another product
    assert run_cli(*args) == 0
    rows = read_jsonl(out)
    assert [(r["line"], r["content"]) for r in rows] == [(1, CONTENTS[0]), (2, CONTENTS[1]), (2, CONTENTS[5])]
    assert record_key(2, CONTENTS[5]) != record_key(2, CONTENTS[1])


def test_candidates_best_of_coverage(model_dir, tmp_path, capsys):
    src = write_catalog(tmp_path / "cat.jsonl", CONTENTS[:2])
    out = tmp_path / "ads.jsonl"
    assert run_cli("--model", model_dir, "--input", str(src), "--output", str(out), "--max-new-tokens", "4",
                   "-n", "3", "--do-sample", "--seed", "3", "--best-of", "coverage") == 0
    for r in read_jsonl(out):
        assert len(r["candidates"]) == 3 and r["predict"] == r["candidates"][r["chosen"]]
        assert r["candidate_finish_reasons"][r["chosen"]] == r["finish_reason"]
        assert "attr_coverage" in r
    rc = run_cli("--model", model_dir, "--content", CONTENTS[0], "--max-new-tokens", "4", "-n", "2",
                 "--temperature", "1.2", "--seed", "1", "--json")
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert len(obj["candidates"]) == 2 and obj["chosen"] == 0


def test_pick_best_prefers_coverage_then_fewer_contradictions():
    attrs = [("类型", "裙"), ("颜色", "白色"), ("风格", "简约")]

    def gen(text):
        return Generation(text, 1, 1, "stop")

    cands = [gen("一条裙子"), gen("白色的裙子，黑色腰带"), gen("简约白色连衣裙"), gen("白色简约，黑色")]
    best, faith = pick_best(attrs, cands, "coverage")
    assert best == 2 and faith["attr_coverage"] == 1.0
    best, _ = pick_best(attrs, [cands[3], cands[2]], "coverage")  # same coverage: no contradiction wins
    assert best == 1
    assert pick_best(attrs, cands, "first") == (0, None)


# ---- a real kill ----------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_run_resumes_with_each_record_once(model_dir, tmp_path):
    src = write_catalog(tmp_path / "cat.jsonl")
    out, clean = tmp_path / "ads.jsonl", tmp_path / "clean.jsonl"
    args = ["--model", model_dir, "--input", str(src), "--max-new-tokens", "40", "--batch-size", "1", "--no-progress"]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-m", "adgen", "generate", *args, "--output", str(out)],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_at_kill = out.read_bytes().count(b"\n")
    assert 3 <= done_at_kill < len(CONTENTS)
    assert run_cli(*args, "--output", str(out)) == 0
    assert run_cli(*args, "--output", str(clean)) == 0
    rows = read_jsonl(out)
    assert [r["line"] for r in rows] == list(range(1, len(CONTENTS) + 1))
    assert [r["content"] for r in rows] == CONTENTS
    assert out.read_bytes() == clean.read_bytes()


def test_continuous_batching_results_are_written_in_input_order(tmp_path):
    """With generate_each, candidates come back in completion order; the catalog output keeps input order."""
    from types import SimpleNamespace

    from adgen.generation import DecodingConfig, Generation
    from adgen.generation.bulk import generate_bulk

    class OutOfOrder:
        batch_size = 4
        uses_engine = True

        def generate_each(self, prompts, config):
            for i in reversed(range(len(prompts))):  # the last request finishes first
                yield i, Generation(f"{prompts[i]}-{i}", 3, 2, "stop", [1, 2])

    records = [SimpleNamespace(line=k + 1, content=f"类型#{k}", summary=None, extra={}) for k in range(5)]
    out = tmp_path / "ads.jsonl"
    written = []
    generate_bulk(OutOfOrder(), records, out, DecodingConfig(do_sample=True), n=2, progress=False,
                  on_write=lambda obj: written.append(obj))
    rows = read_jsonl(out)
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5] == [w["line"] for w in written]
    assert rows[1]["candidates"] == ["类型#1-2", "类型#1-3"]  # record 2's own two candidates, in order
