"""The training process's memory: its peak, and handing freed heap back to the OS (glibc's malloc_trim).

- `heap_trimmer(device)`: the loop's after-step trim, on Linux CPUs only, when the heap has piled up.
- `release_memory()`: what a finished run gives back before the process goes on (the demo evaluates next).
- `peak_memory_gb(device)`: GPU memory allocated, or the process's peak RSS on a CPU.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
from typing import Callable

import torch

from adgen.train.linear_cross_entropy import release_buffers

TRIM_GROWTH = 0.05  # trim the heap once the RSS between steps has grown this much over a step's working set


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (hands freed heap pages back to the OS), or None where there is no glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Free what a finished run left (model, optimizer state, the heap glibc keeps mapped after its last step):
    whatever the process does next — the demo loads the tuned model and generates — starts from what it needs,
    not from the run's working set (the demo's peak RSS was in its evaluation after training: docs/BENCHMARK_NOTES.md section 8)."""
    release_buffers()
    gc.collect()
    trim = malloc_trim()
    if trim is not None:
        trim(0)


def heap_trimmer(device: torch.device) -> Callable[[], None]:
    """On Linux CPUs: give freed memory back to the OS when it piles up between steps, not every step.

    glibc keeps a step's freed activations mapped, so the RSS between steps is one step's working set
    plus whatever fragmentation has added since. Trimming after every step held the RSS down but made
    every next step fault its working set in again (~0.5 M page faults a step, ~9% of the demo's CPU
    time in the kernel). So the RSS right after the first step that follows a trim is the reference (a
    whole step's working set), and the heap is trimmed only when the RSS between steps exceeds it by
    TRIM_GROWTH. (The faster creep seen before 2026-12-03 was PyTorch's per-shape kernel caches, now
    bounded by rounding row and segment lengths: collate.ROW_MULTIPLE, packed_attention.SEGMENT_MULTIPLE.)
    docs/BENCHMARK_NOTES.md section 8.
    """
    trim = malloc_trim()
    if device.type != "cpu" or trim is None or not os.path.exists("/proc/self/statm"):
        return lambda: None
    reference: list[int] = []  # the RSS after the first step since the last trim

    def maybe_trim() -> None:
        rss = rss_bytes()
        if not reference:
            reference.append(rss)
        elif rss > reference[0] * (1 + TRIM_GROWTH):
            trim(0)
            reference.clear()

    return maybe_trim


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """(peak GiB, what was measured): GPU memory allocated, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kb / 2**20, "process RSS"
