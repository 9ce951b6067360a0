"""Compare evaluation runs: a markdown table (metrics as rows, runs as columns) and a bar chart.

    result = compare_runs(["runs/eval-zero-shot", "runs/eval-lora"], "runs/compare")
    # -> runs/compare/comparison.md, runs/compare/comparison.png

A run is a directory written by `adgen eval` (its `metrics.json`), or a metrics.json file. Flat
metric files (`{"rouge-1": ..}`, LLaMA-Factory's `{"predict_rouge-1": ..}`) are read too.

Table: the best value of each row is bold (higher or lower is better, per metric; length has no
best), and one column per later run gives its difference from the first run. Under the table each
run's model, adapter, data and decoding are listed, with a warning when the runs were not made on
the same data (sha256), the same number of records, or the same decoding.

Chart (PNG, ASCII labels: matplotlib's default font has no CJK glyphs): grouped bars of ROUGE-1,
ROUGE-2, ROUGE-L, BLEU-4 (x100) in one panel, and of the 0-1 figures (attribute coverage,
contradiction rate, Advertising-Law violation rate, Chinese share, repetition, distinct-2, share of
outputs that hit max_new_tokens) in a second.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from adgen.errors import AdgenError
from adgen.evaluation.report import LABELS, METRICS, fmt_value
from adgen.io import atomic_write_bytes, atomic_write_text
from adgen.evaluation.run import METRICS_FILE, STATE_FILE

log = logging.getLogger(__name__)

TABLE_FILE = "comparison.md"
CHART_FILE = "comparison.png"
STOPPING = ("hit_max_new_tokens_share", "hit max_new_tokens (never stopped)", "low")
LOOPS = ("stopped_by_loop_share", "stopped by loop detection", "low")
SPEED = (("samples_per_s", "samples/s", "high"), ("tokens_per_s", "generated tokens/s", "high"))
CHART_PROTOCOL = (("rouge-1", "ROUGE-1"), ("rouge-2", "ROUGE-2"), ("rouge-l", "ROUGE-L"), ("bleu-4", "BLEU-4"))
CHART_SHARES = (
    ("attr_coverage", "coverage\n(higher better)"),
    ("attr_contradiction_rate", "contradiction\nrate\n(lower better)"),
    ("compliance_violation_rate", "Ad Law\nviolations\n(lower better)"),
    ("chinese_share", "Chinese share\n(higher better)"),
    ("repetition_rate", "repetition\n(lower better)"),
    ("distinct-2", "distinct-2\n(higher better)"),
    ("hit_max_new_tokens_share", "never stopped\n(lower better)"),
    ("stopped_by_loop_share", "stopped by\nloop detection\n(lower better)"),
)


@dataclass
class RunMetrics:
    name: str
    path: Path
    metrics: dict[str, float | None]  # summary figures (keys of report.METRICS, "n", speed)
    info: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole metrics.json

    def describe(self) -> str:
        i = self.info
        parts = [f"`{self.path}`"]
        if i.get("model"):
            parts.append(f"model {i['model']}" + (f" + adapter {i['adapter']}" if i.get("adapter") else ""))
        data = i.get("data") or {}
        if data.get("path"):
            parts.append(f"data {Path(data['path']).name}" + (f" (sha256 {data['sha256'][:12]}…)" if data.get("sha256") else ""))
        if self.metrics.get("n") is not None:
            parts.append(f"n={self.metrics['n']}")
        desc = (i.get("decoding") or {}).get("description")
        if desc:
            parts.append(desc)
        if "system_prompt" in i:
            sp = i["system_prompt"]
            parts.append("no system prompt" if not sp else f"system prompt “{sp[:16]}…”" if len(sp) > 16 else f"system prompt “{sp}”")
        return "; ".join(parts)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return v


def load_run(path: str | Path, name: str | None = None) -> RunMetrics:
    """Read one run (an `adgen eval` directory or a metrics JSON file); AdgenError when it is not one."""
    p = Path(path)
    if p.is_file():
        metrics_path = p
    elif p.is_dir():
        metrics_path = p / METRICS_FILE
        if not metrics_path.is_file():
            hint = (
                " (an unfinished eval: run it again with the same --output-dir to finish it)"
                if (p / STATE_FILE).exists()
                else ""
            )
            raise AdgenError(f"{p}: no {METRICS_FILE} in this directory{hint}; give run directories written by `adgen eval`")
    else:
        raise AdgenError(f"{p}: no such run directory; give run directories written by `adgen eval`")
    try:
        data = json.loads(metrics_path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise AdgenError(f"{metrics_path}: not UTF-8 ({e.reason}); is it an `adgen eval` metrics.json?") from None
    except json.JSONDecodeError as e:
        raise AdgenError(f"{metrics_path}: not valid JSON ({e.msg}, line {e.lineno}); is it an `adgen eval` metrics.json?") from None
    if not isinstance(data, dict):
        raise AdgenError(f"{metrics_path}: expected a JSON object of metrics, got {type(data).__name__}")
    flat = data.get("metrics") if isinstance(data.get("metrics"), dict) else data
    means: dict[str, float | None] = {}
    for key, value in flat.items():
        key = str(key).removeprefix("predict_").removeprefix("eval_")
        if key in LABELS or key == "n":
            means[key] = _number(value)
    if "n" not in means and _number(data.get("n")) is not None:
        means["n"] = data["n"]
    for key in (STOPPING[0], LOOPS[0]):
        means[key] = _number(data.get(key))
    for key, _, _ in SPEED:
        means[key] = _number((data.get("timings") or {}).get(key))
    if not any(means.get(k) is not None for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")):
        raise AdgenError(
            f"{metrics_path}: no ROUGE / BLEU-4 figures in it (expected \"metrics\": {{\"rouge-1\": ..}}); "
            "is it an `adgen eval` metrics.json?"
        )
    return RunMetrics(name or (p.parent.name if p.is_file() else p.name) or str(p), p, means, data)


def load_runs(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[RunMetrics]:
    if not paths:
        raise AdgenError("give at least one run directory to compare")
    if names is not None and len(names) != len(paths):
        raise AdgenError(f"--names gives {len(names)} name(s) for {len(paths)} run(s); give one per run, comma-separated")
    runs = [load_run(p, names[i] if names else None) for i, p in enumerate(paths)]
    if names is None:
        _disambiguate(runs)
    elif len(set(names)) != len(names):
        raise AdgenError(f"--names has duplicates ({', '.join(names)}); give each run its own name")
    return runs


def _disambiguate(runs: list[RunMetrics]) -> None:
    """Same directory names (a/eval, b/eval): name them parent/name, then number what is left."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    for r in runs:
        if seen[r.name] > 1:
            base = r.path.parent if r.path.is_file() else r.path
            r.name = f"{base.parent.name}/{base.name}"
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
        if counts[r.name] > 1:
            r.name = f"{r.name}#{counts[r.name]}"


# ---- table -----------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    better: str | None
    values: list[float | None]
    best: set[int]  # indices of the best run(s); empty when there is no best
    deltas: list[float | None]  # run i - run 0, for i >= 1


def comparison_rows(runs: Sequence[RunMetrics]) -> list[Row]:
    specs = [*METRICS, STOPPING, LOOPS, ("n", "examples (n)", None), *SPEED]
    rows = []
    for key, label, better in specs:
        values = [r.metrics.get(key) for r in runs]
        if all(v is None for v in values):
            continue
        present = [v for v in values if v is not None]
        best: set[int] = set()
        if better and len(runs) > 1 and len(present) > 1 and max(present) != min(present):
            target = max(present) if better == "high" else min(present)
            best = {i for i, v in enumerate(values) if v is not None and math.isclose(v, target, rel_tol=0, abs_tol=1e-12)}
        base = values[0]
        deltas = [None if (v is None or base is None) else v - base for v in values[1:]]
        rows.append(Row(key, label, better, values, best, deltas))
    return rows


def fmt_cell(key: str, v: float | None) -> str:
    if key in ("samples_per_s",):
        return "n/a" if v is None else f"{v:.3f}"
    if key in ("tokens_per_s",):
        return "n/a" if v is None else f"{v:.1f}"
    return fmt_value(key, v)


def fmt_delta(key: str, d: float | None) -> str:
    if d is None:
        return ""
    s = fmt_cell(key, abs(d)) if key != "n" else str(abs(int(d)))
    return ("+" if d > 0 else "-" if d < 0 else "±") + s



def row_cells(row, best_style: str, arrows: dict[str, str]) -> list[str]:
    """One comparison row as table cells: label (+ which way is better), each run's value (the best in
    `best_style`), then the differences to the first run."""
    cells = [f"{row.label}{arrows.get(row.better or '', '')}"]
    cells += [best_style.format(fmt_cell(row.key, v)) if i in row.best else fmt_cell(row.key, v)
              for i, v in enumerate(row.values)]
    return cells + [fmt_delta(row.key, d) for d in row.deltas]

def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def comparison_warnings(runs: Sequence[RunMetrics]) -> list[str]:
    if len(runs) < 2:
        return []
    out = []

    def differ(get) -> bool:
        vals = {json.dumps(get(r), sort_keys=True, default=str) for r in runs}
        return len(vals) > 1

    if differ(lambda r: (r.info.get("data") or {}).get("sha256")):
        out.append("the runs were evaluated on different data (sha256 differs): their figures are not comparable.")
    if differ(lambda r: r.metrics.get("n")):
        out.append("the runs have different numbers of examples (n).")
    if differ(lambda r: r.info.get("protocol")):
        out.append("the runs name different scoring protocols: do not compare their ROUGE / BLEU-4.")
    dec = lambda r: {k: v for k, v in (r.info.get("decoding") or {}).items() if k != "description"}  # noqa: E731
    if differ(dec):
        out.append("the runs used different decoding settings (see above).")
    if differ(lambda r: r.info.get("system_prompt")):
        out.append("the runs used different system prompts (see above).")
    return out


def comparison_markdown(runs: Sequence[RunMetrics], rows: Sequence[Row] | None = None) -> str:
    rows = comparison_rows(runs) if rows is None else rows
    first = runs[0].name
    head = ["metric", *(_cell(r.name) for r in runs), *(f"{_cell(r.name)} − {_cell(first)}" for r in runs[1:])]
    lines = [
        f"# Comparison of {len(runs)} run(s)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" + "---:|" * (len(head) - 1),
    ]
    for row in rows:
        lines.append("| " + " | ".join(row_cells(row, "**{}**", {"high": " ↑", "low": " ↓"})) + " |")
    lines += [
        "",
        "↑ higher is better, ↓ lower is better; the best value of a row is bold. "
        "ROUGE / BLEU-4: x100, jieba words / characters, mean over examples (the field's protocol).",
        "",
        "## Runs",
        "",
    ]
    lines += [f"- **{_cell(r.name)}**: {r.describe()}" for r in runs]
    warns = comparison_warnings(runs)
    if warns:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warns]
    return "\n".join(lines) + "\n"


# ---- chart -----------------------------------------------------------------------------------


def _font_for(names: Sequence[str]) -> str | None:
    """A font with CJK glyphs when a name needs one and one is installed; else None (default font)."""
    if all(n.isascii() for n in names):
        return None
    from matplotlib import font_manager  # matplotlib (~0.5 s to import) only where a chart is drawn

    for f in font_manager.fontManager.ttflist:
        if any(s in f.name for s in ("CJK", "WenQuanYi", "SimHei", "Hei", "Source Han", "PingFang", "Microsoft YaHei")):
            return f.name
    log.warning("run names with non-ASCII characters may not render in the chart (no CJK font installed); "
                "pass --names with ASCII names")
    return None


def _bars(ax, runs: Sequence[RunMetrics], metrics: Sequence[tuple[str, str]], fmt: str, *, ymax: float | None) -> None:
    n = len(runs)
    width = 0.8 / n
    xs = range(len(metrics))
    top = max((r.metrics.get(k) or 0.0 for r in runs for k, _ in metrics), default=0.0)
    for i, run in enumerate(runs):
        offs = [x - 0.4 + width * (i + 0.5) for x in xs]
        vals = [run.metrics.get(k) for k, _ in metrics]
        bars = ax.bar(offs, [v or 0.0 for v in vals], width, label=run.name, color=f"C{i % 10}")
        labels = ["n/a" if v is None else format(v, fmt) for v in vals]
        ax.bar_label(bars, labels=labels, padding=2, fontsize=7 if n <= 3 else 6, rotation=0 if n <= 3 else 90)
    ax.set_xticks(list(xs), [label for _, label in metrics], fontsize=8)
    limit = ymax if ymax is not None else (top * 1.18 if top > 0 else 1.0)
    ax.set_ylim(0, limit)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def render_chart(runs: Sequence[RunMetrics], *, title: str | None = None) -> bytes:
    """The comparison chart as PNG bytes (matplotlib, Agg; no global pyplot state)."""
    # matplotlib (~0.5 s to import) only where a chart is drawn: reading and tabulating runs does without it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    font = _font_for([r.name for r in runs])
    shares = [(k, label) for k, label in CHART_SHARES if any(r.metrics.get(k) is not None for r in runs)]
    fig = Figure(figsize=(12 if shares else 7, 5.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, width_ratios=[4, len(shares)]) if shares else [fig.subplots(1, 1)]
    _bars(axes[0], runs, CHART_PROTOCOL, ".2f", ymax=None)
    axes[0].set_title("protocol scores (x100, higher is better)", fontsize=10)
    axes[0].set_ylabel("score")
    if shares:
        _bars(axes[1], runs, shares, ".2f", ymax=1.12)
        axes[1].set_title("0-1 figures (means over examples)", fontsize=10)
        axes[1].set_ylabel("share")
    n_values = {r.metrics.get("n") for r in runs}
    suptitle = title or f"adgen compare: {len(runs)} run(s)" + (
        f", n={n_values.pop()} each" if len(n_values) == 1 and None not in n_values else ""
    )
    fig.suptitle(suptitle, fontsize=12)
    handles, labels = axes[0].get_legend_handles_labels()
    legend_kw = {"prop": {"family": font}} if font else {}
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 4), fontsize=9, **legend_kw)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---- all of it -------------------------------------------------------------------------------


@dataclass
class ComparisonResult:
    runs: list[RunMetrics]
    rows: list[Row]
    markdown: str
    table_path: Path
    chart_path: Path


def compare_runs(
    paths: Sequence[str | Path], output_dir: str | Path, *, names: Sequence[str] | None = None
) -> ComparisonResult:
    """Read the runs, write `comparison.md` and `comparison.png` into `output_dir` (atomically)."""
    runs = load_runs(paths, names)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise AdgenError(f"-o {out} is a file; give a directory for comparison.md and comparison.png")
    rows = comparison_rows(runs)
    md = comparison_markdown(runs, rows)
    png = render_chart(runs)
    atomic_write_text(out / TABLE_FILE, md)
    atomic_write_bytes(out / CHART_FILE, png)
    return ComparisonResult(runs, rows, md, out / TABLE_FILE, out / CHART_FILE)
