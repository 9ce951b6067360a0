"""The same model forward on the main thread and on a secondary thread (where `adgen serve` runs its engine).

    python bench/thread_forward_probe.py                 # SmolLM2-135M, bf16 where the CPU has it fast
    python bench/thread_forward_probe.py --dtype fp32

Each round times, as a median of --reps, one 120-token prefill plus one 32-row decode step (random ids, no cache),
first on the main thread, then on a fresh secondary thread after `prime_torch_threads` (the server's order). On
the 2-core Intel Xeon with AMX (2026-12-08) the secondary thread was 20-30% slower: the server's batch path with
no live traffic ran at 0.76x `adgen generate --input` (docs/BENCHMARK_NOTES.md section 11). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_kind  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on a fast-bf16 CPU, else fp32 (as adgen serve)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()

    import torch

    from adgen.generation.hf import prime_torch_threads
    from adgen.generation.loader import load_generator
    from adgen.models import serving_dtype

    generator = load_generator(args.model, dtype=serving_dtype(args.dtype, "cpu"), device="cpu", batch_size=32)
    model = generator.model
    prefill = torch.randint(100, 1000, (1, 120))
    decode = torch.randint(100, 1000, (32, 1))
    times: dict[str, list[float]] = {"main": [], "thread": []}

    def measure(where: str) -> None:
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=prefill, logits_to_keep=1)
            samples = []
            for _ in range(args.reps):
                t = time.perf_counter()
                model(input_ids=prefill, logits_to_keep=1)
                model(input_ids=decode, logits_to_keep=1)
                samples.append(time.perf_counter() - t)
        times[where].append(round(statistics.median(samples) * 1000, 1))

    prime_torch_threads()
    for _ in range(args.rounds):
        measure("main")
        worker = threading.Thread(target=measure, args=("thread",))
        worker.start()
        worker.join()
    ratio = statistics.median(times["thread"]) / statistics.median(times["main"])
    print(json.dumps({"machine": cpu_kind(), "model": args.model, "dtype": str(next(model.parameters()).dtype),
                      "ms_main": times["main"], "ms_thread": times["thread"], "thread_over_main": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
