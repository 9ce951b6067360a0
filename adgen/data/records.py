"""Reading AdGen data files: JSON lines (or a JSON array) of `{"content", "summary"}` records.

Every problem is reported as `<path>:<line>: <reason>. <how to fix>` with the physical line number
of the file (1-based). With `on_error="fail"` the first problem raises `DataError`; with
`on_error="skip"` bad records are left out and collected in `DataFile.errors`.

Encodings: a BOM wins (UTF-8 or UTF-16); else strict UTF-8; else GBK (or its superset GB18030).
An explicit `encoding` overrides detection.

Column mapping: `columns={"content": "instruction", "summary": "output"}` reads LLaMA-Factory
alpaca-style files (`parse_columns("alpaca")` gives exactly that). Alpaca's optional `input` field:
when the content column is `instruction` and a record has a non-empty `input`, the `input` is the
content and the `instruction` is taken to be a fixed task description (kept in `extra`). That is how
alpaca exports of AdGen that use both fields are laid out ("根据商品属性写广告" + "类型#裙*...");
joining them the way LLaMA-Factory does would not give an attribute string.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adgen.data.attributes import parse_attributes
from adgen.data.errors import BadRecord
from adgen.data.sources import iter_rows, resolve_source
from adgen.errors import AdgenError, DataError

OnError = Literal["fail", "skip"]
FIELDS = ("content", "summary")
COLUMN_PRESETS: dict[str, dict[str, str]] = {
    "adgen": {"content": "content", "summary": "summary"},
    "alpaca": {"content": "instruction", "summary": "output"},
}
SKIP_HINT = "or pass --on-error skip to leave such records out"


@dataclass(frozen=True)
class Record:
    content: str
    summary: str | None  # None only when read with require_summary=False (e.g. a catalog to generate for)
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict, hash=False)  # the file's other fields (ids, ...)

    @property
    def attributes(self) -> list[tuple[str, str]]:
        return parse_attributes(self.content)


@dataclass(frozen=True)
class RecordError:
    line: int
    reason: str
    kind: str = ""  # short class of problem ("bad JSON", "missing field", ...): what skip summaries group by


@dataclass
class DataFile:
    path: Path
    encoding: str
    records: list[Record]
    errors: list[RecordError]
    newline: str = "lf"  # "lf" | "crlf" | "mixed" | "none": what the file used, for inspect

    @property
    def skipped(self) -> int:
        return len(self.errors)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def skip_summary(self, max_lines: int = 5) -> str:
        """One line grouped by kind, or "" when nothing was skipped:
        `skipped 3 record(s): bad JSON: 2 records (lines 3, 7), e.g. ...; line 9: field 'summary' is empty`."""
        if not self.errors:
            return ""
        groups: dict[str, list[RecordError]] = {}
        for err in self.errors:
            groups.setdefault(err.kind or err.reason, []).append(err)
        parts = []
        for kind, errs in groups.items():
            if len(errs) == 1:
                parts.append(f"line {errs[0].line}: {errs[0].reason}")
                continue
            lines = ", ".join(str(e.line) for e in errs[:max_lines]) + (", ..." if len(errs) > max_lines else "")
            parts.append(f"{kind}: {len(errs)} records (lines {lines}), e.g. {errs[0].reason}")
        return f"skipped {len(self.errors)} record(s): " + "; ".join(parts)


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """`"content=instruction,summary=output"` or a preset name (`alpaca`, `adgen`) -> a column map."""
    if spec is None:
        return dict(COLUMN_PRESETS["adgen"])
    if isinstance(spec, str):
        if spec.strip() in COLUMN_PRESETS:
            return dict(COLUMN_PRESETS[spec.strip()])
        pairs = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            ours, sep, theirs = (s.strip() for s in part.partition("="))
            if not sep or not theirs:
                raise AdgenError(f"--columns: {part!r} is not FIELD=NAME; use e.g. content=instruction,summary=output or alpaca")
            pairs[ours] = theirs
        spec = pairs
    if not all(isinstance(v, str) and v.strip() for v in spec.values()):
        raise AdgenError(f"--columns: every field needs a column name, got {dict(spec)!r}")
    unknown = set(spec) - set(FIELDS)
    if unknown:
        raise AdgenError(f"--columns: unknown field(s) {', '.join(sorted(unknown))}; only content and summary can be mapped")
    return {**COLUMN_PRESETS["adgen"], **spec}


def _newline_style(text: str) -> str:
    crlf = text.count("\r\n")
    lf = text.count("\n") - crlf
    return "mixed" if crlf and lf else "crlf" if crlf else "lf" if lf else "none"


def _line_at(buf: str | bytes, pos: int) -> int:
    """1-based line of position `pos` (error paths only: it scans from the start)."""
    return buf.count(b"\n" if isinstance(buf, bytes) else "\n", 0, pos) + 1


def decode_data(data: bytes, path: str | Path, encoding: str | None = None) -> tuple[str, str]:
    """Bytes -> (text, encoding name). Detection order: BOM, strict UTF-8, GBK, GB18030."""
    if encoding:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise AdgenError(f"--encoding: unknown encoding {encoding!r}; use e.g. utf-8, utf-8-sig or gbk") from None
        try:
            return data.decode(name), name
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{_line_at(data, e.start)}: cannot decode as {name} ({e.reason} at byte {e.start}). "
                "Leave out --encoding to detect it, or pass the file's real encoding (e.g. utf-8, gbk)"
            ) from None
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="strict"), "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16"), "utf-16"
    failures: dict[str, UnicodeDecodeError] = {}
    # GBK before GB18030: report the narrower name the issue and users know; GB18030 is its superset.
    for name in ("utf-8", "gbk", "gb18030"):
        try:
            return data.decode(name), name
        except UnicodeDecodeError as e:
            failures[name] = e
    # The encoding that got furthest is most likely the file's own: its error is the real bad byte.
    name, err = max(failures.items(), key=lambda item: item[1].start)
    raise DataError(
        f"{path}:{_line_at(data, err.start)}: cannot decode the file as UTF-8, GBK or GB18030 "
        f"(as {name}: {err.reason} at byte {err.start}). Pass its encoding with --encoding NAME, or convert it to UTF-8"
    )


def _lines(text: str) -> Iterator[str]:
    start = 0
    while True:
        end = text.find("\n", start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + 1


def _iter_jsonl(text: str) -> Iterator[tuple[int, Any]]:
    """(physical line, parsed object or BadRecord) per non-blank line."""
    # Split on "\n" only: str.splitlines() would also break on U+2028 etc., which JSON strings may hold.
    # A CRLF's "\r" needs no stripping: it is JSON whitespace.
    # Line by line with find(), not split(): a list of every line would be a second copy of the file.
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, BadRecord(
                "bad JSON", f"bad JSON: {e.msg} (column {e.colno})", "Each line must be one complete JSON object"
            )


_WS = re.compile(r"[ \t\r\n]*")


def _iter_array(text: str, path: str | Path) -> Iterator[tuple[int, Any]]:
    """(physical line where the item starts, item) for a JSON array, decoded item by item.

    Decoding item by item (raw_decode) gives each record's real line cheaply. A syntax error cannot
    be skipped: past it there is no telling where the next item starts.
    """
    decoder = json.JSONDecoder()
    pos, line, i = 0, 1, _WS.match(text, text.index("[") + 1).end()
    if i < len(text) and text[i] == "]":
        i = _WS.match(text, i + 1).end()
    else:
        while True:
            line, pos = line + text.count("\n", pos, i), i
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{e.lineno}: bad JSON in the array: {e.msg} (column {e.colno}). "
                    "Fix the file: a JSON array cannot be read past a syntax error, even with --on-error skip"
                ) from None
            yield line, obj
            i = _WS.match(text, end).end()
            if text.startswith(",", i):
                i = _WS.match(text, i + 1).end()
            elif text.startswith("]", i):
                i = _WS.match(text, i + 1).end()
                break
            else:
                raise DataError(
                    f"{path}:{_line_at(text, i)}: bad JSON in the array: expected ',' or ']'. Fix the file"
                )
    if i < len(text):
        raise DataError(f"{path}:{_line_at(text, i)}: unexpected data after the JSON array. Fix the file")


def _json_type(value: Any) -> str:
    # JSON's names, not Python's: the user wrote JSON.
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "an array", dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


def _get_text(obj: dict, ours: str, theirs: str, required: bool) -> str | None:
    name = f"'{theirs}'" + (f" (the {ours} column)" if ours != theirs else "")
    value = obj.get(theirs)
    if not required and (value is None or (isinstance(value, str) and not value.strip())):
        return None  # e.g. a catalog record that has no copy yet
    if value is None:
        raise BadRecord(
            "missing field",
            f"field {name} {'is null' if theirs in obj else 'is missing'}",
            f"Add it, or map your file's field with --columns {ours}=NAME",
        )
    if not isinstance(value, str):
        raise BadRecord("not a string", f"field {name} is {_json_type(value)}, not a string", "Make it a JSON string")
    if not value.strip():
        raise BadRecord("empty field", f"field {name} is empty", "Fill it in")
    return value


def _to_record(obj: Any, line: int, columns: Mapping[str, str], require_summary: bool) -> Record:
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {_json_type(obj)}", "Each record must be a JSON object")
    content_col = columns["content"]
    alpaca_input = obj.get("input") if content_col == "instruction" else None
    if isinstance(alpaca_input, str) and alpaca_input.strip():
        content_col = "input"  # see the module docstring: instruction is then the task, input the attributes
    content = _get_text(obj, "content", content_col, required=True)
    summary = _get_text(obj, "summary", columns["summary"], required=require_summary)
    assert content is not None
    try:
        parse_attributes(content)
    except ValueError as e:
        raise BadRecord(
            "bad attributes",
            f"content is not an attribute string: {e}",
            "Content must be key#value pairs joined by '*', e.g. 类型#裙*颜色#黑色",
        ) from None
    used = {content_col, columns["summary"]} | ({"input"} if columns["content"] == "instruction" else set())
    return Record(content, summary, line, {k: v for k, v in obj.items() if k not in used})


def read_records(
    path: str | Path,
    *,
    encoding: str | None = None,
    on_error: OnError = "fail",
    columns: Mapping[str, str] | str | None = None,
    require_summary: bool = True,
    split: str | None = None,
) -> DataFile:
    """Read and validate an AdGen file (see the module docstring). Raises DataError on a problem
    (with on_error="fail"), on an undecodable or empty file, and when no record is usable.

    Besides JSON: Parquet, CSV/TSV, a `save_to_disk` directory or a Hub dataset id (`ID[:SPLIT]`),
    read row by row by `adgen.data.sources`; their errors name `<path>:<line>` (CSV) or `<path>: row N`."""
    if on_error not in ("fail", "skip"):
        raise AdgenError(f"--on-error must be fail or skip, not {on_error!r}")
    cols = parse_columns(columns)
    source = resolve_source(path, split)
    if source.kind != "json":
        return _read_table(source, encoding, on_error, cols, require_summary)
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file. Check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file. Pass the .json/.jsonl file itself") from None
    text, enc = decode_data(data, path, encoding)
    del data  # the bytes and the text of a large file need not live side by side while parsing
    text = text.removeprefix("\ufeff")  # a BOM under an explicit --encoding utf-8 would break record 1
    is_array = text.lstrip().startswith("[")
    items = _iter_array(text, path) if is_array else _iter_jsonl(text)
    records, errors = _collect(items, lambda line: f"{path}:{line}", cols, require_summary, on_error, is_array)
    result = DataFile(p, enc, records, errors, _newline_style(text))
    if not records:
        why = result.skip_summary() if errors else "the file has no records"
        raise DataError(
            f"{path}: no usable records ({why}). Expected JSON lines of "
            '{"content": "key#value*...", "summary": "..."}; map other field names with --columns'
        )
    return result


def _collect(items, where, cols, require_summary: bool, on_error: OnError, is_array: bool = False, fixes=None):
    """Records and errors from `(line, obj)` items; with on_error="fail" the first problem raises."""
    records: list[Record] = []
    errors: list[RecordError] = []
    for index, (line, obj) in enumerate(items, start=1):
        try:
            records.append(_to_record(obj, line, cols, require_summary))
        except BadRecord as bad:
            reason = f"array item {index}: {bad.reason}" if is_array else bad.reason
            if on_error == "fail":
                fix = (fixes or {}).get(bad.kind, bad.fix)
                raise DataError(f"{where(line)}: {reason}. {fix}, {SKIP_HINT}") from None
            errors.append(RecordError(line, reason, bad.kind))
    return records, errors


# JSON's wording does not fit a table's typed columns.
_TABLE_FIXES = {"not a string": "Make it a string column", "not an object": "Give each row content and summary columns"}


def _read_table(source, encoding, on_error: OnError, cols, require_summary: bool) -> DataFile:
    rows, enc = iter_rows(source, encoding)
    records, errors = _collect(rows, source.where, cols, require_summary, on_error, fixes=_TABLE_FIXES)
    result = DataFile(Path(source.location), enc, records, errors, "lf" if source.kind == "csv" else "none")
    if not records:
        why = result.skip_summary() if errors else "it has no rows"
        wanted = ", ".join(v for k, v in cols.items() if require_summary or k == "content")
        raise DataError(f"{source.label}: no usable records ({why}). Expected columns {wanted} "
                        "(content: key#value*...); map other column names with --columns")
    return result
