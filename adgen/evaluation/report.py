"""`report.md` of an evaluation run: headline table, decoding, notes, best and worst examples.

Also holds the list of summary figures (`METRICS`: key, label, which direction is better) that
the report, `adgen eval`'s summary table and `adgen compare` share.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from rich.table import Table

# (key in metrics.json "metrics", label, better: "high" | "low" | None (neither))
METRICS: tuple[tuple[str, str, str | None], ...] = (
    ("rouge-1", "ROUGE-1", "high"),
    ("rouge-2", "ROUGE-2", "high"),
    ("rouge-l", "ROUGE-L", "high"),
    ("bleu-4", "BLEU-4", "high"),
    ("attr_coverage", "attribute coverage", "high"),
    ("attr_contradiction_rate", "contradiction rate", "low"),
    ("contradictions_per_example", "contradictions / example", "low"),
    ("hallucinated_per_example", "hallucinated / example", "low"),
    ("compliance_violation_rate", "Ad Law violation rate", "low"),
    ("chinese_share", "Chinese share", "high"),
    ("repetition_rate", "repetition (4-gram)", "low"),
    ("distinct-1", "distinct-1", "high"),
    ("distinct-2", "distinct-2", "high"),
    ("length_chars", "length (chars)", None),
)
PROTOCOL_METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
LABELS = {k: label for k, label, _ in METRICS}
COUNT_LABELS = {"n_with_attributes": "examples with attributes"}

# Thresholds for the notes (rules of thumb, stated in the notes themselves).
DRIFT_BELOW = 0.9
REPETITION_ABOVE = 0.2


def fmt_value(key: str, value: Any, decimals: int | None = None) -> str:
    """A metric for people: counts as integers, length to 0.1, protocol scores to 0.01 and shares to
    0.001 -- or every fractional figure to `decimals` places when given (`adgen score` uses 4)."""
    if value is None:
        return "n/a"
    if key in ("n", "n_with_attributes"):
        return str(value)
    if key == "length_chars":
        return f"{value:.1f}"
    if decimals is not None:
        return f"{value:.{decimals}f}"
    if key in PROTOCOL_METRICS:
        return f"{value:.2f}"
    return f"{value:.3f}"


# How the terminal tables group the figures (`adgen eval`'s summary, `adgen score`).
METRIC_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("protocol (jieba ROUGE F x100, char BLEU-4 x100)", PROTOCOL_METRICS),
    (
        "attribute faithfulness",
        ("n_with_attributes", "attr_coverage", "attr_contradiction_rate",
         "contradictions_per_example", "hallucinated_per_example"),
    ),
    ("compliance (Ad Law absolute terms)", ("compliance_violation_rate",)),
    ("text", ("chinese_share", "repetition_rate", "distinct-1", "distinct-2", "length_chars")),
)


def top_terms(found: Mapping[str, int] | None, k: int = 8) -> str:
    """`最佳 ×3, NO.1 ×1` -- the forbidden terms found most often (`compliance_terms_found`), or ""."""
    if not found:
        return ""
    items = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{term} ×{count}" for term, count in items[:k])
    return text + (f" (+{len(items) - k} more)" if len(items) > k else "")


def metrics_table(values: Mapping[str, Any], title: str, *, value_header: str = "value",
                  decimals: int | None = None, use_labels: bool = True) -> Table:
    """A rich Table of the figures in `values`, one section per METRIC_SECTIONS group (groups with no
    figure present are left out). `use_labels=False` shows the raw keys (`adgen score`, whose output
    people grep against its JSON)."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column(value_header, justify="right")
    for section, keys in METRIC_SECTIONS:
        present = [k for k in keys if k in values]
        if not present:
            continue
        table.add_section()
        table.add_row(f"[bold]{section}[/bold]", "")
        for key in present:
            label = (LABELS.get(key) or COUNT_LABELS.get(key, key)) if use_labels else key
            table.add_row(label, fmt_value(key, values[key], decimals=decimals))
    return table


def _fenced(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _example(rank: int, row: Mapping[str, Any]) -> str:
    head = f"### {rank}. line {row.get('line')}: ROUGE-L {row['rouge-l']:.2f}, BLEU-4 {row['bleu-4']:.2f}"
    cov = row.get("attr_coverage")
    if cov is not None:
        head += f", coverage {cov:.0%}"
    if row.get("compliance_terms"):
        head += ", forbidden: " + " ".join(row["compliance_terms"])
    if row.get("finish_reason") == "length":
        head += " (hit max_new_tokens)"
    elif row.get("finish_reason") == "loop":
        head += " (stopped by loop detection, repeats trimmed)"
    parts = [head, "", f"content: `{row['content']}`", "", "label:", "", _fenced(row["label"]), "", "predict:", "",
             _fenced(row["predict"]) if row["predict"] else "*(empty)*", ""]
    return "\n".join(parts)


def pick_examples(rows: Sequence[Mapping[str, Any]], k: int = 3) -> tuple[list, list]:
    """(best k, worst k) rows by ROUGE-L (ties: BLEU-4, then earlier first); the worst never repeat a best one."""
    by_score = sorted(rows, key=lambda r: (-r["rouge-l"], -r["bleu-4"], r.get("index", 0)))
    best = by_score[:k]
    taken = {id(r) for r in best}
    worst = [r for r in sorted(rows, key=lambda r: (r["rouge-l"], r["bleu-4"], r.get("index", 0))) if id(r) not in taken][:k]
    return best, worst


def notes(metrics: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    n = len(rows) or 1
    m = metrics.get("metrics", {})
    out = []
    length = sum(r.get("finish_reason") == "length" for r in rows)
    max_new = metrics.get("decoding", {}).get("max_new_tokens")
    out.append(
        f"{length}/{len(rows)} outputs ({length / n:.0%}) hit max_new_tokens={max_new} "
        '(finish_reason "length": the model never stopped'
        + ("; raise --max-new-tokens, or check that generation stops on the end-of-turn token)" if length else ")")
    )
    loops = sum(r.get("finish_reason") == "loop" for r in rows)
    if loops:
        out.append(f"{loops}/{len(rows)} outputs ({loops / n:.0%}) were stopped by loop detection "
                   '(finish_reason "loop"; the repeated tail is trimmed from the text).')
    empty = sum(not r.get("predict", "").strip() for r in rows)
    if empty:
        out.append(f"{empty} output(s) are empty (scored 0).")
    cs = m.get("chinese_share")
    if cs is not None and cs < DRIFT_BELOW:
        out.append(f"Chinese share {cs:.2f} < {DRIFT_BELOW}: outputs drift out of Chinese (often to English).")
    rep = m.get("repetition_rate")
    if rep is not None and rep > REPETITION_ABOVE:
        out.append(f"repetition {rep:.2f} > {REPETITION_ABOVE}: outputs loop (repeated 4-grams).")
    rate = m.get("attr_contradiction_rate")
    if rate:
        out.append(f"{rate:.0%} of outputs contradict a given attribute (e.g. another colour than the input's).")
    banned = m.get("compliance_violation_rate")
    if banned:
        out.append(f"{banned:.1%} of outputs use a forbidden term ({m.get('compliance_list')}; "
                   f"see docs/METRICS.md, Compliance): {top_terms(m.get('compliance_terms_found'))}. "
                   "For scale: AdGen's dev references themselves are at 1.0%.")
    return out


def render_report(metrics: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, k: int = 3) -> str:
    m = metrics.get("metrics", {})
    data = metrics.get("data", {})
    engine = metrics.get("engine", {})
    t = metrics.get("timings", {})
    title = f"# Evaluation: {metrics.get('model')}"
    if metrics.get("adapter"):
        title += f" + adapter {metrics['adapter']}"
    lines = [title, ""]
    sha = data.get("sha256")
    lines += [
        f"- data: `{data.get('path')}` ({metrics.get('n')} records" + (f", sha256 `{sha[:16]}…`" if sha else "") + ")",
        f"- decoding: {metrics.get('decoding', {}).get('description')}",
        f"- engine: {engine.get('backend')} on {engine.get('device')}, {engine.get('dtype')}, batch size {engine.get('batch_size')}",
        f"- attribute vocabulary: {metrics.get('vocab', {}).get('source')}",
        *([f"- compliance term list: {m['compliance_list']}"] if m.get("compliance_list") else []),
        f"- protocol: {metrics.get('protocol')}",
        f"- adgen {metrics.get('adgen_version')}, {metrics.get('date')}",
        "",
        "## Metrics",
        "",
        "| metric | mean |",
        "|---|---:|",
    ]
    for key, label, better in METRICS:
        if key in m:
            arrow = {"high": " (higher is better)", "low": " (lower is better)"}.get(better or "", "")
            lines.append(f"| {label}{arrow} | {fmt_value(key, m[key])} |")
    if "n_with_attributes" in m:
        lines.append(f"| {COUNT_LABELS['n_with_attributes']} | {m['n_with_attributes']} |")
    lines += ["", "ROUGE / BLEU-4 are x100 (comparable with published AdGen tables only under the same decoding).", ""]

    sps, tps = t.get("samples_per_s"), t.get("tokens_per_s")
    lines += [
        "## Timings",
        "",
        f"- generation: {t.get('generation_s')} s for {t.get('generated_records')} records "
        f"({t.get('generated_tokens')} tokens): "
        + (f"{sps:.3f} samples/s, {tps:.1f} tokens/s" if sps and tps else "n/a (nothing generated in this run)"),
    ]
    if t.get("resumed_records"):
        lines.append(f"- resumed: {t['resumed_records']} records were generated by an earlier, interrupted run")
    lines += [f"- model load: {t.get('model_load_s')} s; scoring: {t.get('scoring_s')} s; total: {t.get('total_s')} s", ""]

    lines += ["## Notes", ""] + [f"- {note}" for note in notes(metrics, rows)] + [""]

    best, worst = pick_examples(rows, k)
    lines += [f"## Best {len(best)} by ROUGE-L", ""]
    lines += [_example(i, r) for i, r in enumerate(best, 1)]
    if worst:
        lines += [f"## Worst {len(worst)} by ROUGE-L", ""]
        lines += [_example(i, r) for i, r in enumerate(worst, 1)]
    return "\n".join(lines).rstrip() + "\n"
