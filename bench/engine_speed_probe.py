"""Engine decode speed of one tree, for before/after comparisons of engine changes (run alternately per tree):

    PYTHONPATH=<tree> .venv/bin/python bench/engine_speed_probe.py [-n 24]

SmolLM2-135M (built in), fp32 on CPU, the first N dev records, default decoding, 32 slots; prints one JSON line
(seconds, completion tokens, tokens/s, ended). The full bench with its baseline is bench/generation_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import adgen
from adgen.generation import DecodingConfig, load_generator

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "adgen" / "dev.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=24)
    ap.add_argument("--data", default=str(DEV))
    args = ap.parse_args()
    torch.set_num_threads(2)
    lines = Path(args.data).read_text(encoding="utf-8").splitlines()
    contents = [json.loads(line)["content"] for line in lines[: args.n]]
    gen = load_generator("smollm2-135m", batch_size=32)
    gen.generate(contents[:1], DecodingConfig(max_new_tokens=8))  # warm-up
    start = time.perf_counter()
    outs = gen.generate(contents, DecodingConfig())
    seconds = time.perf_counter() - start
    tokens = sum(o.completion_tokens for o in outs)
    print(json.dumps({"tree": str(Path(adgen.__file__).parents[1]), "seconds": round(seconds, 2), "tokens": tokens,
                      "tok_s": round(tokens / seconds, 1), "ended": sum(o.finish_reason == "stop" for o in outs)}))


if __name__ == "__main__":
    main()
