"""Generation metrics during training, the best checkpoint by a chosen metric, early stopping.

Eval loss says little about what a model writes: a model can lower it and still loop. Every
`gen_eval_every` steps the trainer generates for the first `gen_eval_samples` eval records with the
default decoding (greedy + character-level repetition control + loop detection, max_new_tokens sized
from the tokenizer), scores them with the field's protocol and attribute faithfulness, and logs one
metrics.jsonl row `{"step": s, "gen_eval": {...}}`. `best_metric` names the figure that picks `best/`
(a copy of the adapter / model at its best evaluation); `early_stopping_patience` ends the run after
that many evaluations without a new best. The best and the patience count are recomputed from
metrics.jsonl, so a resumed run continues them exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

from adgen.errors import ConfigError

# figure -> "high" or "low" is better; the gen-eval figures are read from a row's "gen_eval" dict
GEN_METRICS = {
    "rouge-1": "high", "rouge-2": "high", "rouge-l": "high", "bleu-4": "high",
    "attr_coverage": "high", "ended_share": "high", "repetition_rate": "low", "never_stopped_share": "low",
    "compliance_violation_rate": "low",
}
BEST_METRICS = {"eval_loss": "low", **GEN_METRICS}


def check_best_metric(name: str | None) -> None:
    if name is not None and name not in BEST_METRICS:
        raise ConfigError(f"config key 'best_metric' is '{name}'; use one of {', '.join(BEST_METRICS)} (or null)")


def metric_value(row: dict, name: str) -> float | None:
    if name == "eval_loss":
        return row.get("eval_loss")
    gen = row.get("gen_eval")
    return gen.get(name) if isinstance(gen, dict) else None


def best_so_far(metrics: Sequence[dict], name: str) -> tuple[int | None, float | None, int]:
    """(step of the best evaluation, its value, evaluations since it) over the logged rows."""
    better_high = BEST_METRICS[name] == "high"
    best_step, best, since = None, None, 0
    for row in metrics:
        value = metric_value(row, name)
        if value is None:
            continue
        if best is None or (value > best if better_high else value < best):
            best_step, best, since = row["step"], value, 0
        else:
            since += 1
    return best_step, best, since


def generation_metrics(model, tokenizer, formatter, records: Sequence, vocab, *, batch_size: int = 16,
                       max_new_tokens: int | None = None) -> dict[str, Any]:
    """Generate for `records` (with `.content`, `.summary`) and return the summary figures."""
    # here, not at the top: config.py imports this module for the metric names, and the CLI reads the config
    # without loading torch / transformers (the generation stack)
    from adgen.generation import DecodingConfig, HFGenerator
    from adgen.metrics import score_predictions

    was_training = model.training
    model.eval()
    try:
        gen = HFGenerator(model, tokenizer, formatter, batch_size=batch_size)
        outs = gen.generate([r.content for r in records], DecodingConfig(max_new_tokens=max_new_tokens))
    finally:
        model.train(was_training)
    rows = [{"predict": g.text, "label": r.summary, "content": r.content} for g, r in zip(outs, records)]
    summary = score_predictions(rows, vocab)
    n = max(1, len(outs))
    finish = [g.finish_reason for g in outs]
    keep = ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "attr_coverage", "attr_contradiction_rate",
            "repetition_rate", "chinese_share", "length_chars", "compliance_violation_rate")
    out = {k: summary.get(k) for k in keep}
    out.update(
        n=len(outs),
        ended_share=finish.count("stop") / n,
        never_stopped_share=finish.count("length") / n,
        loop_share=finish.count("loop") / n,
        example=outs[0].text if outs else "",
    )
    return out
