"""Resumable generation over a whole file: one JSON line per input record, written the moment it is done.

Output lines: `{"line": <input line>, "content": ..., "predict": ..., "finish_reason": ...}` plus the
input's `summary` and other fields when it has them, and `candidates` (all K texts) with their
`candidate_finish_reasons` with `n > 1`.

Resume (adgen.generation.resumable, shared with `adgen eval`): inputs whose key is already in the output
are skipped; a partial last line from a kill is cut off and that record generated again, so a killed
and rerun job has every input exactly once.

`generated_rows` is the one per-record loop (candidates in input order, the best kept, the output row, the
counts) of this file's job and of the Ray catalog's workers (adgen.generation.ray_catalog); `BulkSummary` is
what both report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from adgen.data.attributes import attributes_of
from adgen.errors import AdgenError
from adgen.generation.config import GENERATION_BATCH_SIZE, DecodingConfig, Generation
from adgen.generation.resumable import JsonlAppender, progress_bar, record_key, scan_output
from adgen.generation.selection import mbr_pick
from adgen.metrics import AttributeVocab, faithfulness

log = logging.getLogger(__name__)

BEST_OF = ("first", "coverage", "mbr")


@dataclass
class GenerationCounts:
    """What generating for a run of records made: records, tokens, time, how the kept texts ended, and (where
    measured) their attribute coverage."""

    generated: int = 0  # records generated (by this run)
    completion_tokens: int = 0
    seconds: float = 0.0
    length_cut: int = 0  # records whose text hit max_new_tokens (finish_reason "length")
    loops: int = 0  # records stopped by loop detection (finish_reason "loop", repeats trimmed)
    coverage_sum: float = 0.0  # attribute coverage of the kept texts, where measured
    coverage_n: int = 0

    def count(self, candidates: Sequence[Generation], best: int, coverage: float | None = None) -> None:
        """One record written: its candidates' tokens, how the kept one ended, its coverage (None: not measured)."""
        self.generated += 1
        self.completion_tokens += sum(c.completion_tokens for c in candidates)
        self.length_cut += candidates[best].finish_reason == "length"
        self.loops += candidates[best].finish_reason == "loop"
        if coverage is not None:
            self.coverage_sum += coverage
            self.coverage_n += 1

    @property
    def samples_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def attr_coverage(self) -> float | None:
        return self.coverage_sum / self.coverage_n if self.coverage_n else None

    def endings(self) -> str:
        """The summary's tail about texts that did not end on their own ("" when all did)."""
        s = ""
        if self.length_cut:
            s += f"; {self.length_cut} hit max_new_tokens"
        if self.loops:
            s += f"; {self.loops} stopped by loop detection"
        return s


@dataclass
class BulkSummary(GenerationCounts):
    """A bulk generation job: its counts, and what it skipped (done by an earlier run, bad input lines)."""

    total: int = 0  # records read from the input
    already_done: int = 0  # found in the output from an earlier run
    bad_lines: list = field(default_factory=list)  # RecordError of skipped input lines

    def describe(self) -> str:
        return (
            f"{self.generated} generated, {self.already_done} already done (resumed), "
            f"{len(self.bad_lines)} bad input line(s) skipped; {self.seconds:.1f} s, "
            f"{self.samples_per_s:.2f} samples/s, {self.tokens_per_s:.1f} tokens/s"
        ) + self.endings()


def pick_best(
    attributes: Sequence[tuple[str, str]], candidates: Sequence[Generation], best_of: str = "first", vocab=None
) -> tuple[int, dict[str, Any] | None]:
    """Index of the candidate to keep, and its faithfulness figures (None for best_of="first").

    "coverage": the highest attribute coverage; ties go to fewer contradictions, then fewer
    hallucinated attributes, then the earlier candidate. "mbr": minimum-Bayes-risk selection by the field's
    ROUGE-L after filtering by ending, coverage and compliance (adgen.generation.selection).
    """
    if best_of == "first":
        return 0, None
    if best_of not in BEST_OF:
        raise AdgenError(f"unknown --best-of '{best_of}' (use {' or '.join(BEST_OF)})")
    vocab = vocab or AttributeVocab.default()
    if best_of == "mbr":
        return mbr_pick(attributes, candidates, vocab)
    scores = [faithfulness(attributes, c.text, vocab) for c in candidates]

    def rank(i: int):
        f = scores[i]
        return (-(f["attr_coverage"] or 0.0), f["n_contradictions"], f["n_hallucinated"], i)

    best = min(range(len(candidates)), key=rank)
    return best, scores[best]


def make_output_record(record, candidates: Sequence[Generation], best: int, faith: dict | None) -> dict:
    out: dict[str, Any] = {}
    for k, v in (getattr(record, "extra", None) or {}).items():
        out[k] = v
    chosen = candidates[best]
    out.update(line=record.line, content=record.content)
    if record.summary is not None:
        out["summary"] = record.summary
    out["predict"] = chosen.text
    out["finish_reason"] = chosen.finish_reason
    if len(candidates) > 1:
        out["candidates"] = [c.text for c in candidates]
        # each candidate's own ending: what `adgen pairs` needs to tell a copy that stopped from a loop
        out["candidate_finish_reasons"] = [c.finish_reason for c in candidates]
        out["chosen"] = best
    if faith is not None:
        out["attr_coverage"] = faith["attr_coverage"]
    return out


def generated_rows(generator, records: Sequence, config: DecodingConfig, counts: GenerationCounts, *, n: int = 1,
                   best_of: str = "first", vocab=None, coverage_vocab: AttributeVocab | None = None,
                   chunk_size: int | None = None) -> Iterator[dict]:
    """The output row of every record (objects with `.line`, `.content`, `.summary`, `.extra`), in input order,
    each as soon as it and those before it are done, counted into `counts` once the caller has taken it.

    `n > 1`: K candidates per record, `best_of` picks the one kept (with `vocab`). `coverage_vocab`: also measure
    every kept text's attribute coverage into `counts` (the Ray catalog reports it for every run)."""
    for rec, cands in _candidates_in_order(generator, records, n, config, chunk_size):
        attributes = attributes_of(rec.content) or []
        best, faith = pick_best(attributes, cands, best_of, vocab) if n > 1 else (0, None)
        coverage = None
        if coverage_vocab is not None:
            coverage = (faith or faithfulness(attributes, cands[best].text, coverage_vocab))["attr_coverage"]
        yield make_output_record(rec, cands, best, faith)
        counts.count(cands, best, coverage)


def generate_bulk(
    generator,
    records: Sequence,
    output: str | Path,
    config: DecodingConfig | None = None,
    *,
    n: int = 1,
    best_of: str = "first",
    vocab=None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_size: int | None = None,
    on_write: Callable[[dict], None] | None = None,
) -> BulkSummary:
    """Generate for every record (objects with `.line`, `.content`, `.summary`, `.extra`) into `output`.

    Records are written in input order, each as soon as it and those before it are done (continuous
    batching over the whole input where the generator has it; `chunk_size` records per `generate` call
    otherwise, or when given). `n > 1` makes K candidates per
    record (needs sampling) and keeps `best_of` ("first" or "coverage").
    """
    config = config or DecodingConfig()
    config.check_candidates(n)
    if best_of not in BEST_OF:
        raise AdgenError(f"unknown --best-of '{best_of}' (use {' or '.join(BEST_OF)})")
    output = Path(output)
    if overwrite and output.exists():
        output.unlink()
    state = scan_output(output)
    keys = [record_key(r.line, r.content) for r in records]
    input_keys = set(keys)
    if len(input_keys) < len(keys):  # the same line twice cannot happen with read_records; be safe
        raise AdgenError("the input has two records with the same line number and content")
    stale = len(state.done - input_keys)
    if stale:
        log.warning("%s holds %d record(s) that are not in this input (another input file?)", output, stale)
    todo = [r for r, k in zip(records, keys) if k not in state.done]
    summary = BulkSummary(total=len(records), already_done=len(records) - len(todo))
    bar = progress_bar(len(records), summary.already_done, progress, desc="generate")
    start = time.perf_counter()
    try:
        with JsonlAppender(output) as out:
            for row in generated_rows(generator, todo, config, summary, n=n, best_of=best_of, vocab=vocab,
                                      chunk_size=chunk_size):
                out.write(row)
                if on_write:
                    on_write(row)
                if bar is not None:
                    bar.update(1)
    finally:
        summary.seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return summary


def generations_as_done(generator, prompts: Sequence, config, chunk_size: int | None = None):
    """(index, Generation) for every prompt, as soon as it is done.

    Continuous batching over the whole list where the generator runs it (`uses_engine`, no `chunk_size`);
    otherwise `chunk_size` prompts (default: the generator's batch size) per `generate` call, so a long job
    still hands out results (and can be resumed) a chunk at a time."""
    if chunk_size is None and generator.uses_engine:
        yield from generator.generate_each(prompts, config)
        return
    chunk = chunk_size or max(1, int(generator.batch_size or GENERATION_BATCH_SIZE))
    for start in range(0, len(prompts), chunk):
        yield from enumerate(generator.generate(prompts[start : start + chunk], config), start)


def _candidates_in_order(generator, todo: Sequence, n: int, config, chunk_size: int | None):
    """(record, its n candidates) in input order, each record as soon as it and every record before it
    are done (with continuous batching a record that ends early waits for slower ones before it; an
    interrupted run loses at most the few finished records held back)."""
    prompts = [r.content for r in todo for _ in range(n)]
    held: dict[int, list] = {}
    next_record = 0
    for i, g in generations_as_done(generator, prompts, config, chunk_size):
        record, j = divmod(i, n)
        held.setdefault(record, [None] * n)[j] = g
        while next_record in held and all(c is not None for c in held[next_record]):
            yield todo[next_record], held.pop(next_record)
            next_record += 1


__all__ = [
    "BEST_OF",
    "BulkSummary",
    "GenerationCounts",
    "generate_bulk",
    "generated_rows",
    "generations_as_done",
    "make_output_record",
    "pick_best",
]
