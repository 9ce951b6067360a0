"""Load check for `adgen serve`: N concurrent streaming chat completions on loopback.

    python bench/serve_load.py                       # 32 streams, tiny random Llama-3, 32 tokens each
    python bench/serve_load.py --requests 64 --max-tokens 64
    python bench/serve_load.py --model smollm2-135m  # a real model
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY --model-id NAME   # a running server
    python bench/serve_load.py --model smollm2-135m --max-tokens 64 --batching both   # on vs off, one run

What it does, bounded in count and time (--timeout, default 300 s), on 127.0.0.1 only:
1. starts `python -m adgen serve` on a free loopback port (unless --url), waits for /health;
2. reference run: each of the N distinct prompts once, one after another, non-streaming, greedy;
3. load run: all N as streaming requests at once (httpx asyncio), while /health is polled;
4. checks: every stream answered 200, ended with a finish_reason and `data: [DONE]`, carried one
   response id, and its text equals the reference text of its own prompt (greedy is deterministic,
   so a lost, truncated or mixed-up stream shows); /health answered during and after;
5. prints p50/p95 latency, time to first token, requests/s and tokens/s (and --json for machines).
With `--batching both` it does all of it twice, against a server with continuous batching and one
started with `--no-continuous-batching`, and ends with `batching_speedup=X` (aggregate generated
tokens/s, on / off). A stream whose text differs from its one-at-a-time reference is a problem unless
it is the float-rounding kind batching causes (`--max-differ-share`: the share allowed; a text that
equals another prompt's reference is always a mix-up); the share and an example are reported.
The server runs in fp32 unless --dtype says otherwise: in bf16 the batch's shape changes logits by an ulp
(1/256 of their size), enough to flip a near-tie the decoder's shaping made (the tiny random model: a 0.0035 margin
measured), so exact equality with the one-at-a-time text is a check only fp32 can pass.

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER = REPO.parent / "shared" / "llama3-tokenizer"

CATEGORIES = ["裙", "上衣", "裤"]
COLORS = ["黑色", "白色", "红色", "蓝色", "绿色", "黄色", "粉色", "灰色"]
STYLES = ["简约", "复古", "文艺", "休闲"]


def prompts(n: int) -> list[str]:
    """n distinct AdGen contents."""
    out = []
    for i in range(n):
        c, col, st = CATEGORIES[i % 3], COLORS[(i // 3) % 8], STYLES[(i // 24) % 4]
        out.append(f"类型#{c}*颜色#{col}*风格#{st}*编号#{i}")
    return out


def build_tiny_model(out_dir: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the real Llama-3 tokenizer (as in the tests)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(LLAMA3_TOKENIZER))
    torch.manual_seed(0)
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=eos, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos).save_pretrained(out_dir)
    return out_dir


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Server:
    """`python -m adgen serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str, api_key: str, timeout: float, extra: list[str] | None = None) -> None:
        from adgen.serve.server import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "ADGEN_API_KEY": api_key, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adgen", "serve", "--model", model, "--host", "127.0.0.1",
             "--port", str(self.port), "--no-ui", "--log-level", "warning", "--max-queue", "1024", *(extra or [])],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(REPO),
        )
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {api_key}"}
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /health within {timeout:.0f}s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_stream(client: httpx.AsyncClient, model: str, content: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    out = {"content": content, "status": None, "text": "", "ids": set(), "finish": None, "done": False,
           "ttft": None, "latency": None, "completion_tokens": None, "error": None}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["error"] = (await r.aread()).decode(errors="replace")[:300]
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out["done"] = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    continue
                out["ids"].add(chunk["id"])
                if chunk.get("usage"):
                    out["completion_tokens"] = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content")
                    if piece:
                        if out["ttft"] is None:
                            out["ttft"] = time.perf_counter() - t0
                        out["text"] += piece
                    if choice.get("finish_reason"):
                        out["finish"] = choice["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["latency"] = time.perf_counter() - t0
    return out


async def poll_health(client: httpx.AsyncClient, stop: asyncio.Event, samples: list) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        try:
            r = await client.get("/health")
            samples.append((r.status_code, time.perf_counter() - t, r.json().get("queued")))
        except httpx.HTTPError as e:
            samples.append((None, time.perf_counter() - t, str(e)))
        await asyncio.sleep(0.1)


async def run_load(url: str, api_key: str, model: str, n: int, max_tokens: int, timeout: float = 120.0) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    contents = prompts(n)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    # a stream waiting its turn (batching off) may see no byte for minutes: the read timeout is the whole budget
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(timeout), limits=limits) as c:
        # 1. reference: one at a time, non-streaming
        reference = {}
        for content in contents:
            r = await c.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
            r.raise_for_status()
            reference[content] = r.json()["choices"][0]["message"]["content"]
        # 2. load: all at once, streaming, with /health polled meanwhile
        stop, health = asyncio.Event(), []
        poller = asyncio.create_task(poll_health(c, stop, health))
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one_stream(c, model, x, max_tokens) for x in contents])
        wall = time.perf_counter() - t0
        stop.set()
        await poller
        after = await c.get("/health")
    return {"reference": reference, "results": results, "wall": wall, "health": health,
            "health_after": (after.status_code, after.json())}


def check(run: dict, max_differ_share: float = 0.0) -> tuple[list[str], dict]:
    problems, differ = [], []
    results, reference = run["results"], run["reference"]
    owner = {text: content for content, text in reference.items()}
    for i, r in enumerate(results):
        tag = f"request {i} ({r['content']})"
        if r["status"] != 200:
            problems.append(f"{tag}: HTTP {r['status']} {r['error']}")
            continue
        if r["error"]:
            problems.append(f"{tag}: {r['error']}")
        if not r["done"] or r["finish"] is None:
            problems.append(f"{tag}: incomplete stream (finish={r['finish']}, [DONE]={r['done']})")
        if len(r["ids"]) != 1:
            problems.append(f"{tag}: chunks carried {len(r['ids'])} response ids")
        if r["text"] != reference[r["content"]]:
            if owner.get(r["text"], r["content"]) != r["content"] or not r["done"]:
                problems.append(f"{tag}: text differs from its own non-concurrent run (lost or mixed up)")
            else:
                differ.append(r)
    ids = [next(iter(r["ids"])) for r in results if len(r["ids"]) == 1]
    if len(set(ids)) != len(ids):
        problems.append("two streams share a response id")
    during = run["health"]
    if not during or any(code != 200 for code, _, _ in during):
        problems.append(f"/health failed during the load: {[s for s in during if s[0] != 200][:3] or 'no sample'}")
    code, body = run["health_after"]
    if code != 200 or body.get("active_generations") != 0:
        problems.append(f"/health after the load: {code} {body}")
    if differ and len(differ) / max(len(results), 1) > max_differ_share:
        problems.append(f"{len(differ)} of {len(results)} texts differ from their own non-concurrent run "
                        f"(allowed share {max_differ_share:g}; lost or mixed up)")
    ok = [r for r in results if r["status"] == 200 and r["latency"] is not None]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    figures = {
        "requests": len(results),
        "completed": sum(1 for r in results if r["status"] == 200 and r["done"]),
        "distinct_texts": len({r["text"] for r in results}),
        "wall_s": round(run["wall"], 3),
        "requests_per_s": round(len(ok) / run["wall"], 2),
        "completion_tokens_per_s": round(tokens / run["wall"], 1),
        "latency_p50_s": round(pct(lat, 0.5), 3),
        "latency_p95_s": round(pct(lat, 0.95), 3),
        "ttft_p50_s": round(pct(ttft, 0.5), 3),
        "ttft_p95_s": round(pct(ttft, 0.95), 3),
        "health_samples_during": len(during),
        "health_p95_s": round(pct([s[1] for s in during], 0.95), 3),
        "max_queued_seen": max((s[2] for s in during if isinstance(s[2], int)), default=None),
        "differ_from_reference": len(differ),
        "differ_example": (None if not differ else
                           {"content": differ[0]["content"], "reference": reference[differ[0]["content"]],
                            "stream": differ[0]["text"]}),
    }
    return problems, figures


def measure(args, extra: list[str], started: float) -> tuple[list[str], dict, str]:
    """One server (or --url), one load run: (problems, figures, model id)."""
    server, tmp = None, None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            model = args.model
            if model is None:
                tmp = tempfile.TemporaryDirectory(prefix="adgen-load-")
                model = str(build_tiny_model(Path(tmp.name) / "tiny-llama3"))
            server = Server(model, args.api_key, timeout=args.timeout, extra=extra)
            url = server.url
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model_id = args.model_id or httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        remaining = args.timeout - (time.monotonic() - started)
        run = asyncio.run(asyncio.wait_for(
            run_load(url, args.api_key, model_id, args.requests, args.max_tokens, max(remaining, 1.0)),
            timeout=max(remaining, 1.0)))
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()
    problems, figures = check(run, args.max_differ_share)
    figures["max_tokens"] = args.max_tokens
    return problems, figures, model_id


def report(label: str, figures: dict, problems: list[str], model_id: str, max_tokens: int) -> None:
    print(f"[{label}] {figures['requests']} concurrent streams x {max_tokens} tokens on {model_id}: "
          f"{figures['completed']} complete, {figures['distinct_texts']} distinct texts, "
          f"{figures['differ_from_reference']} differ from their one-at-a-time text")
    print(f"  latency p50 {figures['latency_p50_s']:.3f} s, p95 {figures['latency_p95_s']:.3f} s; "
          f"first token p50 {figures['ttft_p50_s']:.3f} s, p95 {figures['ttft_p95_s']:.3f} s")
    print(f"  {figures['requests_per_s']} requests/s, {figures['completion_tokens_per_s']} tokens/s "
          f"(wall {figures['wall_s']} s)")
    print(f"  /health during load: {figures['health_samples_during']} answers, p95 {figures['health_p95_s']:.3f} s, "
          f"max queued {figures['max_queued_seen']}")
    if figures["differ_example"]:
        ex = figures["differ_example"]
        print(f"  differs (batching arithmetic): {ex['content']}\n    alone:   {ex['reference']!r}\n"
              f"    batched: {ex['stream']!r}")
    for problem in problems:
        print(f"  PROBLEM: {problem}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="model for the server (default: a tiny random Llama-3 built now)")
    p.add_argument("--url", default=None, help="use a running server on loopback instead of starting one")
    p.add_argument("--api-key", default="load-test-key")
    p.add_argument("--model-id", default=None, help="model id to request (default: the first of /v1/models)")
    p.add_argument("--batching", choices=["on", "off", "both"], default="on",
                   help="the server's continuous batching (both: two servers, one after the other, compared)")
    p.add_argument("--max-differ-share", type=float, default=0.0,
                   help="share of streams allowed to differ from their one-at-a-time text by batching arithmetic")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="the server's --dtype (default fp32: the exactness check; bf16 near-ties follow the batch)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds in all")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 256:
        p.error("--requests must be in 1..256 (this is a bounded check, not a stress tool)")
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be a loopback address")
    if args.url and args.batching == "both":
        p.error("--batching both starts its own two servers: drop --url")

    started = time.monotonic()
    modes = ["on", "off"] if args.batching == "both" else [args.batching]
    results = {}
    try:
        for mode in modes:
            extra = ["--batch-size", str(max(args.requests, 1))] if mode == "on" else ["--no-continuous-batching"]
            extra += ["--dtype", args.dtype]
            results[mode] = measure(args, [] if args.url else extra, started)
    except (asyncio.TimeoutError, TimeoutError):
        print(f"serve_load: FAILED: did not finish within {args.timeout:.0f}s", file=sys.stderr)
        return 1
    problems = [f"[{mode}] {p}" for mode, (probs, _, _) in results.items() for p in probs]
    speedup = None
    if len(results) == 2:
        on, off = results["on"][1], results["off"][1]
        speedup = round(on["completion_tokens_per_s"] / max(off["completion_tokens_per_s"], 1e-9), 2)
    if args.json:
        out = {"ok": not problems, "problems": problems, **results[modes[0]][1],
               "runs": {mode: figures for mode, (_, figures, _) in results.items()}, "batching_speedup": speedup}
        print(json.dumps(out, ensure_ascii=False))
    else:
        for mode, (probs, figures, model_id) in results.items():
            report(f"batching {mode}", figures, probs, model_id, args.max_tokens)
        print("serve_load: OK" if not problems else f"serve_load: FAILED ({len(problems)} problems)")
        if speedup is not None:
            on, off = results["on"][1], results["off"][1]
            print(f"batching_speedup={speedup} ttft_p50_on={on['ttft_p50_s']} ttft_p50_off={off['ttft_p50_s']} "
                  f"ttft_p95_on={on['ttft_p95_s']} ttft_p95_off={off['ttft_p95_s']}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
