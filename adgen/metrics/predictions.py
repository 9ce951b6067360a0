"""Prediction files: JSON lines with a prediction, a reference and, optionally, the input.

The format is LLaMA-Factory's `generated_predictions.jsonl` (`{"prompt", "predict", "label"}`)
and adgen's own (`{"content", "predict", "label", ...}`). The input attributes come from
`content` (an AdGen `key#value*key#value` string) or, when there is none, from `prompt` (a
rendered chat prompt, from which the last `key#value(*key#value)*` run is taken).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adgen.data.attributes import parse_attributes
from adgen.errors import DataError
from adgen.io import read_utf8_text

# Keys and values in AdGen are word characters only (CJK, letters, digits); stopping there keeps
# chat-template markup ("<|eot_id|>", "\n", "：") out of the first key and the last value.
_ATTRIBUTE_RUN = re.compile(r"[^\W_]+#[^\W_]+(?:\*[^\W_]+#[^\W_]+)*")


@dataclass(frozen=True)
class PredictionRow:
    predict: str
    label: str
    attributes: list[tuple[str, str]] | None = None  # None: the input is unknown
    line: int | None = None


def extract_attribute_string(prompt: str) -> str | None:
    """The AdGen attribute string of a rendered prompt: its last `k#v(*k#v)*` run, or None.

    The last, not the longest: the input is the final user turn, and what comes before may hold
    look-alikes (adgen's own system prompt explains the format with "属性#取值", longer than a
    one-attribute input such as "类型#裙"; few-shot examples come first too).
    """
    runs = _ATTRIBUTE_RUN.findall(prompt)
    return runs[-1] if runs else None


def attributes_from_fields(obj: dict[str, Any], *, where: str) -> list[tuple[str, str]] | None:
    """Attributes from `content` (must parse) or else from `prompt` (best effort); None if neither."""
    content = obj.get("content")
    if content is not None:
        if not isinstance(content, str):
            raise DataError(f'{where}: "content" must be a string like "类型#裙*颜色#白色"; fix the line or drop the field.')
        try:
            return parse_attributes(content)
        except ValueError as e:
            raise DataError(
                f'{where}: bad "content" ({e}); it must be key#value parts joined by "*", e.g. "类型#裙*颜色#白色".'
            ) from None
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        found = extract_attribute_string(prompt)
        if found:
            return parse_attributes(found)  # the regex only yields well-formed strings
    return None


def parse_prediction_line(
    text: str,
    *,
    where: str,
    pred_field: str = "predict",
    label_field: str = "label",
    line: int | None = None,
) -> PredictionRow | None:
    """One JSON line -> PredictionRow (None for a blank line); DataError naming `where` otherwise."""
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object.") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with {pred_field!r} and {label_field!r}.")
    for name, option in ((pred_field, "--pred-field"), (label_field, "--label-field")):
        if name not in obj:
            raise DataError(
                f"{where}: no {name!r} field (fields: {', '.join(map(repr, obj)) or 'none'}); "
                f"name the right one with {option}."
            )
        if not isinstance(obj[name], str):
            raise DataError(f"{where}: {name!r} must be a string, got {type(obj[name]).__name__}.")
    return PredictionRow(
        predict=obj[pred_field],
        label=obj[label_field],
        attributes=attributes_from_fields(obj, where=where),
        line=line,
    )


def read_predictions(
    path: str | Path, *, pred_field: str = "predict", label_field: str = "label"
) -> list[PredictionRow]:
    """Read a JSON-lines prediction file (UTF-8, BOM tolerated, LF or CRLF)."""
    path = Path(path)
    text = read_utf8_text(path, "the predictions file (JSON lines with predict and label)")
    rows: list[PredictionRow] = []
    # split("\n"), not splitlines(): a U+2028 inside a JSON string is not a line break.
    for number, line in enumerate(text.split("\n"), start=1):
        row = parse_prediction_line(
            line.rstrip("\r"), where=f"{path}:{number}", pred_field=pred_field, label_field=label_field, line=number
        )
        if row is not None:
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no predictions in the file; expected JSON lines with {pred_field!r} and {label_field!r}.")
    return rows
