"""Size and quality of each GGUF type `adgen export --gguf` writes, measured in llama.cpp itself (docs/EXPORT.md's
quant table).

    # a tuned model to measure (the demo's recipe for 5 minutes: top 12 layers of SmolLM2-135M)
    adgen train --config demo-smollm2-135m --output-dir runs/gguf-bench max_minutes=5
    python bench/gguf_quants.py --model runs/gguf-bench/model -o runs/gguf-quants
    python bench/gguf_quants.py --model smollm2-135m --adapter runs/x/adapter -o runs/gguf-quants   # or an adapter

For each type (f16, q8_0, q4_k_m, q5_k_m, q6_k) it exports the model with `export_gguf` (what `adgen export --gguf F
--quant Q` does), starts llama.cpp's server on the file (loopback, one slot, all cores) and generates greedy copy for
the first --records records of the dev set from adgen's chat prompt (default system prompt), up to adgen's default
token limit for the tokenizer (room for 192 characters), with no repetition penalty. Then the field's ROUGE-1,
attribute coverage, and the share of texts the model ended itself (its end-of-turn token, not the limit).

Writes OUT/quants.json and OUT/quants.md (the table) and prints the table. A run with some --quants keeps the rows
of other types already in OUT/quants.json when it measured the same model, records and token limit (so the types
can be measured one at a time: f16 takes ~20 minutes on 2 cores, at ~26 tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_flags, cpu_kind  # noqa: E402

from adgen.data.chat import ChatFormatter  # noqa: E402
from adgen.data.records import read_records  # noqa: E402
from adgen.export.gguf import QUANTS, export_gguf, load_for_gguf  # noqa: E402
from adgen.export.llama_cpp import find_tool  # noqa: E402
from adgen.export.llama_server import LlamaServer  # noqa: E402
from adgen.generation.config import max_new_tokens_for  # noqa: E402
from adgen.io import atomic_write_text  # noqa: E402
from adgen.metrics import score_predictions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "adgen" / "dev.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the tuned model (a directory or built-in name)")
    p.add_argument("--adapter", default=None, help="an adapter to merge into --model first")
    p.add_argument("--data", default=str(DEV), help="dev records (default: ../shared/adgen/dev.json)")
    p.add_argument("--records", type=int, default=64)
    p.add_argument("--quants", default=",".join(QUANTS), help="comma-separated (default: all of them)")
    p.add_argument("--max-tokens", type=int, default=None, help="default: adgen's limit for the tokenizer")
    p.add_argument("-o", "--output", default="runs/gguf-quants", help="folder for the GGUF files and results")
    return p.parse_args(argv)


def measure(path: Path, formatter: ChatFormatter, records: list, max_tokens: int) -> dict:
    """Greedy copy for each record in llama.cpp's server on `path`, scored."""
    rows, generated, start = [], 0, time.perf_counter()
    with LlamaServer(path, threads=os.cpu_count()) as server:
        for i, record in enumerate(records, 1):
            done = server.complete(formatter.prompt_ids(record.content), max_tokens)
            generated += len(done.token_ids)
            if i % 16 == 0:
                print(f"  {path.name}: {i}/{len(records)} records, {generated / (time.perf_counter() - start):.1f} "
                      "generated tokens/s", flush=True)
            rows.append({"content": record.content, "label": record.summary, "predict": done.text,
                         "ended": done.ended})
    seconds = time.perf_counter() - start
    scores = score_predictions(rows)
    return {
        "rouge-1": scores["rouge-1"], "coverage": scores.get("attr_coverage"),
        "ended_share": sum(r["ended"] for r in rows) / len(rows), "generated_tokens": generated,
        "seconds": round(seconds, 1), "example": rows[0]["predict"],
    }


def merged_results(path: Path, summary: dict) -> list[dict]:
    """This run's rows, plus the other types' rows of an earlier run on the same model, records and limit, in
    QUANTS order."""
    rows = {r["quant"]: r for r in summary["results"]}
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        same = ("model", "adapter", "records", "max_tokens", "cpu", "cores")
        if all(earlier.get(k) == summary[k] for k in same):
            rows = {**{r["quant"]: r for r in earlier["results"]}, **rows}
    return sorted(rows.values(), key=lambda r: QUANTS.index(r["quant"]))


def table(results: list[dict], args: argparse.Namespace) -> str:
    source = f"--model {args.model}" + (f" --adapter {args.adapter}" if args.adapter else "")
    lines = [
        "| type | size | ROUGE-1 | coverage | ended | export command | measured by |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['quant']}` | {r['size_mib']:.1f} MiB | {r['rouge-1']:.2f} | {r['coverage']:.3f} | "
            f"{r['ended_share']:.0%} | `adgen export {source} --gguf {r['file']} --quant {r['quant']}` | "
            f"`python bench/gguf_quants.py {source} --records {args.records}` |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    quants = [q.strip().lower() for q in args.quants.split(",") if q.strip()]
    find_tool("llama-server")  # fail before the export work when llama.cpp is not built
    model, tokenizer = load_for_gguf(args.model, args.adapter, work_dir=out)
    formatter = ChatFormatter(tokenizer)
    records = read_records(args.data).records[: args.records]
    max_tokens = args.max_tokens or max_new_tokens_for(tokenizer)
    print(f"CPU: {cpu_kind()} ({cpu_flags()}), {os.cpu_count()} cores; llama.cpp {find_tool('llama-server')}; "
          f"{len(records)} records, up to {max_tokens} tokens, greedy", flush=True)
    for quant in quants:
        exported = export_gguf(model, tokenizer, out / f"model-{quant}.gguf", quant=quant, overwrite=True,
                               progress=False)
        row = {"quant": quant, "file": exported.path.name, "size_mib": exported.size_bytes / 2**20,
               **measure(exported.path, formatter, records, max_tokens)}
        print(json.dumps(row, ensure_ascii=False), flush=True)
        # saved after each type: a run stopped half-way keeps the types it measured
        summary = {"model": args.model, "adapter": args.adapter, "records": len(records), "max_tokens": max_tokens,
                   "cpu": cpu_flags(), "cores": os.cpu_count(), "results": [row]}
        summary["results"] = merged_results(out / "quants.json", summary)
        atomic_write_text(out / "quants.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    summary = json.loads((out / "quants.json").read_text(encoding="utf-8"))
    text = table(summary["results"], args)
    (out / "quants.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
