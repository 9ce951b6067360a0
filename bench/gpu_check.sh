#!/usr/bin/env bash
# adgen's CUDA paths in one run, on a Llama-3-8B-shaped model with random weights (nothing downloaded).
#
#   bench/gpu_check.sh          GPU mode: the shipped Llama-3-8B-Instruct config (adgen/resources/models/), built
#                               with from_config on cuda in bf16 (~16 GB, saved to /dev/shm or $TMPDIR and loaded
#                               back by the product's loaders); <= 8 minutes on one H100 (the script is stopped at
#                               GPU_CHECK_TIMEOUT, default 480 s). Needs a CUDA build of torch and bitsandbytes
#                               (pip install 'adgen[qlora]').
#   bench/gpu_check.sh --dry    CPU mode for CI: the same code on a 2-layer, hidden-64 model of the same family
#                               (Llama-3 vocabulary and tokenizer from ../shared/llama3-tokenizer); QLoRA is skipped
#                               (bitsandbytes' 4-bit training needs CUDA) with the reason printed. Well under a minute.
#
# Measures: LoRA / QLoRA steps with adgen's trainer vs HF Trainer + PEFT (tokens/s after the first step, peak
# torch.cuda.max_memory_allocated, loss finite) and `adgen plan`'s estimate of the same run; the generation engine
# at 32 slots vs model.generate; the server (adgen.serve in a thread) with 32 streams and one seeded sampling
# request. Last line: `gpu_check: gpu=... lora_tok_s=... baseline_tok_s=... lora_peak_gib=... plan_peak_gib=...
# qlora_... gen_speedup=... serve_ttft_p95_s=... seeded_ok=...`; every figure also in a JSON file
# (--json PATH; default bench/results/gpu_check.json, --dry: a temporary file). Exit status 1 when a phase failed,
# a loss was not finite or the serving checks failed. Other options: --keep (keep the temporary directories).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec timeout --signal=TERM --kill-after=30 "${GPU_CHECK_TIMEOUT:-480}" "$PY" bench/gpu_check.py "$@"
