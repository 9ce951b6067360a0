"""`adgen data preview`: exactly what the model will see (issue "Foundation", item 4 and "Done when")."""

from __future__ import annotations

import json

import pytest

from adgen.data.chat import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX
from adgen.data.preview import format_preview_text, preview_records

RECORD = {"content": "类型#裙*颜色#黑色", "summary": "黑色长裙。"}
from expected_chat import CHATML_PROMPT, CHATML_RESPONSE, LLAMA3_PROMPT, LLAMA3_RESPONSE


@pytest.fixture(scope="module")
def record_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("preview") / "one.json"
    path.write_text(json.dumps(RECORD, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def five_records_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("preview5") / "five.json"
    rows = [{"content": f"类型#裙*颜色#色{i}", "summary": "黑色长裙。" * (i + 1)} for i in range(5)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def check_row(row, tok, prompt, response, end_id):
    assert row["prompt"] == prompt
    assert row["response"] == response
    assert row["prompt"] + row["response"] == tok.decode(row["input_ids"])
    ids, labels = row["input_ids"], row["labels"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    response_ids = tok(RECORD["summary"], add_special_tokens=False)["input_ids"] + [end_id]
    assert len(ids) == len(labels) == n_prompt + len(response_ids)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == response_ids  # exactly the response, end-of-turn included
    assert row["truncated"] is False and row["line"] == 1


def test_preview_llama3_done_when(record_path, tiny_llama3_dir, llama3_tokenizer):
    rows = preview_records(record_path, str(tiny_llama3_dir), system_prompt="S")
    assert len(rows) == 1
    check_row(rows[0], llama3_tokenizer, LLAMA3_PROMPT, LLAMA3_RESPONSE, 128009)
    assert rows[0]["labels"][-1] == 128009
    assert rows[0]["input_ids"][0] == 128000 and rows[0]["input_ids"][1] != 128000


def test_preview_with_the_bare_tokenizer_dir(record_path, llama3_tokenizer_dir, llama3_tokenizer):
    """The Done-when check uses ../shared/llama3-tokenizer itself (a tokenizer, no weights)."""
    rows = preview_records(record_path, str(llama3_tokenizer_dir), system_prompt="S")
    check_row(rows[0], llama3_tokenizer, LLAMA3_PROMPT, LLAMA3_RESPONSE, 128009)


def test_preview_chatml(record_path, tiny_chatml_dir, smollm2_tokenizer):
    rows = preview_records(record_path, str(tiny_chatml_dir), system_prompt="S")
    check_row(rows[0], smollm2_tokenizer, CHATML_PROMPT, CHATML_RESPONSE, smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>"))


def test_preview_defaults_n_loss_on_and_truncation(five_records_path, tiny_llama3_dir):
    rows = preview_records(five_records_path, str(tiny_llama3_dir))
    assert [r["line"] for r in rows] == [1, 2, 3]  # n defaults to 3
    assert DEFAULT_SYSTEM_PROMPT in rows[0]["prompt"]  # the default system prompt is adgen's
    assert len(preview_records(five_records_path, str(tiny_llama3_dir), n=10)) == 5

    everything = preview_records(five_records_path, str(tiny_llama3_dir), n=1, loss_on="all")[0]
    assert everything["labels"] == everything["input_ids"]

    n_prompt = rows[0]["labels"].count(IGNORE_INDEX)
    cut = preview_records(five_records_path, str(tiny_llama3_dir), n=1, max_length=n_prompt + 2)[0]
    assert cut["truncated"] and len(cut["input_ids"]) == n_prompt + 2
    assert not cut["response"].endswith("<|eot_id|>")
    dropped = preview_records(five_records_path, str(tiny_llama3_dir), n=1, max_length=n_prompt)[0]
    assert dropped["dropped"] and "max_length" in dropped["reason"]

    text = format_preview_text([rows[0], cut, dropped])
    assert "[prompt]" in text and rows[0]["prompt"] in text and rows[0]["response"] in text
    assert "(truncated)" in text and "dropped" in text


def _parse_records(out: str) -> list[dict]:
    """The CLI's --json output: JSON lines, one object per record."""
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert all(isinstance(r, dict) for r in rows)
    return rows


def test_cli_preview_json(record_path, llama3_tokenizer_dir, llama3_tokenizer, capsys):
    from adgen.cli import main

    rc = main(["data", "preview", str(record_path), "--model", str(llama3_tokenizer_dir), "--system-prompt", "S", "--json"])
    assert rc == 0
    rows = _parse_records(capsys.readouterr().out)
    assert len(rows) == 1
    assert {"prompt", "response", "input_ids", "labels"} <= set(rows[0])
    check_row(rows[0], llama3_tokenizer, LLAMA3_PROMPT, LLAMA3_RESPONSE, 128009)


def test_cli_preview_system_prompt_default_and_empty(record_path, llama3_tokenizer_dir, capsys):
    from adgen.cli import main

    assert main(["data", "preview", str(record_path), "--model", str(llama3_tokenizer_dir), "--json"]) == 0
    row = _parse_records(capsys.readouterr().out)[0]
    assert f"system<|end_header_id|>\n\n{DEFAULT_SYSTEM_PROMPT}<|eot_id|>" in row["prompt"]

    assert main(["data", "preview", str(record_path), "--model", str(llama3_tokenizer_dir), "--json", "--system-prompt", ""]) == 0
    row = _parse_records(capsys.readouterr().out)[0]
    assert "system<|end_header_id|>" not in row["prompt"]
    assert row["prompt"].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")


def test_cli_preview_text(record_path, llama3_tokenizer_dir, capsys):
    from adgen.cli import main

    assert main(["data", "preview", str(record_path), "--model", str(llama3_tokenizer_dir), "--system-prompt", "S"]) == 0
    out = capsys.readouterr().out
    assert LLAMA3_PROMPT in out and LLAMA3_RESPONSE in out


def test_cli_preview_missing_model_is_one_clear_line(record_path, tmp_path, capsys):
    from adgen.cli import main

    rc = main(["data", "preview", str(record_path), "--model", str(tmp_path / "nope")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("adgen: error:") and "not found" in err and "Traceback" not in err
