"""Catalog generation: `--engine ray` (Ray Data, N workers) vs the single-process engine, same run, same model.

Builds a Parquet catalog of synthetic products whose attribute strings come from train.json's vocabulary
(a 类型 first, then 2-6 other keys with values seen for them), generates for it with the single-process
engine (`generate_bulk`, what `adgen generate --input` runs) and with `run_catalog` on a local Ray cluster,
and prints products/s for both, the overhead, and how many rows are identical (greedy decoding).
Last line: `local_pps=X ray_pps=Y ray_over_local=Z identical=K/N`.

    python bench/ray_catalog.py -n 10000 --workers 2 --max-new-tokens 32            # tiny random model
    python bench/ray_catalog.py -n 200 --model smollm2-135m --max-new-tokens 64     # the real model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama, Llama-3 tokenizer) or any adgen model spec")
    p.add_argument("-n", "--num-records", type=int, default=10000)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-threads", type=int, default=None,
                   help="torch threads of the single-process run (default: torch's, one per core)")
    p.add_argument("--workdir", default=None, help="keep the catalog and outputs here (default: a temp dir)")
    return p.parse_args(argv)


def synthetic_catalog(n: int, seed: int) -> list[dict]:
    """Attribute strings from train.json's key -> values vocabulary (each record a fresh combination)."""
    from adgen.data.records import read_records
    from adgen.metrics import AttributeVocab

    vocab = AttributeVocab.from_records(read_records(SHARED / "adgen" / "train.json").records)
    table = {k: sorted(v) for k, v in vocab.values.items()}
    rng = random.Random(seed)
    others = sorted(k for k in table if k != "类型")
    rows = []
    for i in range(n):
        keys = rng.sample(others, rng.randint(2, min(6, len(others))))
        attrs = [("类型", rng.choice(table["类型"]))] + [(k, rng.choice(table[k])) for k in keys]
        rows.append({"sku": f"syn-{i:06d}", "content": "*".join(f"{k}#{v}" for k, v in attrs)})
    return rows


def cpu_kind() -> str:
    try:
        info = open("/proc/cpuinfo").read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or "?"
    simd = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{os.cpu_count()} cores, {name}, {simd}"


def main(argv=None) -> int:
    args = parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adgen.data.records import read_records
    from adgen.generation import DecodingConfig, load_generator
    from adgen.generation.bulk import generate_bulk
    from adgen.generation.ray_catalog import read_generated, run_catalog

    work = Path(args.workdir or tempfile.mkdtemp(prefix="adgen-ray-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_llama
        from transformers import AutoTokenizer

        model = str(work / "tiny-llama3")
        if not Path(model, "config.json").exists():
            build_tiny_llama(Path(model), AutoTokenizer.from_pretrained(str(SHARED / "llama3-tokenizer")))
    catalog = work / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist(synthetic_catalog(args.num_records, args.seed)), catalog)
    t = time.perf_counter()
    records = read_records(catalog, require_summary=False).records
    print(f"catalog: {len(records)} records ({catalog.stat().st_size / 1e6:.1f} MB Parquet), read in "
          f"{time.perf_counter() - t:.2f} s; {cpu_kind()}", flush=True)
    config = DecodingConfig(max_new_tokens=args.max_new_tokens)
    kwargs = dict(model_spec=model, adapter=None, backend="hf", dtype="auto", device="cpu",
                  batch_size=args.batch_size, continuous=True)

    # single process: every core for one generator (torch's default threads unless --local-threads)
    if args.local_threads:
        import torch

        torch.set_num_threads(args.local_threads)
    t = time.perf_counter()
    local_out = work / "local.jsonl"
    local_out.unlink(missing_ok=True)
    gen = load_generator(**kwargs)
    load_s = time.perf_counter() - t
    s = generate_bulk(gen, records, local_out, config, progress=False)
    local_total = time.perf_counter() - t
    local_pps = len(records) / local_total
    print(f"local: {len(records)} products in {local_total:.1f} s (model load {load_s:.1f} s, generation "
          f"{s.seconds:.1f} s): {local_pps:.2f} products/s, {s.tokens_per_s:.1f} tokens/s", flush=True)
    del gen

    # Ray: a local cluster, --workers generators with cores/workers threads each; Ray start-up counted
    t = time.perf_counter()
    r = run_catalog(records, work / "ray", generator_kwargs=kwargs, config=config, workers=args.workers,
                    block_size=args.block_size, overwrite=True, progress=False)
    ray_total = time.perf_counter() - t
    ray_pps = len(records) / ray_total
    print(f"ray: {r.describe()}", flush=True)
    print(f"ray: {len(records)} products in {ray_total:.1f} s end to end (cluster start, {r.workers} model loads, "
          f"merge): {ray_pps:.2f} products/s", flush=True)

    local_rows = [json.loads(x) for x in local_out.read_text(encoding="utf-8").splitlines()]
    ray_rows = read_generated(work / "ray")
    same = sum(a == b for a, b in zip(local_rows, ray_rows))
    print(f"local_pps={local_pps:.2f} ray_pps={ray_pps:.2f} ray_over_local={ray_pps / local_pps:.2f} "
          f"identical={same}/{len(records)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
