"""llama.cpp's own tools, run from adgen: finding the binaries `scripts/build_llama_cpp.sh` builds, and
`llama-quantize` for the GGUF types adgen does not write itself (`adgen export --gguf F --quant q4_k_m`).

Where a tool is looked for, in order: `$ADGEN_LLAMA_CPP` (a folder holding the binaries), `.venv/llama.cpp/bin`
(where the build script puts them: this interpreter's prefix, or the checkout's .venv for an editable install),
then PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from adgen.errors import AdgenError

BUILD_COMMAND = "bash scripts/build_llama_cpp.sh"
ENV_VAR = "ADGEN_LLAMA_CPP"

# adgen's --quant name -> llama-quantize's type name (the k-quants: blocks of 256 values; a tensor whose rows do
# not fill them, e.g. SmolLM2's 576 columns, gets llama-quantize's own fallback type).
LLAMA_QUANTIZE_TYPES: dict[str, str] = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


def tool_dirs() -> list[Path]:
    """The folders searched for llama.cpp's binaries before PATH, first match wins."""
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs.append(Path(sys.prefix) / "llama.cpp" / "bin")
    dirs.append(Path(__file__).resolve().parents[2] / ".venv" / "llama.cpp" / "bin")  # an editable install's checkout
    return list(dict.fromkeys(dirs))


def find_tool(name: str) -> Path:
    """The path of llama.cpp's `name` (llama-server, llama-quantize, llama-tokenize), or an AdgenError naming the
    build script."""
    for folder in tool_dirs():
        path = folder / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found:
        return Path(found)
    looked = ", ".join(str(d) for d in tool_dirs())
    raise AdgenError(
        f"llama.cpp's {name} was not found (looked in {looked} and PATH): build it with `{BUILD_COMMAND}` "
        f"(about 5 minutes on 2 cores; `bash scripts/setup.sh --test` runs it too), or set {ENV_VAR} to the "
        "folder that holds your llama.cpp binaries"
    )


def quantize_gguf(source: str | Path, dest: str | Path, quant: str, *, tool: Path | None = None) -> None:
    """Run `llama-quantize source dest TYPE` (quant: a key of LLAMA_QUANTIZE_TYPES). `dest` is written by
    llama-quantize itself: give it a temporary path and rename it afterwards (adgen.io.atomic_output)."""
    if quant not in LLAMA_QUANTIZE_TYPES:
        raise AdgenError(f"llama-quantize type {quant!r}: adgen runs {', '.join(LLAMA_QUANTIZE_TYPES)}")
    cmd = [str(tool or find_tool("llama-quantize")), str(source), str(dest), LLAMA_QUANTIZE_TYPES[quant]]
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise AdgenError(f"llama-quantize failed (exit code {done.returncode}): {' '.join(cmd)}\n{tail}")
