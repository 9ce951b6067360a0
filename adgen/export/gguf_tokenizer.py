"""The tokenizer part of a GGUF file: llama.cpp's byte-level BPE ("gpt2") vocabulary, merges and special
ids, the pre-tokenizer name that splits text the way the model's own tokenizer does, and the chat format.

Only byte-level BPE tokenizers (Llama-3, SmolLM2, ...) are written; `detect_pre_tokenizer` refuses a
tokenizer that splits text like none of the pre-tokenizers known here, since llama.cpp would then tokenize
differently from training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from tokenizers import Regex, Tokenizer, pre_tokenizers

from adgen.errors import AdgenError

ChatFormat = Literal["llama3", "chatml"]

# How llama.cpp splits text before BPE ("tokenizer.ggml.pre"), for the byte-level tokenizers of llama
# models. The model's own tokenizer is compared with each on a probe text; the first that reproduces
# its ids exactly is written. Regexes: Llama-3's split (llama.cpp "llama-bpe"), GPT-2's (built into
# ByteLevel), and SmolLM's (single digits, then GPT-2's).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PROBE_TEXT = (
    "Hello World! It's 2024; we'll ship 12345 units at 3.14159 USD... I'M sure they'VE paid.\n\n"
    "类型#裙*颜色#白色*风格#简约*图案#条纹 这款连衣裙采用100%纯棉面料，穿着舒适透气！\n"
    "  indented\tline\r\n    x = [1, 22, 333, 4444] -> ok  🙂🙂 ÀÉÎ naïve\n\n\n end  "
)


def _pre_tokenizer_candidates() -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("llama-bpe", lambda: pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])),
        ("smollm", lambda: pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])),
        ("gpt-2", lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    ]


# Each chat format's end-of-turn token (written as tokenizer.ggml.eot_token_id where it is not EOS).
_END_OF_TURN: dict[str, str] = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AdgenError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json; this one is slow-only")
    return json.loads(backend.to_str())


def _merges(tok_json: dict) -> list[str]:
    model = tok_json.get("model") or {}
    decoder = json.dumps(tok_json.get("decoder"))
    if model.get("type") != "BPE" or "ByteLevel" not in decoder:
        raise AdgenError(
            f"GGUF export writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2', as Llama-3 and SmolLM2 "
            f"use); this tokenizer is {model.get('type')} with decoder {decoder[:80]}"
        )
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def detect_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text (tokenizer.ggml.pre), found by trying each."""
    backend = tokenizer.backend_tokenizer
    want = backend.encode(_PROBE_TEXT, add_special_tokens=False).ids
    serialized = backend.to_str()
    names = []
    for name, make in _pre_tokenizer_candidates():
        trial = Tokenizer.from_str(serialized)
        trial.pre_tokenizer = make()
        if trial.encode(_PROBE_TEXT, add_special_tokens=False).ids == want:
            return name
        names.append(name)
    raise AdgenError(
        f"this tokenizer splits text like none of llama.cpp's pre-tokenizers adgen knows ({', '.join(names)}), so "
        "llama.cpp would tokenize differently from training; convert the merged model (`adgen export -o DIR`) "
        "with llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers"
    )


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    from gguf import TokenType  # llama.cpp's package: only where GGUF is written

    n_tok = len(tokenizer)
    if n_tok > vocab_size:
        raise AdgenError(
            f"the tokenizer has {n_tok} tokens but the model's embedding only {vocab_size} rows: tokenizer and "
            "model do not belong together"
        )
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    tokens: list[str] = []
    types: list[int] = []
    for i, piece in enumerate(pieces):
        if i in added:
            tokens.append(added[i].content)
            types.append(int(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED))
        elif piece is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        else:
            tokens.append(piece)
            types.append(int(TokenType.NORMAL))
    for i in range(n_tok, vocab_size):  # embedding rows beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    return tokens, types


def adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS by itself (mirrored, so llama.cpp tokenizes like transformers)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and (not plain or plain[0] != bos)
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and (not plain or plain[-1] != eos)
    return add_bos, add_eos


def _template_text(chat_template: Any) -> str:
    if isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, dict):
        return "\n".join(str(v) for v in chat_template.values())
    if isinstance(chat_template, list):
        return "\n".join(str(c.get("template", "")) for c in chat_template)
    return ""


def detect_chat_format(tokenizer, chat_template: Any = None) -> ChatFormat | None:
    """'llama3' or 'chatml', from the chat template, else from the special tokens; None if neither."""
    text = _template_text(chat_template if chat_template is not None else tokenizer.chat_template)
    if "<|start_header_id|>" in text and "<|eot_id|>" in text:
        return "llama3"
    if "<|im_start|>" in text and "<|im_end|>" in text:
        return "chatml"
    if text:
        return None  # some other template: do not guess from the vocabulary
    vocab = tokenizer.get_vocab()
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    return None


def add_tokenizer_metadata(writer, tokenizer, vocab_size: int, chat_template: Any) -> None:
    """The tokenizer.ggml.* keys: the byte-level BPE vocabulary, merges, special ids, how llama.cpp splits text
    before BPE, whether encoding adds BOS / EOS, and the chat template."""
    tok_json = _backend_json(tokenizer)
    merges = _merges(tok_json)
    tokens, types = _vocab(tokenizer, vocab_size)
    add_bos, add_eos = adds_special(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(detect_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    fmt = detect_chat_format(tokenizer, chat_template)
    eot = tokenizer.get_vocab().get(_END_OF_TURN[fmt]) if fmt else None
    if eot is not None and eot != tokenizer.eos_token_id:
        writer.add_eot_token_id(int(eot))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(False)
    if isinstance(chat_template, dict):  # transformers' named templates -> llama.cpp's list form
        chat_template = [{"name": k, "template": v} for k, v in chat_template.items()]
    if chat_template:
        writer.add_chat_template(chat_template)
