"""Evaluation of a model on an AdGen file, and comparison of evaluation runs.

- `run`: generate for every record (resumable), score with `adgen.metrics`, write the run directory:
  `generated_predictions.jsonl`, `metrics.json`, `report.md` (`run_eval`).
- `report`: `report.md` from the metrics and the scored rows (`render_report`).
- `compare`: side-by-side markdown table + bar chart of several run directories (`compare_runs`).

matplotlib is imported inside the function that draws the chart; nothing here imports torch.
"""

from adgen.evaluation.compare import RunMetrics, compare_runs, comparison_markdown, load_run
from adgen.evaluation.run import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    PROTOCOL,
    REPORT_FILE,
    EvalResult,
    make_fingerprint,
    resolve_vocab,
    run_eval,
    sha256_file,
)

__all__ = [
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "PROTOCOL",
    "REPORT_FILE",
    "EvalResult",
    "RunMetrics",
    "compare_runs",
    "comparison_markdown",
    "load_run",
    "make_fingerprint",
    "resolve_vocab",
    "run_eval",
    "sha256_file",
]
