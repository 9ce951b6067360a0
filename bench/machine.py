"""What kind of CPU a bench ran on: the flags that decide bf16 vs fp32 (printed by every bench)."""

from __future__ import annotations

import platform

FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or "?"
    return " ".join(f for f in FLAGS_THAT_MATTER if f in flags) or "none of avx2/avx512"


def cpu_kind() -> str:
    """'fast bf16 (AVX512-BF16/AMX)' or 'fp32 only (bf16 emulated)': which table of BENCHMARKS.md a figure goes in."""
    flags = cpu_flags().split()
    return "fast bf16 (AVX512-BF16/AMX)" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32 only (bf16 emulated)"
