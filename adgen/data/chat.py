"""Exact chat formatting and tokenization of AdGen records.

Training ids = prompt ids + response ids + end-of-turn id, where the prompt is the model's own chat
template rendered *with* the generation prompt -- exactly what the model sees at inference. We never
render the full conversation through the template: the original Llama-3 Instruct template appends an
assistant header after the last turn whatever `add_generation_prompt` says, which would put a stray
header into every training example.

Truncation policy (stated, counted): the prompt is never cut; when prompt + response + end-of-turn
exceed `max_length`, the response is cut from the end and the end-of-turn id is left out (the copy did
not end there, so the model must not learn to stop there); when the prompt alone leaves no room for a
single response token, the example is dropped.

System prompt: `system_prompt=None` (or "") means adgen adds no system turn. Some templates then add their
own default system turn (SmolLM2: "You are a helpful AI assistant named SmolLM..."; Qwen2.5 likewise):
that is what those models were trained with, so it is kept, and the prompt shows it.

Models without a chat template (base models) use the plain format: [BOS] `{content}\n` + `{summary}` +
eos, with no system prompt; a warning says so. The BOS is the tokenizer's own when it adds one, else
its `bos_token` when that differs from eos (Llama-3 base: `<|begin_of_text|>`), else none (GPT-2 style,
where bos == eos == `<|endoftext|>`, and Qwen, which has no BOS).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

from adgen.errors import ModelError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

DEFAULT_SYSTEM_PROMPT = (
    "你是一名资深电商文案撰写人。请根据用户给出的商品属性（格式为“属性#取值”，以“*”分隔），"
    "用中文写一段自然流畅、有吸引力的商品广告文案：涵盖所有给定属性，不要编造未给出的属性，不要使用英文。"
)

# The setting that names DEFAULT_SYSTEM_PROMPT, in training configs and for --system-prompt alike.
DEFAULT_PROMPT = "default"


def resolve_system_prompt(setting: str | None) -> str | None:
    """What a system-prompt setting means everywhere (training configs, `--system-prompt`):
    "default" -> the built-in ad-copy prompt; None or "" -> no system turn; any other text -> itself."""
    if setting == DEFAULT_PROMPT:
        return DEFAULT_SYSTEM_PROMPT
    return setting or None


LossOn = Literal["response", "all"]
Message = dict  # {"role": ..., "content": ...}

# End-of-turn tokens of well-known template families, checked before the generic probe below.
_KNOWN_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
_SENTINEL = "\u2063ADGEN_SENTINEL\u2063"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class EncodeStats:
    total: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_lines: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.total} examples, {self.truncated} truncated (response cut to fit max_length), "
            f"{self.dropped} dropped (prompt alone too long)"
        )


class ChatFormatter:
    """Turns AdGen content (+ summary) into the exact ids a model is trained on / generates from."""

    def __init__(
        self,
        tokenizer,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        loss_on: LossOn = "response",
        max_length: int = 1024,
        generation_eos_ids: Iterable[int] = (),
    ) -> None:
        if loss_on not in ("response", "all"):
            raise ValueError(f"loss_on must be 'response' or 'all', not {loss_on!r}")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt or None
        self.loss_on = loss_on
        self.max_length = max_length
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if not self.has_chat_template:
            log.warning(
                "%s has no chat template: using the plain base-model format '{content}\\n{summary}' + eos "
                "(no system prompt). Use an Instruct/chat model for chat-formatted training.",
                getattr(tokenizer, "name_or_path", None) or "this tokenizer",
            )
        self.end_of_turn_id = self._find_end_of_turn_id()
        self._extra_eos = [int(i) for i in generation_eos_ids]

    # ---- what the model sees -------------------------------------------------------------
    def messages(self, content: str) -> list[Message]:
        msgs: list[Message] = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": content})
        return msgs

    def prompt_text(self, prompt: str | Sequence[Message]) -> str:
        messages = self.messages(prompt) if isinstance(prompt, str) else list(prompt)
        if not self.has_chat_template:
            # Base models: the plain `{content}\n{summary}` format (system prompt not used).
            return "\n".join(m["content"] for m in messages if m["role"] != "system") + "\n"
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # some templates refuse a system role (e.g. Gemma): fold it into the user turn
            if not any(m["role"] == "system" for m in messages):
                raise
            folded = _fold_system(messages)
            try:
                return self.tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)
            except Exception:
                raise e from None

    def prompt_ids(self, prompt: str | Sequence[Message]) -> list[int]:
        text = self.prompt_text(prompt)
        if self.has_chat_template:
            # The template already wrote the BOS token (if the model uses one): don't add another.
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            eos = self.tokenizer.eos_token_id
            if eos is not None and ids and ids[-1] == eos:  # tokenizers that append eos to every text
                ids = ids[:-1]
            bos = self.tokenizer.bos_token_id
            # Tokenizers whose post-processor adds no BOS (e.g. some Llama-3 tokenizer.json files): a base
            # model still saw one at the start of every document.
            if bos is not None and bos != eos and (not ids or ids[0] != bos):
                ids = [bos] + list(ids)
        bos = self.tokenizer.bos_token_id
        while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return list(ids)

    def response_ids(self, summary: str) -> list[int]:
        return list(self.tokenizer(summary, add_special_tokens=False)["input_ids"])

    def encode(self, content: str, summary: str) -> Example | None:
        """Training example; None when the prompt alone does not fit `max_length`."""
        prompt = self.prompt_ids(content)
        response = self.response_ids(summary) + [self.end_of_turn_id]
        truncated = False
        room = self.max_length - len(prompt)
        if room < 1:
            return None
        if len(response) > room:
            response = response[:room]  # the end-of-turn id is cut with the tail
            truncated = True
        ids = prompt + response
        if self.loss_on == "all":
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(prompt) + list(response)
        return Example(ids, labels, truncated)

    # ---- stopping ------------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> list[int]:
        """Every id that ends a turn: end-of-turn, the tokenizer's eos, the generation config's eos ids.

        Llama-3 Instruct ends turns with <|eot_id|> (128009) while eos_token is <|end_of_text|> (128001):
        stopping on only one of them is the classic never-stops bug.
        """
        ids = [self.end_of_turn_id]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        ids.extend(self._extra_eos)
        return sorted(set(ids))

    def _find_end_of_turn_id(self) -> int:
        tok = self.tokenizer
        if not self.has_chat_template:
            if tok.eos_token_id is None:
                raise ModelError(
                    f"{getattr(tok, 'name_or_path', '') or 'the tokenizer'} has neither a chat template nor an eos "
                    "token, so adgen cannot tell where a response ends: use a chat model, or set eos_token in "
                    "its tokenizer_config.json"
                )
            return tok.eos_token_id
        vocab = tok.get_vocab()
        template = tok.chat_template if isinstance(tok.chat_template, str) else str(tok.chat_template)
        for token in _KNOWN_END_OF_TURN:
            if token in vocab and token in template:
                return vocab[token]
        # Generic probe: render one assistant turn and take the first special token after its text.
        try:
            text = tok.apply_chat_template(
                [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
            )
            tail = text.split(_SENTINEL, 1)[1]
            special = set(tok.all_special_ids)
            # Added tokens marked special (e.g. Llama-3's reserved tokens) are not all in all_special_ids.
            special.update(i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
            for i in tok(tail, add_special_tokens=False)["input_ids"]:
                if i in special:
                    return i
        except Exception:
            pass
        if tok.eos_token_id is None:
            raise ModelError(
                f"cannot tell the end-of-turn token of {getattr(tok, 'name_or_path', '') or 'this tokenizer'}: its "
                "chat template ends an assistant turn with no special token, and it has no eos token"
            )
        log.warning("could not find the chat template's end-of-turn token: using eos %r", tok.eos_token)
        return tok.eos_token_id


def _fold_system(messages: Sequence[Message]) -> list[Message]:
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [dict(m) for m in messages if m["role"] != "system"]
    for m in out:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    return out


def encode_records(formatter: ChatFormatter, records: Iterable) -> tuple[list[Example], EncodeStats]:
    """Encode records (with .content, .summary, .line); dropped ones are counted, not returned."""
    stats = EncodeStats()
    examples: list[Example] = []
    for rec in records:
        stats.total += 1
        ex = formatter.encode(rec.content, rec.summary)
        if ex is None:
            stats.dropped += 1
            stats.dropped_lines.append(getattr(rec, "line", stats.total))
            continue
        stats.truncated += int(ex.truncated)
        examples.append(ex)
    return examples, stats
