"""Where records come from besides JSON files: Parquet, CSV/TSV, a `datasets` `save_to_disk`
directory and a Hugging Face Hub dataset id. `read_records` (records.py) validates what these yield.

Every reader yields `(number, row)` one row at a time, so a large file is never held whole next to
its records: Parquet and `datasets` tables are read in record batches (datasets' Arrow files are
memory-mapped), CSV line by line. `number` is the physical line for CSV (header = line 1) and the
1-based row for tables; `Source.where(number)` turns it into the `<path>:<line>` / `<path>: row N`
that error messages start with.

A split is chosen with `SOURCE:SPLIT` (`shibing624/AdvertiseGen:validation`, `data/ds:test`) or the
`split` argument; without one, `train`, or the only split there is.
"""

from __future__ import annotations

import codecs
import csv
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from adgen.data.errors import BadRecord
from adgen.errors import AdgenError, DataError

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}
FILE_SUFFIXES = {*TABLE_SUFFIXES, ".json", ".jsonl", ".ndjson", ".txt", ".gz", ".zst", ".arrow"}
# `name` or `owner/name` (the Hub's own rule is stricter; this only tells ids from paths).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
BATCH_ROWS = 1024
LOCAL_FORMATS = "a JSON lines, Parquet or CSV file, or a directory written by datasets' save_to_disk"


@dataclass(frozen=True)
class Source:
    kind: str  # "json" | "parquet" | "csv" | "disk" | "hub"
    location: str  # path or hub id
    split: str | None = None

    @property
    def label(self) -> str:
        """How messages name it: the path / id, with the split when one was asked for."""
        return f"{self.location}:{self.split}" if self.split and self.kind in ("disk", "hub") else self.location

    def where(self, number: int) -> str:
        return f"{self.label}:{number}" if self.kind in ("json", "csv") else f"{self.label}: row {number}"


def _is_dataset_dir(p: Path) -> bool:
    return p.is_dir() and any((p / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _looks_like_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and Path(spec).suffix.lower() not in FILE_SUFFIXES


def resolve_source(spec: str | Path, split: str | None = None) -> Source:
    """What kind of source `spec` is. A path that exists wins over a hub id of the same spelling."""
    text = str(spec)
    p = Path(text)
    if not p.exists() and ":" in text and not split:
        base, _, maybe_split = text.rpartition(":")
        if maybe_split and "/" not in maybe_split and (_is_dataset_dir(Path(base)) or
                                                       (not Path(base).exists() and _looks_like_hub_id(base))):
            text, split, p = base, maybe_split, Path(base)
    if p.is_dir():
        if _is_dataset_dir(p):
            return Source("disk", text, split)
        raise DataError(f"{text}: is a directory, not a data file. Pass the .json/.jsonl/.parquet/.csv file itself, "
                        "or a directory written by datasets' save_to_disk")
    if not p.exists() and not _looks_like_hub_id(text):
        raise DataError(f"{text}: no such file. Check the path")
    if p.exists():
        return Source(TABLE_SUFFIXES.get(p.suffix.lower(), "json"), text, None)
    return Source("hub", text, split)


def iter_rows(source: Source, encoding: str | None = None) -> tuple[Iterator[tuple[int, Any]], str]:
    """(rows, encoding or format name) for a non-JSON source; rows are `(number, dict)`."""
    if source.kind == "parquet":
        return _parquet_rows(source.location), "parquet"
    if source.kind == "csv":
        return _csv_rows(source.location, encoding)
    if source.kind == "disk":
        return _dataset_rows(_load_disk(source)), "arrow"
    if source.kind == "hub":
        return _dataset_rows(_load_hub(source)), "arrow"
    raise ValueError(f"not a table source: {source.kind}")


# ---- Parquet -------------------------------------------------------------------------------------


def _parquet_rows(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq  # ~0.25 s: only for a Parquet source (this module is imported at CLI start-up)

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors carry no file name; say which file and what to do
        raise DataError(f"{path}: cannot read it as Parquet ({e}). Check that the file is Parquet, "
                        "or give it a .json/.jsonl/.csv name if it is not") from None
    number = 0
    with f:
        for batch in f.iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield number, row


# ---- CSV -----------------------------------------------------------------------------------------


def _csv_encodings(path: str, encoding: str | None) -> list[str]:
    """Candidates in detection order (records.decode_data's order), without reading the file whole."""
    if encoding:
        try:
            return [codecs.lookup(encoding).name]
        except LookupError:
            raise AdgenError(f"--encoding: unknown encoding {encoding!r}; use e.g. utf-8, utf-8-sig or gbk") from None
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(codecs.BOM_UTF8):
        return ["utf-8-sig"]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return ["utf-16"]
    return ["utf-8", "gbk", "gb18030"]


def _csv_rows(path: str, encoding: str | None) -> tuple[Iterator[tuple[int, Any]], str]:
    names = _csv_encodings(path, encoding)
    # Find the encoding with a streaming pass (no rows kept), so the real read is one pass too.
    for name in names:
        try:
            with open(path, encoding=name, newline="") as f:
                while f.read(1 << 20):
                    pass
            return _csv_read(path, name), name
        except UnicodeDecodeError as e:
            last = (name, e)
    name, err = last
    raise DataError(f"{path}: cannot decode the file as {' / '.join(names)} ({err.reason}). "
                    "Pass its encoding with --encoding NAME, or convert it to UTF-8")


def _csv_read(path: str, encoding: str) -> Iterator[tuple[int, Any]]:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        header = [h.strip() for h in header]
        end = reader.line_num
        try:
            for fields in reader:
                start, end = end + 1, reader.line_num
                if not fields or not any(x.strip() for x in fields):
                    continue
                if len(fields) > len(header):
                    yield start, BadRecord("bad CSV", f"the row has {len(fields)} fields, the header {len(header)}",
                                            "Quote fields that hold the delimiter")
                    continue
                yield start, dict(zip(header, fields))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: bad CSV: {e}. Fix the file (e.g. close the quoted field)") from None


# ---- datasets (save_to_disk directories and the Hub) ---------------------------------------------


def _pick_split(obj, source: Source):
    """A Dataset from a Dataset or DatasetDict: the asked split, else `train`, else the only one."""
    if not hasattr(obj, "keys"):  # a single Dataset
        if source.split:
            raise DataError(f"{source.label}: holds one dataset, not splits; leave out ':{source.split}'")
        return obj
    splits = list(obj.keys())
    if source.split:
        if source.split not in obj:
            raise DataError(f"{source.label}: no split {source.split!r}; it has {', '.join(splits)} "
                            f"(pass {source.location}:SPLIT)")
        return obj[source.split]
    if "train" in obj:
        return obj["train"]
    if len(splits) == 1:
        return obj[splits[0]]
    raise DataError(f"{source.location}: has splits {', '.join(splits)}; pick one with {source.location}:SPLIT")


def _load_disk(source: Source):
    import datasets  # ~1 s: only for a datasets directory (this module is imported at CLI start-up)

    try:
        obj = datasets.load_from_disk(source.location)
    except Exception as e:
        raise DataError(f"{source.location}: cannot load the dataset directory ({type(e).__name__}: {e}). "
                        "Pass a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk") from None
    return _pick_split(obj, source)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or \
        os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the Hub's endpoint: without a network, datasets retries for ~25 s before failing."""
    from huggingface_hub import constants  # a Hub source only (this module is imported at CLI start-up)

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _offline_mode():
    """Offline for one call (the libraries read HF_HUB_OFFLINE once, at import): the cache still serves."""
    import datasets.config  # a Hub source only (this module is imported at CLI start-up)
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _load_hub(source: Source):
    import datasets  # ~1 s: only for a Hub source (this module is imported at CLI start-up)

    fix = (f"Pass a local path ({LOCAL_FORMATS}), or load it once online so that it is cached "
           "(later runs read the cache with HF_HUB_OFFLINE=1)")
    datasets.disable_progress_bars()
    offline = _hub_offline()
    state = "offline (HF_HUB_OFFLINE=1)" if offline else "not cached, and the Hub did not answer"
    if not offline and not _hub_reachable():
        offline, state = True, "not cached, and the Hub cannot be reached (no network)"
    try:
        with _offline_mode() if offline else nullcontext():
            obj = datasets.load_dataset(source.location, split=source.split)
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "doesn't exist" in why or "not found" in why.lower():
            state = "not found on the Hub"
        raise DataError(f"{source.label}: no such local file or directory, and as a Hugging Face dataset id it is "
                        f"{state} ({type(e).__name__}: {why[:200]}). {fix}") from None
    return _pick_split(obj, source)


def _dataset_rows(ds) -> Iterator[tuple[int, dict]]:
    number = 0
    for batch in ds.iter(batch_size=BATCH_ROWS):  # dict of columns -> rows, one batch at a time
        cols = list(batch)
        for values in zip(*(batch[c] for c in cols)):
            number += 1
            yield number, dict(zip(cols, values))
