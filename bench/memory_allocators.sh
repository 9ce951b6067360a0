#!/bin/bash
# variants of the allocator setup for a training step, one process each (docs/BENCHMARK_NOTES.md section 8)
# usage: [OMP_NUM_THREADS=1] [STEPS=12] bash bench/memory_allocators.sh   (jemalloc rows: apt-get install libjemalloc2)
cd "$(dirname "$0")/.."
PY=.venv/bin/python
run() { tag=$1; shift; env TAG=$tag "$@" $PY bench/memory_allocators.py 2>&1 | grep RESULT; }
run A-trim-each-step  STEPS=${STEPS:-12} TRIM=each
run H-trim-on-growth  STEPS=${STEPS:-12}
run B-thp-trim        STEPS=${STEPS:-12} THP_MEM_ALLOC_ENABLE=1 TRIM=each
run C-thp-notrim      STEPS=${STEPS:-12} THP_MEM_ALLOC_ENABLE=1 TRIM=0
run D-thp-mmap2M      STEPS=${STEPS:-12} THP_MEM_ALLOC_ENABLE=1 TRIM=0 MALLOC_MMAP_THRESHOLD_=2097152
run E-notrim          STEPS=${STEPS:-12} TRIM=0
if [ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ]; then
run F-jemalloc        STEPS=${STEPS:-12} TRIM=0 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
run G-jemalloc-thp    STEPS=${STEPS:-12} TRIM=0 THP_MEM_ALLOC_ENABLE=1 LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
fi
