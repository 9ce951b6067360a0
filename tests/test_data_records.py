"""adgen.data: attributes, reading (encodings, line ends, arrays, columns, errors), inspect, convert."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from adgen.data.attributes import format_attributes, parse_attributes
from adgen.data.convert import convert_record, write_converted
from adgen.data.inspect import format_inspect_text, inspect_data, length_stats
from adgen.data.records import Record, RecordError, parse_columns, read_records
from adgen.errors import AdgenError, DataError

DRESS = "类型#裙*版型#显瘦*版型#宽松*颜色#黑色"
COPY = "这款连衣裙显瘦又宽松，黑色百搭。"


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def write(tmp_path: Path, text: str | bytes, name: str = "data.json") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


# --- attributes ---------------------------------------------------------------------------------


def test_parse_attributes_keeps_order_and_repeated_keys():
    assert parse_attributes(DRESS) == [("类型", "裙"), ("版型", "显瘦"), ("版型", "宽松"), ("颜色", "黑色")]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("类型#裙*abc", "part 2 'abc' is not key#value"),
        ("类型#裙*", "part 2 is empty"),
        ("类型#裙#长", "part 1 '类型#裙#长' is not key#value (has more than one '#')"),
        ("类型#", "empty value"),
        ("#裙", "empty key"),
        ("   ", "empty"),
    ],
)
def test_parse_attributes_names_the_failing_part(content, fragment):
    with pytest.raises(ValueError) as e:
        parse_attributes(content)
    assert fragment in str(e.value)


def test_format_attributes_inverts_parse_on_every_dev_record(adgen_dev_path):
    for r in read_records(adgen_dev_path).records:
        assert format_attributes(parse_attributes(r.content)) == r.content


def test_format_attributes_from_mapping_with_repeated_key():
    assert format_attributes({"类型": "裙", "版型": ["显瘦", "宽松"], "颜色": "黑色"}) == DRESS


@pytest.mark.parametrize("attrs", [[("类型", "裙*长")], [("类#型", "裙")], [("类型", "")], []])
def test_format_attributes_rejects_what_would_not_parse_back(attrs):
    with pytest.raises(ValueError):
        format_attributes(attrs)


# --- the real files -----------------------------------------------------------------------------


def test_dev_json_is_utf8_with_1070_records(adgen_dev_path):
    data = read_records(adgen_dev_path)
    assert (len(data.records), data.skipped, data.encoding, data.newline) == (1070, 0, "utf-8", "lf")
    first = data.records[0]
    assert first.content.startswith("类型#上衣*材质#牛仔布*颜色#白色")
    assert first.summary.startswith("简约而不简单的牛仔外套")
    assert first.attributes[0] == ("类型", "上衣")
    assert [r.line for r in data.records] == list(range(1, 1071))
    assert len({r.content for r in data.records}) == 1000


def test_train_json_is_gbk_crlf_with_4000_records(adgen_train_path):
    data = read_records(adgen_train_path)
    assert (len(data.records), data.skipped, data.encoding, data.newline) == (4000, 0, "gbk", "crlf")
    assert data.records[0].content == "类型#裤*版型#宽松*风格#性感*图案#线条*裤型#阔腿裤"
    assert data.records[-1].line == 4000
    # CRLF must not leak into the text the model learns.
    assert not any("\r" in r.summary or "\r" in r.content for r in data.records)


def test_explicit_wrong_encoding_fails_naming_file_line_and_option(adgen_train_path):
    with pytest.raises(DataError) as e:
        read_records(adgen_train_path, encoding="utf-8")
    msg = str(e.value)
    assert msg.startswith(f"{adgen_train_path}:1: cannot decode as utf-8")
    assert "--encoding" in msg


def test_explicit_encoding_overrides_detection(adgen_train_path):
    data = read_records(adgen_train_path, encoding="gb18030")
    assert data.encoding == "gb18030" and len(data.records) == 4000


def test_unknown_encoding_name_is_a_user_error(adgen_dev_path):
    with pytest.raises(AdgenError, match="unknown encoding 'nope'"):
        read_records(adgen_dev_path, encoding="nope")


# --- encodings, line ends, arrays (synthetic) ---------------------------------------------------


def test_utf8_bom_is_detected_and_stripped(tmp_path):
    p = write(tmp_path, codecs.BOM_UTF8 + jsonl({"content": DRESS, "summary": COPY}).encode("utf-8"))
    data = read_records(p)
    assert data.encoding == "utf-8-sig"
    assert data.records == [Record(DRESS, COPY, 1, {})]
    # An explicit utf-8 on a BOM file must not break the first record either.
    assert read_records(p, encoding="utf-8").records[0].content == DRESS


def test_utf16_with_bom_is_detected(tmp_path):
    # What Windows Notepad saves as "Unicode"; GBK would otherwise "decode" it into NUL-ridden garbage.
    p = write(tmp_path, jsonl({"content": DRESS, "summary": COPY}).encode("utf-16"))
    data = read_records(p)
    assert data.encoding == "utf-16" and data.records[0].content == DRESS


def test_gbk_written_file_is_detected_as_gbk(tmp_path):
    p = write(tmp_path, jsonl({"content": DRESS, "summary": COPY}).encode("gbk"))
    data = read_records(p)
    assert data.encoding == "gbk" and data.records[0].summary == COPY


def test_undecodable_file_names_the_line_and_suggests_encoding(tmp_path):
    p = write(tmp_path, jsonl({"content": DRESS, "summary": COPY}).encode() + b'{"content": "\xff"}\n')
    with pytest.raises(DataError) as e:
        read_records(p)
    assert str(e.value).startswith(f"{p}:2: cannot decode the file as UTF-8, GBK or GB18030")
    assert "--encoding" in str(e.value)


def test_stray_byte_in_a_gbk_file_is_reported_at_its_line(tmp_path):
    good = jsonl({"content": DRESS, "summary": COPY}).encode("gbk")
    p = write(tmp_path, good * 2 + b'{"content": "\xff"}\n' + good)
    with pytest.raises(DataError, match=rf"^{p}:3: cannot decode the file .*as gbk"):
        read_records(p)


def test_crlf_and_blank_lines_keep_physical_line_numbers(tmp_path):
    rows = jsonl({"content": "类型#裙", "summary": "一"}, "", {"content": "类型#裤", "summary": "二"}, "   ")
    p = write(tmp_path, rows.replace("\n", "\r\n"))
    data = read_records(p)
    assert data.newline == "crlf"
    assert [(r.content, r.summary, r.line) for r in data.records] == [("类型#裙", "一", 1), ("类型#裤", "二", 3)]


def test_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    p = write(tmp_path, jsonl({"content": DRESS, "summary": "上\u2028下"}, {"content": DRESS, "summary": COPY}))
    data = read_records(p)
    assert [r.line for r in data.records] == [1, 2] and data.records[0].summary == "上\u2028下"


def test_json_array_records_carry_their_line(tmp_path):
    rows = [{"content": DRESS, "summary": COPY}, {"content": "类型#裤", "summary": "裤子"}]
    p = write(tmp_path, json.dumps(rows, ensure_ascii=False, indent=2))
    data = read_records(p)
    assert [(r.content, r.line) for r in data.records] == [(DRESS, 2), ("类型#裤", 6)]


def test_json_array_bad_item_is_reported_at_its_line(tmp_path):
    rows = [{"content": DRESS, "summary": COPY}, {"content": DRESS}]
    p = write(tmp_path, json.dumps(rows, ensure_ascii=False, indent=2))
    with pytest.raises(DataError) as e:
        read_records(p)
    assert str(e.value).startswith(f"{p}:6: array item 2: field 'summary' is missing")
    data = read_records(p, on_error="skip")
    assert len(data.records) == 1 and data.errors == [RecordError(6, "array item 2: field 'summary' is missing", "missing field")]


def test_json_array_syntax_error_fails_even_with_skip(tmp_path):
    p = write(tmp_path, '[\n{"content": "类型#裙", "summary": "一"},\n{"content": "类型#裤" "summary": "二"}\n]\n')
    with pytest.raises(DataError, match=rf"^{p}:3: bad JSON in the array"):
        read_records(p, on_error="skip")


# --- columns and optional summaries -------------------------------------------------------------


def test_alpaca_columns_map_instruction_and_output(tmp_path):
    p = write(tmp_path, jsonl({"instruction": DRESS, "input": "", "output": COPY, "id": 7}))
    data = read_records(p, columns={"content": "instruction", "summary": "output"})
    assert data.records == [Record(DRESS, COPY, 1, {"id": 7})]
    assert parse_columns("alpaca") == {"content": "instruction", "summary": "output"}
    assert parse_columns("content=instruction, summary=output") == {"content": "instruction", "summary": "output"}


def test_alpaca_with_instruction_and_input_takes_input_as_content(tmp_path):
    p = write(tmp_path, jsonl({"instruction": "根据商品属性写一段广告文案", "input": DRESS, "output": COPY}))
    (r,) = read_records(p, columns="alpaca").records
    assert (r.content, r.summary, r.extra) == (DRESS, COPY, {"instruction": "根据商品属性写一段广告文案"})


def test_unmapped_alpaca_file_hints_at_columns(tmp_path):
    p = write(tmp_path, jsonl({"instruction": DRESS, "input": "", "output": COPY}))
    with pytest.raises(DataError) as e:
        read_records(p)
    assert str(e.value).startswith(f"{p}:1: field 'content' is missing") and "--columns content=NAME" in str(e.value)


@pytest.mark.parametrize("spec", ["content", "prompt=instruction", "content="])
def test_bad_columns_spec_is_a_user_error(spec):
    with pytest.raises(AdgenError, match="--columns"):
        parse_columns(spec)


def test_summary_optional_for_catalogs(tmp_path):
    p = write(tmp_path, jsonl({"content": DRESS, "sku": "A1"}, {"content": "类型#裤", "summary": ""}))
    data = read_records(p, require_summary=False)
    assert [(r.summary, r.extra) for r in data.records] == [(None, {"sku": "A1"}), (None, {})]
    with pytest.raises(DataError, match=":1: field 'summary' is missing"):
        read_records(p)


# --- every error kind, with exact lines ---------------------------------------------------------

GOOD = {"content": DRESS, "summary": COPY}
BAD_LINES = [
    (2, '{"content": "类型#裙", "summary": "x"', "bad JSON", "bad JSON: Expecting ',' delimiter"),
    (4, {"summary": COPY}, "missing field", "field 'content' is missing"),
    (5, {"content": DRESS, "summary": "  "}, "empty field", "field 'summary' is empty"),
    (6, {"content": DRESS, "summary": 42}, "not a string", "field 'summary' is a number, not a string"),
    (8, {"content": "类型#裙*abc", "summary": COPY}, "bad attributes", "part 2 'abc' is not key#value"),
    (9, '["类型#裙", "x"]', "not an object", "expected a JSON object, got an array"),
]


@pytest.fixture
def bad_file(tmp_path) -> Path:
    lines = [GOOD] * 10
    for lineno, row, _, _ in BAD_LINES:
        lines[lineno - 1] = row
    return write(tmp_path, jsonl(*lines))


@pytest.mark.parametrize("lineno, row, kind, reason", BAD_LINES, ids=[b[2] for b in BAD_LINES])
def test_each_error_kind_fails_with_its_line_and_reason(tmp_path, lineno, row, kind, reason):
    p = write(tmp_path, jsonl(*([GOOD] * (lineno - 1)), row, GOOD))
    with pytest.raises(DataError) as e:
        read_records(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{lineno}: ") and reason in msg
    assert "--on-error skip" in msg  # the fix is part of the message


def test_skip_collects_every_error_with_exact_lines(bad_file):
    data = read_records(bad_file, on_error="skip")
    assert [r.line for r in data.records] == [1, 3, 7, 10]
    assert [(e.line, e.kind) for e in data.errors] == [(b[0], b[2]) for b in BAD_LINES]
    for err, (_, _, _, reason) in zip(data.errors, BAD_LINES):
        assert reason in err.reason
    assert data.skipped == 6


def test_skip_summary_groups_reasons(tmp_path):
    p = write(tmp_path, jsonl(GOOD, "{bad", {"content": DRESS}, "{bad", {"content": DRESS}, {"content": DRESS}))
    summary = read_records(p, on_error="skip").skip_summary()
    assert summary.startswith("skipped 5 record(s): ")
    assert "bad JSON: 2 records (lines 2, 4)" in summary
    assert "missing field: 3 records (lines 3, 5, 6), e.g. field 'summary' is missing" in summary


def test_all_records_bad_is_an_error_even_with_skip(tmp_path):
    p = write(tmp_path, jsonl("{bad", "{bad"))
    with pytest.raises(DataError, match=r"no usable records \(skipped 2 record"):
        read_records(p, on_error="skip")


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]"])
def test_empty_file_is_an_error(tmp_path, content):
    with pytest.raises(DataError, match="the file has no records"):
        read_records(write(tmp_path, content))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "nope.json")


# --- inspect ------------------------------------------------------------------------------------


def test_length_stats_nearest_rank():
    assert length_stats(list(range(1, 101))) == {"min": 1, "p50": 50, "p90": 90, "p99": 99, "max": 100, "mean": 50.5}
    assert length_stats([7]) == {"min": 7, "p50": 7, "p90": 7, "p99": 7, "max": 7, "mean": 7.0}


def test_inspect_counts_duplicates_placeholders_and_attributes(tmp_path):
    rows = [
        {"content": "类型#裙*颜色#黑色", "summary": "BRAND的裙子<UNK>好看"},
        {"content": "类型#裙*颜色#黑色", "summary": "BRAND的裙子<UNK>好看"},  # duplicate pair
        {"content": "类型#裙*颜色#黑色", "summary": "另一段文案"},  # same content, new copy
        {"content": "类型#裤*颜色#白色*颜色#黑色", "summary": "BRAND BRAND"},
    ]
    report = inspect_data(read_records(write(tmp_path, jsonl(*rows))))
    assert (report["records"], report["distinct_contents"], report["duplicate_pairs"]) == (4, 2, 1)
    assert report["placeholders"]["BRAND"] == {"content": 0, "summary": 4, "records": 3}
    assert report["placeholders"]["<UNK>"] == {"content": 0, "summary": 2, "records": 2}
    assert report["attributes"]["top_keys"][0] == ("颜色", 5)
    assert report["attributes"]["top_values"][0] == ("颜色#黑色", 4)
    assert report["lengths"]["summary_chars"]["max"] == len("BRAND的裙子<UNK>好看")


def test_inspect_dev_report_is_json_and_readable(adgen_dev_path):
    data = read_records(adgen_dev_path)
    report = json.loads(json.dumps(inspect_data(data), ensure_ascii=False))
    assert (report["records"], report["skipped"], report["encoding"], report["errors"]) == (1070, 0, "utf-8", [])
    assert (report["distinct_contents"], report["duplicate_pairs"]) == (1000, 1)
    assert report["placeholders"]["<UNK>"]["records"] == 300
    chars = report["lengths"]["summary_chars"]
    assert chars["max"] == max(len(r.summary) for r in data.records)
    assert chars["p50"] <= chars["p90"] <= chars["p99"] <= chars["max"]
    text = format_inspect_text(inspect_data(data))
    assert "records            1070" in text and "UTF-8" in text and "duplicate pairs    1" in text


def test_inspect_token_lengths_use_the_tokenizer(tmp_path, llama3_tokenizer):
    rows = [{"content": DRESS, "summary": COPY}, {"content": "类型#裤", "summary": COPY * 3}]
    report = inspect_data(read_records(write(tmp_path, jsonl(*rows))), llama3_tokenizer, model="llama3")
    expected = [len(llama3_tokenizer(r["summary"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert report["lengths"]["summary_tokens"]["max"] == max(expected)
    assert report["lengths"]["summary_tokens"]["min"] == min(expected)
    assert report["lengths"]["tokenizer"] == "llama3"
    assert "lengths in tokens (llama3)" in format_inspect_text(report)


# --- convert ------------------------------------------------------------------------------------


def test_convert_formats_and_system_prompt():
    r = Record(DRESS, COPY, 1, {})
    assert convert_record(r, "alpaca") == {"instruction": DRESS, "input": "", "output": COPY}
    assert convert_record(r, "sharegpt") == {
        "conversations": [{"from": "human", "value": DRESS}, {"from": "gpt", "value": COPY}]
    }
    assert convert_record(r, "messages", "写广告") == {
        "messages": [
            {"role": "system", "content": "写广告"},
            {"role": "user", "content": DRESS},
            {"role": "assistant", "content": COPY},
        ]
    }
    assert convert_record(r, "alpaca", "写广告")["system"] == "写广告"
    with pytest.raises(DataError, match="no summary"):
        convert_record(Record(DRESS, None, 3, {}), "alpaca")


def test_alpaca_round_trip_gives_the_same_records(tmp_path, adgen_train_path):
    original = read_records(adgen_train_path)
    out = tmp_path / "train.alpaca.jsonl"
    assert write_converted(original.records, out, "alpaca") == 4000
    back = read_records(out, columns="alpaca")
    assert back.encoding == "utf-8"
    assert back.records == original.records


def test_convert_to_adgen_reencodes_gbk_as_utf8(tmp_path, adgen_train_path):
    out = tmp_path / "train.utf8.jsonl"
    write_converted(read_records(adgen_train_path).records, out, "adgen")
    raw = out.read_bytes()
    assert b"\r" not in raw
    first = json.loads(raw.decode("utf-8").split("\n", 1)[0])
    assert first["content"] == "类型#裤*版型#宽松*风格#性感*图案#线条*裤型#阔腿裤"
