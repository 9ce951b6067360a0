"""transformers adapters for the character-level repetition control (adgen.generation.repetition).

`BatchRepeatControl` keeps one `RepeatState` per row and feeds it the row's new tokens, found after
column `prompt_width` (left-padded batches: every row's completion starts there). It gives
`model.generate` a LogitsProcessor (the DRY penalty / n-gram ban, applied before temperature and
top-p, so greedy and sampled decoding alike) and a StoppingCriteria (loop detection). A scheduler that
runs rows started at different steps keeps a `RepeatState` per request instead and calls
`apply_penalties` on its own logits (or, to keep one row's error its own, `row_shaping` per row in Python
and `apply_shaping` once for the batch: a few tensor ops and one host -> device copy per step).
`token_processors(config)` / `sampling_warpers(config)`: transformers' processors (before the shaping, as in
`model.generate`) and warpers (after it) for the settings that need them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from adgen.generation.coverage import attributes_for
from adgen.generation.repetition import RepeatState, token_table


@dataclass
class RowShaping:
    """What one row's `RepeatState` does to its logits this step (collected in Python, applied in batch)."""

    row: int
    penalties: dict[int, float]
    end_bonus: tuple[int, float] | None = None  # (end-of-turn id, bonus) right after a sentence end
    swap: tuple[tuple[int, ...], int] | None = None  # (comma ids, "。" id): the commas' probability goes to "。"


def row_shaping(row: int, state: RepeatState, vocab_size: int) -> RowShaping:
    """One row's penalties and ending moves, from its state alone (pure Python: an error here is that row's)."""
    shaping = RowShaping(row, state.penalties())
    bias = state.ending_bias()
    if bias <= 0:
        return shaping
    if state.at_sentence_end:
        if state.end_id is not None and 0 <= state.end_id < vocab_size:
            shaping.end_bonus = (state.end_id, bias)
        return shaping
    commas, period = state.table.ending_ids()
    if commas and period is not None:
        shaping.swap = (tuple(commas), period)
    return shaping


def apply_shaping(scores, rows: Sequence[RowShaping]) -> None:
    """Apply rows' shaping to `scores` [B, V] in place: a few batched tensor ops and one host->device copy
    per kind, whatever the number of rows (the same values as row by row: each element gets the same
    additions in the same order)."""
    device = scores.device
    pen = [(r.row, tok, val) for r in rows for tok, val in r.penalties.items()]
    if pen:
        r_ids, t_ids, vals = zip(*pen)
        index = torch.tensor([r_ids, t_ids], dtype=torch.long, device=device)
        values = torch.tensor(vals, dtype=scores.dtype, device=device)
        scores.index_put_((index[0], index[1]), -values, accumulate=True)  # inf -> -inf
    bonus = [(r.row, *r.end_bonus) for r in rows if r.end_bonus is not None]
    if bonus:
        r_ids, t_ids, vals = zip(*bonus)
        index = torch.tensor([r_ids, t_ids], dtype=torch.long, device=device)
        scores.index_put_((index[0], index[1]), torch.tensor(vals, dtype=scores.dtype, device=device),
                          accumulate=True)
    swaps: dict[tuple, list[int]] = {}
    for r in rows:
        if r.swap is not None:
            swaps.setdefault(r.swap, []).append(r.row)
    for (commas, period), row_list in swaps.items():
        # a clause end becomes a sentence end: "。" takes the commas' probability (never more)
        index = torch.tensor([[r, *commas, period] for r in row_list], dtype=torch.long, device=device)
        rows_t, ids = index[:, :1], index[:, 1:]
        # contiguous: a reduction over a strided view may add in another order (a last-bit difference)
        picked = scores[rows_t, ids].contiguous()  # [rows, commas + 1]
        scores[rows_t[:, 0], period] = torch.logsumexp(picked, dim=1)
        scores[rows_t, ids[:, :-1]] = float("-inf")


def apply_penalties(scores, rows: Sequence[tuple[int, RepeatState]]) -> None:
    """Subtract each state's penalties from its row of `scores` (in place; inf -> -inf), then, past the
    ending length: after a sentence end the end-of-turn token gets the ending bonus; elsewhere "。" takes
    the probability of "，" (a clause end becomes a sentence end; nothing else moves)."""
    apply_shaping(scores, [row_shaping(row, state, scores.shape[-1]) for row, state in rows])


def token_processors(config):
    """transformers' processors that read the token ids (repetition penalty, n-gram ban), or None. Run before the
    character-level shaping, as `model.generate` orders them (its own processors, then the custom ones)."""
    procs = []
    if config.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    return LogitsProcessorList(procs) if procs else None


def sampling_warpers(config):
    """transformers' warpers for a sampled request (temperature, top-k, top-p), or None. Run after the shaping."""
    procs = []
    if not config.greedy:
        if config.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            procs.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            procs.append(TopPLogitsWarper(config.top_p))
    return LogitsProcessorList(procs) if procs else None


class BatchRepeatControl:
    """The repetition control of one left-padded `model.generate` batch: a `RepeatState` per row."""

    def __init__(self, tokenizer, config, stop_ids: Sequence[int], prompts: Sequence[Sequence[int]], prompt_width: int):
        """`prompts`: each row's prompt ids (unpadded), where its attributes come from."""
        table = token_table(tokenizer)
        self.config = config
        self.prompt_width = prompt_width
        self.states = [RepeatState(table, config, stop_ids, attributes_for(table, config, ids)) for ids in prompts]
        batch_size = len(prompts)
        self._seen = [0] * batch_size

    def sync(self, input_ids) -> None:
        """Feed each row the tokens it got since the last call."""
        width = input_ids.shape[1] - self.prompt_width
        for row, state in enumerate(self.states):
            if self._seen[row] < width and not state.finished:
                state.push(input_ids[row, self.prompt_width + self._seen[row] :].tolist())
            self._seen[row] = width

    @property
    def looped(self) -> list[bool]:
        return [s.looped for s in self.states]

    def processors(self) -> list:
        return [CharRepetitionProcessor(self)] if self.config.shapes_logits else []

    def criteria(self) -> list:
        return [LoopCriteria(self)] if self.config.loop_detection else []


class CharRepetitionProcessor(LogitsProcessor):
    """The batch's DRY penalty / n-gram ban / ending moves, as a transformers LogitsProcessor."""

    def __init__(self, control: BatchRepeatControl) -> None:
        self.control = control

    def __call__(self, input_ids, scores):
        self.control.sync(input_ids)
        apply_penalties(scores, list(enumerate(self.control.states)))
        return scores


class LoopCriteria(StoppingCriteria):
    """Loop detection as a transformers StoppingCriteria: a row whose tail repeats stops."""

    def __init__(self, control: BatchRepeatControl) -> None:
        self.control = control

    def __call__(self, input_ids, scores, **kwargs):
        self.control.sync(input_ids)
        return torch.tensor(self.control.looped, dtype=torch.bool, device=input_ids.device)
