"""transformers adapters for the character-level repetition control (adgen.generation.repetition).

`BatchRepeatControl` keeps one `RepeatState` per row and feeds it the row's new tokens, found after
column `prompt_width` (left-padded batches: every row's completion starts there). It gives
`model.generate` a LogitsProcessor (the DRY penalty / n-gram ban, applied before temperature and
top-p, so greedy and sampled decoding alike) and a StoppingCriteria (loop detection). A scheduler that
runs rows started at different steps keeps a `RepeatState` per request instead and calls
`apply_penalties` on its own logits.
"""

from __future__ import annotations

from typing import Sequence

from adgen.generation.repetition import RepeatState, token_table


def apply_penalties(scores, rows: Sequence[tuple[int, RepeatState]]) -> None:
    """Subtract each state's penalties from its row of `scores` (in place; inf -> -inf), then, past the
    ending length: after a sentence end the end-of-turn token gets the ending bonus; elsewhere "。" takes
    the probability of "，" (a clause end becomes a sentence end; nothing else moves)."""
    import torch

    for row, state in rows:
        pen = state.penalties()
        if pen:
            ids = torch.tensor(list(pen.keys()), dtype=torch.long, device=scores.device)
            vals = torch.tensor(list(pen.values()), dtype=scores.dtype, device=scores.device)
            scores[row].index_put_((ids,), -vals, accumulate=True)
        bias = state.ending_bias()
        if bias <= 0:
            continue
        if state.at_sentence_end:
            if state.end_id is not None and 0 <= state.end_id < scores.shape[-1]:
                scores[row, state.end_id] += bias
            continue
        commas, period = state.table.ending_ids()
        if commas and period is not None:
            # a clause end becomes a sentence end: "。" takes the commas' probability (never more)
            ids = torch.tensor(commas + [period], device=scores.device)
            scores[row, period] = torch.logsumexp(scores[row, ids], dim=0)
            scores[row, commas] = float("-inf")


class BatchRepeatControl:
    def __init__(self, tokenizer, config, stop_ids: Sequence[int], batch_size: int, prompt_width: int):
        table = token_table(tokenizer)
        self.config = config
        self.prompt_width = prompt_width
        self.states = [RepeatState(table, config, stop_ids) for _ in range(batch_size)]
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
        return [_LogitsProcessor(self)] if self.config.shapes_logits else []

    def criteria(self) -> list:
        return [_LoopCriteria(self)] if self.config.loop_detection else []


def _LogitsProcessor(control: BatchRepeatControl):
    from transformers import LogitsProcessor

    class CharRepetitionProcessor(LogitsProcessor):
        def __call__(self, input_ids, scores):
            control.sync(input_ids)
            apply_penalties(scores, list(enumerate(control.states)))
            return scores

    return CharRepetitionProcessor()


def _LoopCriteria(control: BatchRepeatControl):
    import torch
    from transformers import StoppingCriteria

    class LoopCriteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            control.sync(input_ids)
            return torch.tensor(control.looped, dtype=torch.bool, device=input_ids.device)

    return LoopCriteria()
