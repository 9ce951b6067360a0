"""`adgen data convert`: AdGen records -> the formats other SFT tools read (UTF-8 JSON lines).

- alpaca:   `{"instruction": content, "input": "", "output": summary}` — LLaMA-Factory's default
            alpaca columns; its own adgen entry maps prompt=content, response=summary the same way.
- sharegpt: `{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}` (LLaMA-Factory,
            FastChat, axolotl).
- messages: `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` (OpenAI, TRL).
- adgen:    `{"content", "summary"}` — e.g. a GBK file or an alpaca file back to plain UTF-8 AdGen.

A system prompt, when given, goes where each format keeps it: a `system` field (alpaca, sharegpt,
as LLaMA-Factory reads them) or a first `system` message.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from adgen.data.records import Record
from adgen.errors import DataError
from adgen.io import atomic_write_jsonl

Format = Literal["alpaca", "sharegpt", "messages", "adgen"]
FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "messages", "adgen")


def convert_record(record: Record, to: Format, system_prompt: str | None = None) -> dict[str, Any]:
    if record.summary is None:
        raise DataError(f"line {record.line}: no summary to convert. Converted files are for training: every record needs one")
    c, s = record.content, record.summary
    system = {"system": system_prompt} if system_prompt else {}
    if to == "alpaca":
        return {"instruction": c, "input": "", "output": s, **system}
    if to == "sharegpt":
        return {"conversations": [{"from": "human", "value": c}, {"from": "gpt", "value": s}], **system}
    if to == "messages":
        sys_msg = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return {"messages": [*sys_msg, {"role": "user", "content": c}, {"role": "assistant", "content": s}]}
    if to == "adgen":
        return {"content": c, "summary": s}
    raise ValueError(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")


def convert_records(records: Iterable[Record], to: Format, system_prompt: str | None = None) -> list[dict[str, Any]]:
    return [convert_record(r, to, system_prompt) for r in records]


def write_converted(
    records: Iterable[Record], out: str | Path, to: Format, system_prompt: str | None = None
) -> int:
    """Convert and write atomically as UTF-8 JSON lines; returns the number of rows written."""
    rows = convert_records(records, to, system_prompt)  # all before writing: a bad record leaves no file
    atomic_write_jsonl(out, rows)
    return len(rows)
