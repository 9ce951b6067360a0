"""The Batch API's crash safety with a real model, by hand (issue 33): a batch of dev rows on `adgen serve --model
smollm2-135m`, the server killed with SIGKILL while rows are being written, restarted on the same --state-dir; the
batch completes and its output holds every custom_id exactly once, and the rows written before the kill are kept
as they were (not redone).

    python bench/batch_kill9.py --rows 120 --kill-after 40

The suite's test (tests/test_batches_api.py::test_a_batch_survives_kill_9_of_the_server) does the same with a tiny
random model; this one shows it with real weights and real copy. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_kind  # noqa: E402

from adgen.serve.server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "adgen" / "dev.json"
KEY = "bench-key"


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {KEY}"},
                         timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(proc.stderr.read().decode()[-2000:])
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start in 600 s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--kill-after", type=int, default=40, help="rows finished before the SIGKILL")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    from openai import OpenAI

    contents = [json.loads(x)["content"] for x in DEV.read_text(encoding="utf-8").splitlines() if x.strip()]
    with tempfile.TemporaryDirectory(prefix="adgen-kill9-") as work:
        state, port = Path(work) / "state", free_port()
        cmd = [sys.executable, "-m", "adgen", "serve", "--model", args.model, "--port", str(port), "--no-ui",
               "--state-dir", str(state), "--api-key", KEY, "--log-level", "warning"]
        proc = start(cmd, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        ids = [f"sku-{i:05d}" for i in range(args.rows)]
        lines = [{"custom_id": cid, "method": "POST", "url": "/v1/adcopy",
                  "body": {"model": model, "attributes": contents[i % len(contents)], "max_tokens": args.max_tokens}}
                 for i, cid in enumerate(ids)]
        data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
        f = client.files.create(file=("catalog.jsonl", data), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/adcopy", completion_window="24h")
        rows_file = state / "batches" / batch.id / "rows.jsonl"
        while not rows_file.exists() or rows_file.read_bytes().count(b"\n") < args.kill_after:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        before = [json.loads(x) for x in rows_file.read_text(encoding="utf-8").splitlines(keepends=True)
                  if x.endswith("\n") and x.strip()]  # a line the kill cut short is not a finished row
        started = time.monotonic()
        proc = start(cmd, port)
        try:
            while True:
                batch = client.batches.retrieve(batch.id)
                if batch.status in ("completed", "failed", "cancelled", "expired"):
                    break
                time.sleep(1)
            if batch.output_file_id is None:
                raise SystemExit(f"batch {batch.status}, counts {batch.request_counts}, errors: "
                                 + client.files.content(batch.error_file_id).text[:1000])
            out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines() if x.strip()]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        by_id = {r["custom_id"]: r for r in out}
        kept = sum(1 for r in before if json.dumps(by_id.get(r["custom_id"], {}).get("response"), sort_keys=True)
                   == json.dumps(r.get("response"), sort_keys=True))
        result = {
            "cpu": cpu_kind(), "model": args.model, "rows": args.rows, "status": batch.status,
            "rows_before_kill": len(before), "completed": batch.request_counts.completed,
            "failed": batch.request_counts.failed, "output_rows": len(out),
            "every_custom_id_once": sorted(by_id) == ids and len(out) == len(ids),
            "rows_before_kill_kept_as_written": kept, "seconds_after_restart": round(time.monotonic() - started, 1),
            "example": out[0]["response"]["body"] if out else None,
        }
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return 0 if result["every_custom_id_once"] and batch.status == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
