"""`adgen data inspect|convert|preview` through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from adgen.cli import main
from adgen.data.records import read_records

REPO = Path(__file__).resolve().parents[1]
GOOD = {"content": "类型#裙*颜色#黑色", "summary": "黑色连衣裙，简约大方。"}


@pytest.fixture
def broken_line3(tmp_path) -> Path:
    lines = [json.dumps(GOOD, ensure_ascii=False)] * 5
    lines[2] = '{"content": "类型#裙", "summary": '  # truncated mid-record
    p = tmp_path / "broken.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_train_reports_4000_gbk(capsys, adgen_train_path):
    rc, out, _ = run_cli(capsys, "inspect", adgen_train_path)
    assert rc == 0
    assert "records            4000" in out
    assert "encoding           GBK (CRLF line ends)" in out


def test_inspect_dev_json(capsys, adgen_dev_path):
    rc, out, _ = run_cli(capsys, "inspect", adgen_dev_path, "--json")
    report = json.loads(out)  # one JSON object, nothing else on stdout
    assert rc == 0
    assert (report["records"], report["skipped"], report["encoding"], report["errors"]) == (1070, 0, "utf-8", [])


def test_broken_line_3_fails_naming_line_3(capsys, broken_line3):
    rc, out, err = run_cli(capsys, "inspect", broken_line3)
    assert rc == 2 and out == ""
    assert err.startswith(f"adgen: error: {broken_line3}:3: bad JSON")
    assert "Traceback" not in err


def test_broken_line_3_with_skip_reports_1_skipped(capsys, broken_line3):
    rc, out, err = run_cli(capsys, "inspect", broken_line3, "--on-error", "skip", "--json")
    report = json.loads(out)
    assert rc == 0
    assert (report["records"], report["skipped"]) == (4, 1)
    assert report["errors"][0]["line"] == 3 and "bad JSON" in report["errors"][0]["reason"]
    assert err.startswith("skipped 1 record(s): line 3: bad JSON")


@pytest.mark.slow  # spawns a process
def test_real_executable_exit_codes(broken_line3):
    exe = REPO / ".venv" / "bin" / "adgen"
    if not exe.exists():  # e.g. a venv elsewhere: the same entry point via the interpreter
        exe = Path(sys.executable).parent / "adgen"
    fail = subprocess.run([str(exe), "data", "inspect", str(broken_line3)], capture_output=True, text=True, timeout=120)
    assert fail.returncode == 2
    assert f"{broken_line3}:3:" in fail.stderr and "Traceback" not in fail.stderr
    skip = subprocess.run(
        [str(exe), "data", "inspect", str(broken_line3), "--on-error", "skip"], capture_output=True, text=True, timeout=120
    )
    assert skip.returncode == 0
    assert "skipped 1 record(s)" in skip.stderr and "records            4" in skip.stdout


def test_encoding_override_reaches_the_reader(capsys, adgen_train_path):
    rc, _, err = run_cli(capsys, "inspect", adgen_train_path, "--encoding", "utf-8")
    assert rc == 2 and f"{adgen_train_path}:1: cannot decode as utf-8" in err


def test_columns_option_reads_alpaca(capsys, tmp_path):
    p = tmp_path / "alpaca.jsonl"
    p.write_text(json.dumps({"instruction": GOOD["content"], "input": "", "output": GOOD["summary"]}) + "\n", "utf-8")
    rc, out, err = run_cli(capsys, "inspect", p, "--json")
    assert rc == 2 and "--columns" in err
    rc, out, _ = run_cli(capsys, "inspect", p, "--json", "--columns", "content=instruction,summary=output")
    assert rc == 0 and json.loads(out)["records"] == 1
    rc, _, err = run_cli(capsys, "inspect", p, "--columns", "prompt=instruction")
    assert rc == 2 and "only content and summary can be mapped" in err


def test_inspect_with_model_counts_tokens(capsys, tmp_path, llama3_tokenizer_dir, llama3_tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD, ensure_ascii=False) + "\n", "utf-8")
    rc, out, _ = run_cli(capsys, "inspect", p, "--json", "--model", llama3_tokenizer_dir)
    lengths = json.loads(out)["lengths"]
    n = len(llama3_tokenizer(GOOD["summary"], add_special_tokens=False)["input_ids"])
    assert rc == 0 and lengths["summary_tokens"]["max"] == n


def test_convert_writes_messages_with_system_prompt(capsys, tmp_path, adgen_dev_path):
    out_path = tmp_path / "out" / "dev.messages.jsonl"
    rc, out, _ = run_cli(capsys, "convert", adgen_dev_path, "--to", "messages", "-o", out_path, "--system-prompt", "写广告")
    assert rc == 0 and "wrote 1070 records" in out
    rows = [json.loads(line) for line in out_path.read_text("utf-8").splitlines()]
    first = read_records(adgen_dev_path).records[0]
    assert len(rows) == 1070
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert rows[0]["messages"][1]["content"] == first.content and rows[0]["messages"][2]["content"] == first.summary


def test_convert_alpaca_round_trips_through_the_cli(capsys, tmp_path, adgen_train_path):
    out_path = tmp_path / "train.alpaca.jsonl"
    assert run_cli(capsys, "convert", adgen_train_path, "--to", "alpaca", "-o", out_path)[0] == 0
    rc, out, _ = run_cli(capsys, "inspect", out_path, "--json", "--columns", "alpaca")
    report = json.loads(out)
    assert rc == 0 and (report["records"], report["encoding"], report["distinct_contents"]) == (4000, "utf-8", 3799)


def test_convert_with_skip_leaves_out_bad_records(capsys, tmp_path, broken_line3):
    out_path = tmp_path / "sharegpt.jsonl"
    rc, _, err = run_cli(capsys, "convert", broken_line3, "--to", "sharegpt", "-o", out_path, "--on-error", "skip")
    assert rc == 0 and "skipped 1 record(s)" in err
    assert len(out_path.read_text("utf-8").splitlines()) == 4
    assert not (tmp_path / "fail.jsonl").exists()
    rc, _, _ = run_cli(capsys, "convert", broken_line3, "--to", "sharegpt", "-o", tmp_path / "fail.jsonl")
    assert rc == 2 and not (tmp_path / "fail.jsonl").exists()  # fail mode writes nothing


def test_preview_passes_every_option_to_the_library(capsys, monkeypatch, tmp_path):
    # adgen.data.preview is another module's job: check the wiring only, with a stand-in.
    calls = []
    rows = [{"prompt": "P", "response": "R", "input_ids": [1, 2], "labels": [-100, 2]}]
    fake = types.ModuleType("adgen.data.preview")
    fake.preview_records = lambda path, model, **kw: calls.append((path, model, kw)) or rows
    fake.format_preview_text = lambda rs: f"TEXT {len(rs)} row(s)"
    monkeypatch.setitem(sys.modules, "adgen.data.preview", fake)

    rc, out, _ = run_cli(
        capsys, "preview", "f.json", "--model", "m", "-n", "2", "--system-prompt", "", "--loss-on", "all",
        "--max-length", "64", "--encoding", "gbk", "--on-error", "skip", "--columns", "alpaca",
    )  # fmt: skip
    assert rc == 0 and out.strip() == "TEXT 1 row(s)"
    assert calls == [
        (
            "f.json",
            "m",
            dict(
                n=2, system_prompt=None, loss_on="all", max_length=64, encoding="gbk", on_error="skip",
                columns={"content": "instruction", "summary": "output"},
            ),  # fmt: skip
        )
    ]
    rc, out, _ = run_cli(capsys, "preview", "f.json", "--model", "m", "--json")
    assert [json.loads(line) for line in out.strip().splitlines()] == rows  # JSON lines, one per record
    # Without --system-prompt adgen's prompt applies ('' above: no system turn)
    from adgen.data.chat import DEFAULT_SYSTEM_PROMPT

    assert calls[-1][2]["n"] == 3 and calls[-1][2]["system_prompt"] == DEFAULT_SYSTEM_PROMPT
    assert calls[-1][2]["loss_on"] == "response"


def test_data_without_subcommand_prints_usage(capsys):
    rc, _, err = run_cli(capsys)
    assert rc == 2 and "inspect" in err and "convert" in err and "preview" in err


def test_preview_end_to_end_keeps_the_default_system_prompt(capsys, adgen_train_path, llama3_tokenizer_dir):
    from adgen.data.chat import DEFAULT_SYSTEM_PROMPT

    rc, out, _ = run_cli(capsys, "preview", adgen_train_path, "--model", llama3_tokenizer_dir, "-n", "2", "--json")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert rc == 0 and [r["line"] for r in rows] == [1, 2]
    assert DEFAULT_SYSTEM_PROMPT in rows[0]["prompt"] and "类型#裤*版型#宽松" in rows[0]["prompt"]
    rc, out, _ = run_cli(capsys, "preview", adgen_train_path, "--model", llama3_tokenizer_dir, "-n", "1", "--json", "--system-prompt", "")
    assert rc == 0 and "system" not in json.loads(out.splitlines()[0])["prompt"]
