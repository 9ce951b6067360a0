"""A catalog batch (the OpenAI Batch API) beside live streams on one `adgen serve`: what each costs the other.

    python bench/batch_beside_live.py                              # 1000 dev rows, 8 live streams, SmolLM2
    python bench/batch_beside_live.py --rows 200 --max-tokens 32   # a quick look

Four timed parts, one after another on the same machine (nothing else should run beside it):
1. `adgen generate --input` on the rows alone (the CLI's bulk path, same decoding): rows/s, the baseline;
2. a server, 8 live streaming clients alone (each sends its next request when the last ended) for
   --live-seconds: time to first token p50 / p95;
3. the same 8 live clients while a batch of the same rows runs on the server: their TTFT p95, and the batch's
   rows/s from its creation to `completed`;
4. 32 streams at once on the idle server (bench/serve_load.py's load): TTFT p95.
Prints one JSON object with the figures and the two ratios the Batch API issue asks for:
`batch_rows_per_s_ratio` (batch beside live / generate alone, goal >= 0.8) and `live_ttft_p95_ratio` (with the
batch / without, goal <= 1.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Server, one_stream, pct, prompts, run_load  # noqa: E402

from machine import cpu_kind  # noqa: E402
from serve_load import check  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "adgen" / "dev.json"
KEY = "bench-key"


def dev_contents(n: int) -> list[str]:
    rows = [json.loads(x)["content"] for x in DEV.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [rows[i % len(rows)] for i in range(n)]


def generate_alone(model: str, contents: list[str], max_tokens: int, batch_size: int, work: Path, dtype: str) -> float:
    """rows/s of `adgen generate --input` (the CLI's bulk path) on these rows, as its summary line says
    (generation time only: the model's loading is not counted, as the batch's rows/s does not count it)."""
    src, out = work / "rows.jsonl", work / "generated.jsonl"
    src.write_text("".join(json.dumps({"content": c}, ensure_ascii=False) + "\n" for c in contents), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "adgen", "generate", "--model", model, "--input", str(src),
                           "--output", str(out), "--max-new-tokens", str(max_tokens), "--batch-size", str(batch_size),
                           "--dtype", dtype, "--no-progress"], check=True, cwd=str(REPO), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    return float(re.search(r"([0-9.]+) samples/s", done.stderr).group(1))


async def live_clients(url: str, model: str, n: int, max_tokens: int, stop: asyncio.Event) -> list[float]:
    """n clients, each streaming one request after another until `stop`: every request's TTFT."""
    ttfts: list[float] = []
    contents = prompts(64)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(300)) as c:
        async def client(k: int) -> None:
            i = k
            while not stop.is_set():
                out = await one_stream(c, model, contents[i % len(contents)], max_tokens)
                if out["ttft"] is not None:
                    ttfts.append(out["ttft"])
                i += n

        await asyncio.gather(*(client(k) for k in range(n)))
    return ttfts


async def live_alone(url: str, model: str, n: int, max_tokens: int, seconds: float) -> list[float]:
    stop = asyncio.Event()
    task = asyncio.create_task(live_clients(url, model, n, max_tokens, stop))
    await asyncio.sleep(seconds)
    stop.set()
    return await task


async def batch_with_live(url: str, model: str, contents: list[str], n_live: int, max_tokens: int) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    lines = [{"custom_id": f"row-{i}", "method": "POST", "url": "/v1/adcopy",
              "body": {"attributes": c, "max_tokens": max_tokens}} for i, c in enumerate(contents)]
    data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
        f = (await c.post("/v1/files", files={"file": ("rows.jsonl", data)}, data={"purpose": "batch"})).json()
        stop = asyncio.Event()
        live = asyncio.create_task(live_clients(url, model, n_live, max_tokens, stop))
        await asyncio.sleep(2)  # the live clients are running when the batch arrives
        t0 = time.perf_counter()
        batch = (await c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/adcopy",
                                                   "completion_window": "24h"})).json()
        while batch["status"] not in ("completed", "failed", "cancelled"):
            await asyncio.sleep(0.5)
            batch = (await c.get(f"/v1/batches/{batch['id']}")).json()
        wall = time.perf_counter() - t0
        stop.set()
        ttfts = await live
    return {"status": batch["status"], "counts": batch["request_counts"], "wall_s": round(wall, 1),
            "rows_per_s": len(contents) / wall, "live_ttfts": ttfts}


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": round(pct(values, 0.5), 3), "p95": round(pct(values, 0.95), 3),
            "mean": round(statistics.fmean(values), 3) if values else None}


def streams_only(args: argparse.Namespace) -> int:
    """Part 4 alone: --streams concurrent streams on an idle server."""
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.model, KEY, 300, ["--batch-size", str(args.batch_size), "--state-dir", f"{tmp}/state",
                                              "--dtype", args.dtype, *args.serve_arg])
        try:
            model = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
            _problems, load = check(asyncio.run(run_load(server.url, KEY, model, args.streams, args.max_tokens,
                                                         timeout=300)), max_differ_share=1.0)
        finally:
            server.stop()
    print(json.dumps({"machine": cpu_kind(), "model": args.model, "dtype": args.dtype, "serve_args": args.serve_arg,
                      f"ttft_{args.streams}_streams": {k: load.get(k) for k in
                                                       ("ttft_p50_s", "ttft_p95_s", "latency_p95_s", "completed")}}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--live", type=int, default=8, help="live streaming clients")
    ap.add_argument("--live-seconds", type=float, default=60.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--streams", type=int, default=32, help="concurrent streams of part 4")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `adgen serve` argument (repeatable)")
    ap.add_argument("--dtype", default="auto", help="the model's dtype, for `adgen generate` and `adgen serve` alike")
    ap.add_argument("--streams-only", action="store_true", help="only part 4 (a quick look at TTFT under a burst)")
    args = ap.parse_args()
    if args.streams_only:
        return streams_only(args)
    contents = dev_contents(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        alone = generate_alone(args.model, contents, args.max_tokens, args.batch_size, work, args.dtype)
        print(f"generate alone: {alone:.3f} rows/s", file=sys.stderr)
        server = Server(args.model, KEY, 300, ["--batch-size", str(args.batch_size), "--state-dir", str(work / "state"),
                                              "--dtype", args.dtype, *args.serve_arg])
        try:
            model = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
            live = asyncio.run(live_alone(server.url, model, args.live, args.max_tokens, args.live_seconds))
            print(f"live alone: {summary(live)}", file=sys.stderr)
            both = asyncio.run(batch_with_live(server.url, model, contents, args.live, args.max_tokens))
            print(f"batch beside live: {both['rows_per_s']:.3f} rows/s, live {summary(both['live_ttfts'])}",
                  file=sys.stderr)
            _problems, load = check(asyncio.run(run_load(server.url, KEY, model, args.streams, args.max_tokens,
                                                         timeout=300)), max_differ_share=1.0)
        finally:
            server.stop()
    live_p95, both_p95 = pct(live, 0.95), pct(both["live_ttfts"], 0.95)
    print(json.dumps({
        "machine": cpu_kind(), "model": args.model, "dtype": args.dtype, "rows": args.rows, "max_tokens": args.max_tokens,
        "live_clients": args.live, "batch_size": args.batch_size, "serve_args": args.serve_arg,
        "generate_alone_rows_per_s": round(alone, 3), "batch_rows_per_s": round(both["rows_per_s"], 3),
        "batch_status": both["status"], "batch_counts": both["counts"], "batch_wall_s": both["wall_s"],
        "batch_rows_per_s_ratio": round(both["rows_per_s"] / alone, 3),
        "live_ttft_alone": summary(live), "live_ttft_with_batch": summary(both["live_ttfts"]),
        "live_ttft_p95_ratio": round(both_p95 / live_p95, 3),
        f"ttft_{args.streams}_streams": {k: load.get(k) for k in ("ttft_p50_s", "ttft_p95_s", "latency_p95_s", "completed")},
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
