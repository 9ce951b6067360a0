"""Evaluate a generator on AdGen records: generate (resumable), score, write the run directory.

    result = run_eval(generator, records, "runs/eval-x", DecodingConfig(max_new_tokens=64),
                      data_path="dev.json")

The run directory holds, when finished:

- `generated_predictions.jsonl`: one line per record, in input order: `index`, `line` (the input
  file's line), `content`, `prompt` (the exact rendered prompt text), `label`, `predict`,
  `finish_reason`, `prompt_tokens`, `completion_tokens`, and the per-example scores of
  `adgen.metrics.score_example` (rouge-1/2/l, bleu-4, text statistics, faithfulness). The file
  is LLaMA-Factory-compatible (`prompt`, `predict`, `label`), so `adgen score` reads it too.
- `metrics.json`: the means (`metrics`), the protocol, decoding, model, adapter, data path +
  sha256, vocabulary, engine (backend, device, dtype), timings, version, date.
- `report.md`: see `adgen.evaluation.report`.

Resume: while generating, each finished record is appended (one write + fsync) to
`generations.partial.jsonl`, and `eval_state.json` holds the run's fingerprint (model, adapter,
data sha256, decoding, system prompt). Running again into the same directory with the same
fingerprint skips the records already generated; another fingerprint is an error (pass
`overwrite=True` to discard it). The final artefacts are written atomically, after which the
partial file and the state are removed. Scores are computed at the end, from the texts, so a
resumed run is scored exactly like an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from adgen import __version__
from adgen.data.attributes import attributes_of
from adgen.errors import AdgenError
from adgen.evaluation.report import render_report
from adgen.generation.bulk import generations_as_done
from adgen.generation.config import DecodingConfig
from adgen.generation.resumable import JsonlAppender, progress_bar, record_key, scan_output
from adgen.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from adgen.metrics import AttributeVocab, PredictionRow, aggregate, score_all
from adgen.run_dirs import RunDirectory, RunDirMessages

log = logging.getLogger(__name__)

PROTOCOL = "jieba+rouge_chinese f*100, nltk sentence_bleu char method3 *100, mean over examples"
PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PARTIAL_FILE = "generations.partial.jsonl"
STATE_FILE = "eval_state.json"
VOCAB_FILE = "attribute_vocab.json"
METRICS_FORMAT = "adgen-eval"
METRICS_VERSION = 1
BUILTIN_VOCAB = "built-in (adgen/resources/attribute_vocab.json)"


# ---- inputs ----------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_vocab_path(adapter: str | Path) -> Path | None:
    """The `attribute_vocab.json` training saved with an adapter, if any.

    Looked for in the adapter directory itself, then its parent (the training output dir for
    `OUT/adapter`), then, for a checkpoint's `OUT/checkpoints/step-N/adapter`, in `OUT`.
    """
    a = Path(adapter)
    candidates = [a / VOCAB_FILE, a.parent / VOCAB_FILE]
    if a.parent.parent.name == "checkpoints":
        candidates.append(a.parent.parent.parent / VOCAB_FILE)
    return next((c for c in candidates if c.is_file()), None)


def resolve_vocab(vocab_path: str | Path | None = None, adapter: str | Path | None = None):
    """(AttributeVocab, where it came from): `vocab_path`, else the adapter's run, else built-in."""
    if vocab_path:
        return AttributeVocab.load(vocab_path), str(Path(vocab_path).resolve())
    if adapter:
        found = adapter_vocab_path(adapter)
        if found is not None:
            return AttributeVocab.load(found), str(found.resolve())
    return AttributeVocab.default(), BUILTIN_VOCAB


def decoding_dict(decoding) -> dict[str, Any]:
    d = asdict(decoding)
    d["stop"] = list(d.get("stop") or ())
    d["dry_sequence_breakers"] = list(d.get("dry_sequence_breakers") or ())
    return d


def _model_id(model: str | Path) -> str:
    p = Path(str(model)).expanduser()
    return str(p.resolve()) if p.exists() else str(model)


def make_fingerprint(*, model, adapter, data_sha256: str, decoding, system_prompt: str | None) -> dict[str, Any]:
    """What makes two evaluations the same run (and a partial one resumable).

    For greedy decoding the sampling fields (temperature, top_p, top_k, seed) change nothing and
    are left out, so `--temperature 0` and plain greedy resume each other.
    """
    dec = decoding_dict(decoding)
    if decoding.greedy:
        for k in ("do_sample", "temperature", "top_p", "top_k", "seed"):
            dec.pop(k, None)
        dec["greedy"] = True
    return {
        "model": _model_id(model),
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "data_sha256": data_sha256,
        "decoding": dec,
        "system_prompt": system_prompt or None,
    }


def fingerprint_of(generator, data_sha256: str, decoding) -> dict[str, Any]:
    return make_fingerprint(
        model=generator.model_name,
        adapter=generator.adapter,
        data_sha256=data_sha256,
        decoding=decoding,
        system_prompt=_system_prompt(generator),
    )


def _system_prompt(generator) -> str | None:
    return generator.formatter.system_prompt if generator.formatter is not None else None


# ---- the run directory -----------------------------------------------------------------------


EVAL_DIR = RunDirectory(
    owned=(STATE_FILE, PARTIAL_FILE, PREDICTIONS_FILE, METRICS_FILE, REPORT_FILE),
    markers=(METRICS_FILE,),  # a finished evaluation; an unfinished one has its state and partial file
    manifest=STATE_FILE,
    settings_key="fingerprint",
    resumable=(STATE_FILE, PARTIAL_FILE),
    messages=RunDirMessages(
        is_file="--output-dir {path} is a file, not a directory; choose another --output-dir",
        unreadable=f"{{path}} holds an unfinished evaluation whose {STATE_FILE} is missing or unreadable; "
                   "pass --overwrite to start afresh there, or choose another --output-dir",
        other_settings="{path} holds an unfinished evaluation of a different run ({diff}); "
                       "pass --overwrite to discard it, or choose another --output-dir",
        finished=f"{{path}} already holds a finished evaluation ({METRICS_FILE}); choose another --output-dir "
                 "or pass --overwrite to replace it",
        # foreign None: an evaluation may share its directory with other files (only its own are touched)
    ),
)


def prepare_output_dir(
    output_dir: str | Path, fingerprint: dict, *, overwrite: bool = False, claim: bool = True
) -> dict[str, dict]:
    """Check the run directory; return the generations of an unfinished run to resume (key -> row).

    Cheap: call it with `claim=False` before loading a model, so a wrong directory fails fast
    (with `overwrite=True` that call already removes the old run's files). `claim=True` also
    writes the fingerprint (`eval_state.json`), marking the directory as this run's.
    """
    out = Path(output_dir)
    resuming = EVAL_DIR.prepare(out, fingerprint, overwrite=overwrite)
    done = read_partial(out / PARTIAL_FILE) if resuming else {}
    if claim:
        EVAL_DIR.claim(out, fingerprint, started=_now())
    return done


def read_partial(path: Path) -> dict[str, dict]:
    """Generations already made (key -> row); a partial last line from a kill is cut off first."""
    if not path.exists():
        return {}
    try:
        scan_output(path, repair=True)
    except AdgenError:
        raise AdgenError(
            f"{path}: not an adgen eval partial file; pass --overwrite to start afresh, or choose another --output-dir"
        ) from None
    done = {}
    for raw in path.read_text(encoding="utf-8").split("\n"):
        if raw.strip():
            row = json.loads(raw)
            done[record_key(row["line"], row["content"])] = row
    return done


# ---- the evaluation --------------------------------------------------------------------------


@dataclass
class EvalResult:
    output_dir: Path
    metrics: dict[str, Any]  # the content of metrics.json
    rows: list[dict[str, Any]] = field(repr=False)  # the lines of generated_predictions.jsonl

    @property
    def predictions_path(self) -> Path:
        return self.output_dir / PREDICTIONS_FILE

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    @property
    def report_path(self) -> Path:
        return self.output_dir / REPORT_FILE


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _engine(generator) -> dict[str, Any]:
    dtype, model = None, generator.model
    if model is not None:
        try:
            dtype = next(model.parameters()).dtype
        except (AttributeError, StopIteration, TypeError):
            dtype = None
    try:
        device = str(generator.device)
    except Exception:  # a backend without a device property
        device = None
    return {
        "backend": generator.backend,
        "device": device,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "batch_size": generator.batch_size,
        "continuous_batching": generator.uses_engine,
    }


def _generate_missing(generator, todo: Sequence, decoding, partial_path: Path, done: dict, bar) -> dict[str, Any]:
    """Generate for `todo` records (longest content first: less padding), appending each to the partial file."""
    todo = sorted(todo, key=lambda r: -len(r.content))
    tokens = 0
    start = time.perf_counter()
    with JsonlAppender(partial_path) as out:
        for i, g in generations_as_done(generator, [r.content for r in todo], decoding):
            rec = todo[i]
            row = {
                "line": rec.line,
                "content": rec.content,
                "predict": g.text,
                "finish_reason": g.finish_reason,
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": g.completion_tokens,
            }
            out.write(row)
            done[record_key(rec.line, rec.content)] = row
            tokens += g.completion_tokens
            if bar is not None:
                bar.update(1)
    seconds = time.perf_counter() - start
    return {"records": len(todo), "tokens": tokens, "seconds": seconds}


def _prompt_text(generator, content: str) -> str | None:
    formatter = generator.formatter
    try:
        return formatter.prompt_text(content) if formatter is not None else None
    except Exception:  # the prompt is informative only; never fail an eval over it
        return None


def run_eval(
    generator,
    records: Sequence,
    output_dir: str | Path,
    decoding=None,
    *,
    data_path: str | Path | None = None,
    data_info: dict[str, Any] | None = None,
    vocab=None,
    vocab_source: str | None = None,
    fingerprint: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    model_load_s: float | None = None,
    report_examples: int = 3,
) -> EvalResult:
    """Generate for every record (objects with `.line`, `.content`, `.summary`), score, write the run dir.

    `data_path` is hashed (sha256) into metrics.json and the fingerprint; `data_info` adds facts
    about the read (limit, skipped records, encoding). `vocab` defaults to the built-in vocabulary.
    `fingerprint` defaults to the generator's (see `make_fingerprint`); a matching unfinished run
    in `output_dir` is resumed.
    """
    t0 = time.perf_counter()
    decoding = decoding or DecodingConfig()
    decoding = generator.resolve(decoding)  # sizes max_new_tokens from the tokenizer when unset
    records = _checked_records(records)
    data_sha = sha256_file(data_path) if data_path is not None else None
    if vocab is None:
        vocab, vocab_source = AttributeVocab.default(), vocab_source or BUILTIN_VOCAB
    fp = fingerprint or fingerprint_of(generator, data_sha or "", decoding)
    out = Path(output_dir)
    done = prepare_output_dir(out, fp, overwrite=overwrite)
    keys = [record_key(r.line, r.content) for r in records]
    todo = [r for r, k in zip(records, keys) if k not in done]
    resumed = len(records) - len(todo)
    if resumed:
        log.info("%s: resuming, %d of %d records already generated", out, resumed, len(records))

    bar = progress_bar(len(records), resumed, progress, desc="eval")
    try:
        gen = _generate_missing(generator, todo, decoding, out / PARTIAL_FILE, done, bar)
    finally:
        if bar is not None:
            bar.close()

    # ---- score (from the texts; identical for a resumed run) ----
    t_score = time.perf_counter()
    gens = [done[k] for k in keys]
    scored = score_all(
        [PredictionRow(predict=g["predict"], label=r.summary, attributes=attributes_of(r.content)) for r, g in zip(records, gens)],
        vocab,
        progress=progress,
    )
    rows = _prediction_rows(generator, records, gens, scored)
    timings = {"model_load_s": model_load_s, "scoring_s": time.perf_counter() - t_score, "resumed": resumed}
    metrics = _eval_metrics(generator, rows, aggregate(scored), decoding, gen, timings,
                            data={"path": data_path, "sha256": data_sha, "info": data_info},
                            vocab=vocab, vocab_source=vocab_source, fingerprint=fp)
    metrics["timings"]["total_s"] = round(time.perf_counter() - t0 + (model_load_s or 0.0), 3)

    atomic_write_jsonl(out / PREDICTIONS_FILE, rows)
    atomic_write_json(out / METRICS_FILE, metrics)
    atomic_write_text(out / REPORT_FILE, render_report(metrics, rows, k=report_examples))
    (out / PARTIAL_FILE).unlink(missing_ok=True)
    (out / STATE_FILE).unlink(missing_ok=True)
    return EvalResult(out, metrics, rows)


def _checked_records(records: Sequence) -> list:
    records = list(records)
    if not records:
        raise AdgenError("no records to evaluate (the data file is empty, or --limit is 0)")
    missing = [r.line for r in records if not getattr(r, "summary", None)]
    if missing:
        raise AdgenError(f"record(s) at line(s) {', '.join(map(str, missing[:5]))} have no summary (reference); eval needs one per record")
    return records


def _prediction_rows(generator, records: Sequence, gens: Sequence[dict], scored: Sequence[dict]) -> list[dict]:
    """generated_predictions.jsonl: one row per record, its text, how it ended and its scores."""
    return [
        {
            "index": i,
            "line": rec.line,
            "content": rec.content,
            "prompt": _prompt_text(generator, rec.content),
            "label": rec.summary,
            "predict": g["predict"],
            "finish_reason": g["finish_reason"],
            "prompt_tokens": g["prompt_tokens"],
            "completion_tokens": g["completion_tokens"],
            **s,
        }
        for i, (rec, g, s) in enumerate(zip(records, gens, scored))
    ]


def _eval_metrics(generator, rows: list[dict], summary: dict, decoding, gen: dict, timings: dict, *, data: dict,
                  vocab, vocab_source, fingerprint: dict) -> dict[str, Any]:
    """metrics.json: the aggregate scores, how the texts ended, and what produced them (total_s left to fill)."""
    finish = Counter(r["finish_reason"] for r in rows)
    n = len(rows)
    gen_s = gen["seconds"]
    model_load_s = timings["model_load_s"]
    return {
        "format": METRICS_FORMAT,
        "version": METRICS_VERSION,
        "adgen_version": __version__,
        "date": _now(),
        "protocol": PROTOCOL,
        "n": n,
        "metrics": summary,
        "finish_reasons": dict(sorted(finish.items())),
        "hit_max_new_tokens_share": finish.get("length", 0) / n,
        "stopped_by_loop_share": finish.get("loop", 0) / n,
        "ended_on_eot_share": finish.get("stop", 0) / n,
        "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / n,
        "decoding": {**decoding_dict(decoding), "greedy": decoding.greedy, "description": decoding.describe()},
        "model": generator.model_name,
        "adapter": generator.adapter,
        "system_prompt": _system_prompt(generator),
        "data": {
            "path": str(Path(data["path"]).resolve()) if data["path"] is not None else None,
            "sha256": data["sha256"],
            "records": n,
            **(data["info"] or {}),
        },
        "vocab": {"source": vocab_source or getattr(vocab, "source", None), "keys": len(getattr(vocab, "values", {}))},
        "engine": _engine(generator),
        "timings": {
            "model_load_s": round(model_load_s, 3) if model_load_s is not None else None,
            "generation_s": round(gen_s, 3),
            "scoring_s": round(timings["scoring_s"], 3),
            "total_s": None,  # filled by run_eval
            "generated_records": gen["records"],
            "resumed_records": timings["resumed"],
            "generated_tokens": gen["tokens"],
            "samples_per_s": round(gen["records"] / gen_s, 4) if gen_s > 0 and gen["records"] else None,
            "tokens_per_s": round(gen["tokens"] / gen_s, 2) if gen_s > 0 and gen["tokens"] else None,
        },
        "fingerprint": fingerprint,
    }
