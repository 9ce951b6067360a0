"""`adgen data preview`: exactly what the model will be trained on, token by token."""

from __future__ import annotations

from pathlib import Path

from adgen.data.chat import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, ChatFormatter, LossOn
from adgen.data.records import read_records
from adgen.models import load_tokenizer


def preview_records(
    path: str | Path,
    model: str,
    *,
    n: int = 3,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    loss_on: LossOn = "response",
    max_length: int = 1024,
    encoding: str | None = None,
    on_error: str = "fail",
    columns: dict | None = None,
) -> list[dict]:
    """The first `n` records as {prompt, response, input_ids, labels, truncated, line}.

    `prompt` decodes the ids before the first labelled token, `response` decodes exactly the ids that
    carry labels (so a stray header or a missing end-of-turn token shows up here).
    """
    data = read_records(path, encoding=encoding, on_error=on_error, columns=columns)
    tokenizer = load_tokenizer(model)
    formatter = ChatFormatter(tokenizer, system_prompt=system_prompt, loss_on=loss_on, max_length=max_length)
    rows = []
    for rec in data.records[: max(n, 0)]:
        ex = formatter.encode(rec.content, rec.summary)
        if ex is None:
            rows.append({"line": rec.line, "dropped": True, "reason": f"prompt longer than max_length={max_length}"})
            continue
        prompt_len = len(formatter.prompt_ids(rec.content))
        labelled = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
        rows.append(
            {
                "line": rec.line,
                "prompt": tokenizer.decode(ex.input_ids[:prompt_len], skip_special_tokens=False),
                "response": tokenizer.decode(labelled, skip_special_tokens=False),
                "input_ids": ex.input_ids,
                "labels": ex.labels,
                "truncated": ex.truncated,
            }
        )
    return rows


def format_preview_text(rows: list[dict]) -> str:
    out = []
    for row in rows:
        if row.get("dropped"):
            out.append(f"── line {row['line']}: dropped ({row['reason']})")
            continue
        n_lab = sum(1 for x in row["labels"] if x != IGNORE_INDEX)
        out.append(
            f"── line {row['line']}: {len(row['input_ids'])} tokens, {n_lab} with labels"
            + (" (truncated)" if row["truncated"] else "")
        )
        out.append("[prompt]")
        out.append(row["prompt"])
        out.append("[response: the tokens that carry labels]")
        out.append(row["response"])
        out.append("")
    return "\n".join(out)
