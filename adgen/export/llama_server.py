"""llama.cpp's server (`llama-server`) on a free loopback port, for checking a GGUF export in llama.cpp itself:
the tests (tests/test_llama_cpp.py) and the quant table's measurements (bench/gguf_quants.py).

    with LlamaServer("out/adgen.gguf") as server:
        ids = server.tokenize(text)
        done = server.complete(ids, max_tokens=64)        # greedy
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="none")

The server runs with one slot and without prompt caching, so that each request is computed from its prompt
alone, as transformers computes it.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from adgen.errors import AdgenError
from adgen.export.llama_cpp import find_tool

# Greedy decoding as transformers does it: temperature 0 is llama.cpp's argmax, and the chain is only that
# sampler (no repetition, presence or DRY penalties, no top-k / min-p in front of it).
GREEDY: dict[str, Any] = {
    "temperature": 0.0, "samplers": ["temperature"], "repeat_penalty": 1.0, "dry_multiplier": 0.0,
    "cache_prompt": False,
}


@dataclass(frozen=True)
class Completion:
    """One /completion answer: the text, the generated ids, and how it ended."""

    text: str
    token_ids: list[int]
    stop_type: str  # "eos" (an end-of-generation token such as <|im_end|>), "limit" (max_tokens), "word"
    prompt_tokens: int

    @property
    def ended(self) -> bool:
        """The model ended the text itself (an end-of-generation token), not the token limit."""
        return self.stop_type == "eos"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """`llama-server -m GGUF` on 127.0.0.1 (context manager); `startup_timeout` seconds to load the model."""

    def __init__(self, gguf: str | Path, *, threads: int | None = None, ctx_size: int = 2048,
                 startup_timeout: float = 120.0, extra_args: tuple[str, ...] = ()) -> None:
        self.gguf = Path(gguf)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.openai_base_url = f"{self.url}/v1"
        self._args = ["-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port), "-c", str(ctx_size),
                      "-np", "1", "--no-cache-prompt", *(["-t", str(threads)] if threads else []), *extra_args]
        self._startup_timeout = startup_timeout
        self._log = tempfile.TemporaryFile(mode="w+b")  # not a pipe: a full pipe would stall the server
        self._process: subprocess.Popen | None = None
        self._http = httpx.Client(base_url=self.url, timeout=600.0)

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 20) -> str:
        self._log.seek(0)
        return "\n".join(self._log.read().decode("utf-8", "replace").splitlines()[-lines:])

    def start(self) -> None:
        self._process = subprocess.Popen([str(find_tool("llama-server")), *self._args],
                                         stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise AdgenError(f"llama-server exited with code {self._process.returncode} while loading "
                                 f"{self.gguf}:\n{self.log_tail()}")
            try:
                if self._http.get("/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        self.close()
        raise AdgenError(f"llama-server did not load {self.gguf} in {self._startup_timeout:.0f} s:\n{self.log_tail()}")

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._http.close()
        self._log.close()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._http.post(path, json=body)
        if response.status_code != 200:
            raise AdgenError(f"llama-server {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """The ids llama.cpp encodes `text` to, special tokens written as text parsed as such (as for a prompt);
        `add_special`: BOS / EOS as the file's add_bos_token / add_eos_token say."""
        body = {"content": text, "add_special": add_special, "parse_special": True}
        return [int(t) for t in self.post("/tokenize", body)["tokens"]]

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text the file's chat template renders for `messages` (with the assistant's turn opened),
        exactly what /v1/chat/completions feeds the model."""
        return str(self.post("/apply-template", {"messages": messages})["prompt"])

    def complete(self, prompt: str | list[int], max_tokens: int) -> Completion:
        """Greedy continuation of `prompt` (text, or ids used as they are) for up to `max_tokens` tokens."""
        body = {"prompt": prompt, "n_predict": max_tokens, "return_tokens": True, **GREEDY}
        out = self.post("/completion", body)
        return Completion(text=out["content"], token_ids=[int(t) for t in out["tokens"]],
                          stop_type=str(out.get("stop_type", "")),
                          prompt_tokens=int(out.get("tokens_evaluated", 0)))
