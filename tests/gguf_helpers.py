"""Reading what `adgen export --gguf` wrote, for the GGUF tests (test_gguf_export.py, test_llama_cpp.py): the
file's metadata and tensors, the chat-formatted prompt ids, and the Ollama Modelfile's parts."""

from __future__ import annotations

import re

import numpy as np


def read_gguf(path):
    """(metadata, {tensor name: ggml type name}, {tensor name: float32 array}).

    transformers' own GGUF header reader: gguf.GGUFReader builds a numpy view per string and needs ~15 s
    for a 128k-token vocabulary with its 280k merges; this one reads only what is asked for.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.integrations.gguf.reader import (
        GgufHeader,
        load_gguf_state_dict,
        read_gguf_metadata,
    )

    meta, _ = read_gguf_metadata(str(path), string_arrays=("tokenizer.ggml.tokens",))
    header = GgufHeader.from_file(str(path))
    types = {info.name: GGMLQuantizationType(info.ggml_type) for info in header.tensors}
    lazy = load_gguf_state_dict(header)

    def tensor(name: str) -> np.ndarray:
        raw = lazy[name][...].numpy()
        return dequantize(raw.view(np.uint8), types[name]).reshape(next(i.shape for i in header.tensors if i.name == name))

    return meta, {n: t.name for n, t in types.items()}, tensor


def chat_ids(tokenizer, content: str, response: str = "") -> list[int]:
    from adgen.data.chat import DEFAULT_SYSTEM_PROMPT

    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": content}],
        tokenize=False, add_generation_prompt=True,
    )
    return tokenizer(text + response, add_special_tokens=False)["input_ids"]


def render_ollama(template: str, messages: list[dict]) -> str:
    """The subset of Go text/template our TEMPLATEs use: `{{ range .Messages }}..{{ .Role }}..{{ .Content }}..{{ end }}`."""
    head, rest = template.split("{{ range .Messages }}")
    body, tail = rest.split("{{ end }}")
    assert "{{" not in head + tail
    return head + "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                          for m in messages) + tail


def modelfile_parts(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.DOTALL | re.MULTILINE)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.DOTALL | re.MULTILINE)
    return {
        "from": re.findall(r"^FROM (.+)$", text, re.MULTILINE),
        "template": template.group(1) if template else None,
        "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE),
        "system": system.group(1) if system else None,
    }
