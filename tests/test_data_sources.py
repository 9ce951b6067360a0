"""Data where users keep it: Parquet, CSV, `save_to_disk` directories and Hub ids read the same
records as the JSON lines of the same data; their errors name the file and row; a Hub id offline
fails at once with one line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adgen.data.records import read_records
from adgen.data.sources import resolve_source
from adgen.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dev_rows(adgen_dev_path) -> list[dict]:
    """The real dev set (GBK JSON lines) as rows with an extra integer column."""
    return [{"content": r.content, "summary": r.summary, "sku": i} for i, r in enumerate(read_records(adgen_dev_path))]


@pytest.fixture(scope="module")
def same_data(tmp_path_factory, dev_rows) -> dict[str, Path]:
    """The same rows as JSON lines, Parquet (several row groups), GBK CSV and a save_to_disk directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("same-data")
    jsonl = d / "dev.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dev_rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(dev_rows), d / "dev.parquet", row_group_size=256)
    with open(d / "dev.csv", "w", encoding="gbk", newline="") as f:
        w = csv.DictWriter(f, ["content", "summary", "sku"])
        w.writeheader()
        w.writerows(dev_rows)
    datasets.Dataset.from_list(dev_rows).save_to_disk(str(d / "dev-ds"))
    return {"jsonl": jsonl, "parquet": d / "dev.parquet", "csv": d / "dev.csv", "disk": d / "dev-ds"}


def _triples(data, sku_as=int):
    return [(r.content, r.summary, sku_as(r.extra["sku"])) for r in data.records]


@pytest.mark.parametrize("kind", ["parquet", "csv", "disk"])
def test_table_sources_read_the_same_records_as_jsonl(same_data, kind):
    ref = read_records(same_data["jsonl"])
    got = read_records(same_data[kind])
    assert len(got) == len(ref) == 1070
    # CSV has no types: its extra column comes back as text
    assert _triples(got, int) == _triples(ref)
    rows = [r.line for r in got.records]
    assert rows == (list(range(2, 1072)) if kind == "csv" else list(range(1, 1071)))
    assert got.encoding == {"parquet": "parquet", "csv": "gbk", "disk": "arrow"}[kind]


def test_catalog_without_summary_and_column_mapping(tmp_path, dev_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": r["content"], "output": None if i % 2 else r["summary"]} for i, r in enumerate(dev_rows[:6])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    data = read_records(tmp_path / "alpaca.parquet", columns="alpaca", require_summary=False)
    assert [r.content for r in data] == [r["content"] for r in dev_rows[:6]]
    assert [r.summary is None for r in data] == [False, True] * 3
    with pytest.raises(DataError, match=r"alpaca\.parquet: row 2: field 'output' \(the summary column\) is null"):
        read_records(tmp_path / "alpaca.parquet", columns="alpaca")


def test_errors_name_the_row_or_line_and_the_fix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["类型#裙", "类型#裤"], "summary": [None, 7]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError) as e:
        read_records(tmp_path / "bad.parquet")
    assert str(e.value).startswith(f"{tmp_path / 'bad.parquet'}: row 1: field 'summary' is null")
    bad = read_records(tmp_path / "bad.parquet", on_error="skip", require_summary=False)
    assert [r.summary for r in bad.records] == [None] and "row 2" not in str(bad.errors)
    pq.write_table(pa.table({"content": ["类型#裙"], "summary": [7]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError) as e:
        read_records(tmp_path / "bad.parquet")
    assert str(e.value).startswith(f"{tmp_path / 'bad.parquet'}: row 1: field 'summary' is a number, not a string. "
                                   "Make it a string column")
    (tmp_path / "bad.csv").write_text("content,summary\n类型#裙,好看\n\n类型#裙\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:4: field 'summary' is missing"):
        read_records(tmp_path / "bad.csv")
    skipped = read_records(tmp_path / "bad.csv", on_error="skip")
    assert len(skipped) == 1 and skipped.errors[0].line == 4
    (tmp_path / "notparquet.parquet").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read it as Parquet"):
        read_records(tmp_path / "notparquet.parquet")
    (tmp_path / "plain-dir").mkdir()
    with pytest.raises(DataError, match="is a directory, not a data file.*save_to_disk"):
        read_records(tmp_path / "plain-dir")
    # JSON's own messages are unchanged
    with pytest.raises(DataError, match=r"^nosuch\.json: no such file\. Check the path$"):
        read_records("nosuch.json")
    with pytest.raises(DataError, match=r"^nosuch\.parquet: no such file\. Check the path$"):
        read_records("nosuch.parquet")


def test_dataset_dict_splits(tmp_path, dev_rows):
    import datasets

    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_list(dev_rows[:5]),
                               "test": datasets.Dataset.from_list(dev_rows[5:8])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.content for r in read_records(f"{tmp_path / 'dd'}:test")] == [r["content"] for r in dev_rows[5:8]]
    assert len(read_records(tmp_path / "dd", split="validation")) == 5
    with pytest.raises(DataError, match="has splits validation, test; pick one with .*:SPLIT"):
        read_records(tmp_path / "dd")
    with pytest.raises(DataError, match="no split 'dev'; it has validation, test"):
        read_records(f"{tmp_path / 'dd'}:dev")


def test_resolve_source_tells_paths_from_hub_ids(tmp_path):
    assert resolve_source("owner/name").kind == "hub"
    assert resolve_source("owner/name:validation") == resolve_source("owner/name", "validation")
    with pytest.raises(DataError, match="no such file"):
        resolve_source("missing-dir/train.jsonl")
    (tmp_path / "x.csv").write_text("content\n类型#裙\n", encoding="utf-8")
    assert resolve_source(tmp_path / "x.csv").kind == "csv"


def test_hub_id_offline_is_one_line_exit_2(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "adgen", "data", "inspect", "adgen-test/no-such-dataset:train"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < 30  # no network retries
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("adgen: error: adgen-test/no-such-dataset:train: no such local file or directory")
    assert "HF_HUB_OFFLINE" in lines[0] and "Pass a local path" in lines[0]


def test_generate_reads_a_parquet_catalog_like_its_jsonl(tmp_path, tiny_llama3_dir, dev_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adgen.cli import main

    rows = [{"sku": r["sku"], "content": r["content"]} for r in dev_rows[:4]]
    (tmp_path / "cat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cat.parquet")
    outs = {}
    for name in ("cat.jsonl", "cat.parquet"):
        out = tmp_path / f"{name}.out.jsonl"
        assert main(["generate", "--model", str(tiny_llama3_dir), "--input", str(tmp_path / name), "--output", str(out),
                     "--max-new-tokens", "8", "--no-progress", "--device", "cpu"]) == 0
        outs[name] = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert outs["cat.parquet"] == outs["cat.jsonl"]
    assert [o["sku"] for o in outs["cat.parquet"]] == [0, 1, 2, 3]


def test_train_reads_a_save_to_disk_directory(tmp_path, tiny_llama3_dir, same_data):
    from train_helpers import tiny_config, train_losses

    from adgen.train import train

    train(tiny_config(tiny_llama3_dir, same_data["jsonl"], tmp_path / "a", max_steps=2))
    train(tiny_config(tiny_llama3_dir, same_data["disk"], tmp_path / "b", max_steps=2))
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
