"""Left-padded `model.generate` batches: the HF path for models the decode engine cannot drive (and for
`continuous=False`), and the `GenerationConfig` every `model.generate` call here gets.

Stopping: `eos_token_id` is the formatter's `stop_token_ids` -- every end-of-turn id of the model (Llama-3:
128001 `<|end_of_text|>` *and* 128009 `<|eot_id|>`). The model's own generation_config is not trusted for
this, nor for sampling defaults: a `DecodingConfig` says everything (greedy unless asked otherwise).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from adgen.generation.config import DecodingConfig, Generation
from adgen.generation.hf_processors import BatchRepeatControl
from adgen.generation.text import decode, find_stop, finished_generation, stop_window


def generation_config(config: DecodingConfig, stop_ids: Sequence[int], bos_token_id: int | None) -> GenerationConfig:
    """`model.generate`'s settings for a (resolved) `DecodingConfig`: nothing left to the model's own defaults."""
    kwargs = dict(
        max_new_tokens=config.max_new_tokens,
        num_beams=1,
        use_cache=True,
        eos_token_id=list(stop_ids),
        pad_token_id=stop_ids[0],  # finished rows are filled with a stop id
        bos_token_id=bos_token_id,
        repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
    )
    if config.greedy:
        # Set explicitly: the model's own generation_config (e.g. Llama-3: temperature 0.6,
        # top_p 0.9, do_sample) would otherwise fill in whatever is left unset.
        kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)  # the neutral defaults
    else:
        kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    return GenerationConfig(**kwargs)


@contextlib.contextmanager
def seeded(config: DecodingConfig, device: torch.device, lock: threading.RLock) -> Iterator[None]:
    """Seed sampling without disturbing the caller's global RNG state (holding `lock`: the RNG is global)."""
    if config.greedy or config.seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with lock, torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        yield


def repeat_control(tokenizer, config: DecodingConfig, stop_ids: Sequence[int], prompts: Sequence[Sequence[int]],
                   prompt_width: int) -> BatchRepeatControl | None:
    """The character-level repetition control for one left-padded batch of `prompts` (None when it is off)."""
    if not config.controls_repetition:
        return None
    return BatchRepeatControl(tokenizer, config, stop_ids, prompts, prompt_width)


def generate_padded(model, tokenizer, batch: list[list[int]], config: DecodingConfig, *, device: torch.device,
                    stop_ids: Sequence[int], pad_id: int, lock: threading.RLock,
                    cancel: threading.Event | None = None) -> list[Generation]:
    """One left-padded `model.generate` call over `batch` (prompt ids), under `lock`; a `Generation` per row.
    `cancel` set (from any thread) stops every row after the current step."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], dtype=torch.long, device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long,
                             device=device)
    stop_strings = StopStringCriteria(tokenizer, config.stop, width) if config.stop else None
    criteria: list = [stop_strings] if stop_strings else []
    if cancel is not None:
        criteria.append(CancelCriteria(cancel))
    repeats = repeat_control(tokenizer, config, stop_ids, batch, width)
    if repeats is not None:
        criteria += repeats.criteria()
    with lock, torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            generation_config=generation_config(config, stop_ids, tokenizer.bos_token_id),
            stopping_criteria=StoppingCriteriaList(criteria),
            logits_processor=LogitsProcessorList(repeats.processors() if repeats is not None else []),
        )
    new = out[:, width:].tolist()
    return [
        finished_generation(
            tokenizer, len(ids), gen, stop_ids, config.stop,
            stop_hit=stop_strings is not None and stop_strings.hit[row],
            looped=repeats is not None and repeats.states[row].looped,
        )
        for row, (ids, gen) in enumerate(zip(batch, new))
    ]


class StopStringCriteria(StoppingCriteria):
    """Per-row stop: the row's newest tokens complete a stop string. Records which rows hit one.

    Not transformers' `GenerationConfig(stop_strings=...)`: it matches the raw token strings, so a stop
    string with a special token inside it (the text a user sees has none) is missed and the row runs on
    (tests/test_generation.py::test_stop_strings[padded]: 15 tokens instead of 5), and it records no
    per-row hit, which the token count needs."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.prompt_width = tokenizer, stops, prompt_width
        self.window = stop_window(stops)
        self.hit: list[bool] = []

    def __call__(self, input_ids, scores, **kwargs):
        if not self.hit:
            self.hit = [False] * input_ids.shape[0]
        done = []
        for row in range(input_ids.shape[0]):
            if not self.hit[row]:
                tail = input_ids[row, max(self.prompt_width, input_ids.shape[1] - self.window) :].tolist()
                self.hit[row] = find_stop(decode(self.tokenizer, tail), self.stops) != -1
            done.append(self.hit[row])
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class CancelCriteria(StoppingCriteria):
    """Stops every row once `event` is set (a stream closed, or cancelled from another thread)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
