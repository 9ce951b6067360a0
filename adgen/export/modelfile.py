"""The Ollama Modelfile written beside a GGUF file: `<stem>.Modelfile` next to `<stem>.gguf` (so several
exports can share a folder), for `ollama create NAME -f <stem>.Modelfile`.

FROM points at the GGUF; TEMPLATE and the stop strings follow the tokenizer's chat format (Llama-3 or
ChatML; another format gets none, and Ollama falls back to the GGUF's chat template); SYSTEM holds the
system prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adgen.errors import AdgenError
from adgen.export.gguf_tokenizer import ChatFormat, adds_special, detect_chat_format
from adgen.io import atomic_write_text

# Chat formats an Ollama TEMPLATE is written for (Go text/template syntax), and their stop strings.
_OLLAMA_TEMPLATES: dict[str, str] = {
    "llama3": (
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "chatml": "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
}
_STOP_TOKENS: dict[str, tuple[str, ...]] = {
    "llama3": ("<|eot_id|>", "<|end_of_text|>"),
    "chatml": ("<|im_end|>",),
}
_TURN_START: dict[str, str] = {"llama3": "<|start_header_id|>", "chatml": "<|im_start|>"}


def _bos_in_template(tokenizer, chat_template: Any, fmt: ChatFormat) -> bool:
    """The chat template writes BOS before the first turn (Llama-3's does), and encoding adds none."""
    bos = tokenizer.bos_token
    if not bos or adds_special(tokenizer)[0]:
        return False
    try:
        kwargs = {"chat_template": chat_template} if isinstance(chat_template, str) else {}
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    except Exception:  # noqa: BLE001 - no usable template: nothing to mirror
        return False
    # SmolLM2's "BOS" is <|im_start|>, the start of every turn: not a separate prefix.
    return isinstance(text, str) and text.startswith(bos) and not text.startswith(_TURN_START[fmt])


def modelfile_path(gguf_path: str | Path) -> Path:
    p = Path(gguf_path)
    return p.with_name(p.stem + ".Modelfile")


def modelfile_text(gguf_name: str, tokenizer, *, chat_template: Any = None, system_prompt: str | None = None) -> str:
    template = chat_template if chat_template is not None else tokenizer.chat_template
    fmt = detect_chat_format(tokenizer, template)
    lines = [
        "# Ollama Modelfile written by `adgen export --gguf`.",
        f"#   ollama create NAME -f {gguf_name.rsplit('.', 1)[0]}.Modelfile   (FROM is relative to this file)",
        f"FROM ./{gguf_name}",
    ]
    if fmt is not None:
        prefix = tokenizer.bos_token if _bos_in_template(tokenizer, template, fmt) else ""
        lines.append(f'TEMPLATE """{prefix}{_OLLAMA_TEMPLATES[fmt]}"""')
        vocab = tokenizer.get_vocab()
        stops = [s for s in _STOP_TOKENS[fmt] if s in vocab]
        if tokenizer.eos_token and tokenizer.eos_token not in stops:
            stops.append(tokenizer.eos_token)
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    else:
        lines.append("# No TEMPLATE: the chat format is neither Llama-3 nor ChatML; Ollama falls back to the")
        lines.append("# GGUF's tokenizer.chat_template. Add TEMPLATE / PARAMETER stop lines by hand if needed.")
    if system_prompt:
        if '"""' in system_prompt:
            raise AdgenError('the system prompt contains """, which an Ollama Modelfile cannot quote')
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, tokenizer, *, chat_template: Any = None,
                    system_prompt: str | None = None) -> Path:
    gguf_path = Path(gguf_path)
    out = modelfile_path(gguf_path)
    atomic_write_text(out, modelfile_text(gguf_path.name, tokenizer, chat_template=chat_template,
                                           system_prompt=system_prompt))
    return out
