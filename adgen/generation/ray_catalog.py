"""Catalog generation on Ray Data: the same HF generator, one copy per Ray worker, over a whole catalog.

    adgen generate --input catalog.parquet --output out/ --engine ray [--address ADDR] [--workers N]
        [--gpus-per-worker X]   (default: 1 where there are GPUs; Ray hides GPUs from actors that ask for none)

Layout of the output directory (`DIR`):

    catalog.json                 what this directory is a run of (input keys, model, decoding, blocks)
    shards/part-00000.parquet    the generated rows of input block 0 (bulk output's fields), or .jsonl
    shards/part-00000.stats.json that block's tokens / seconds / coverage (for the summary)
    generated.parquet            every shard in input order, written once all blocks are done
    summary.json                 the run's figures

Exactly once: the input is cut into blocks of consecutive records; a worker writes a block's shard to a
temporary name and renames it (atomic), and a block whose shard exists is never generated again, by a
retried task or by a rerun. A killed worker (Ray restarts it and retries its block) or a killed driver
(rerun the command) loses at most the blocks in flight, never writes a record twice. The merge then
checks that every block's shard holds exactly its records.

Ray is an optional extra (`pip install 'adgen[ray]'`); this module imports it only when run. The per-record loop
and the counts are bulk generation's (adgen.generation.bulk: `generated_rows`, `GenerationCounts`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from adgen.data.records import Record
from adgen.errors import AdgenError
from adgen.generation.bulk import BulkSummary, GenerationCounts, generated_rows
from adgen.generation.config import DecodingConfig
from adgen.generation.loader import load_generator
from adgen.generation.resumable import record_key
from adgen.io import atomic_output, atomic_write_bytes, atomic_write_json
from adgen.metrics import AttributeVocab
from adgen.run_dirs import RunDirectory, RunDirMessages

log = logging.getLogger(__name__)

SHARD_FORMATS = ("parquet", "jsonl")
DEFAULT_BLOCK_SIZE = 64
RAY_HINT = "Ray is not installed: pip install 'adgen[ray]' (or pip install 'ray[data]'), or use --engine local"


def import_ray():
    """`ray` and `ray.data`, or an AdgenError that says how to get them."""
    try:  # the optional extra adgen[ray]: imported when a catalog job starts
        import ray
        import ray.data
    except ImportError:
        raise AdgenError(RAY_HINT) from None
    return ray


# ---- the plan: blocks, shard names, the directory's identity ------------------------------------


def shard_path(out_dir: Path, block: int, fmt: str) -> Path:
    return out_dir / "shards" / f"part-{block:05d}.{fmt}"


def stats_path(out_dir: Path, block: int) -> Path:
    return out_dir / "shards" / f"part-{block:05d}.stats.json"


def _record_dict(r) -> dict:
    return {"content": r.content, "summary": r.summary, "line": r.line, "extra": dict(r.extra or {})}


def catalog_identity(records: Sequence, *, block_size: int, fmt: str, settings: dict) -> dict:
    """What must match for a directory to be resumed: the same input records, blocks and settings."""
    h = hashlib.sha256()
    for r in records:
        h.update(record_key(r.line, r.content).encode() + b"\n")
    return {"records": len(records), "input_sha256": h.hexdigest(), "block_size": block_size,
            "shard_format": fmt, **settings}


CATALOG_DIR = RunDirectory(
    # only what this module writes: a wrong --output must not delete someone's files
    owned=("catalog.json", "summary.json", "generated.parquet", "generated.jsonl", "shards/part-*", "shards/.part-*"),
    markers=("catalog.json",),
    manifest="catalog.json",
    resumable=("catalog.json",),  # a finished run is resumed too: its blocks are skipped, the merge is redone
    messages=RunDirMessages(
        is_file="--output {path}: is a file; with --engine ray the output is a directory (give a new name)",
        foreign="{path}: exists and is not an adgen catalog run (no catalog.json); give a new or empty "
                "--output directory",
        other_settings="{path}: holds a run of another catalog or other settings (differs in {diff}); give another "
                       "--output, or pass --overwrite to start it afresh",
        unreadable="{path}: its catalog.json cannot be read; give another --output, or pass --overwrite to start "
                   "it afresh",
    ),
)


def _prepare_dir(out_dir: Path, identity: dict, overwrite: bool) -> None:
    CATALOG_DIR.prepare(out_dir, identity, overwrite=overwrite)
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    for tmp in (out_dir / "shards").glob(".part-*.tmp"):  # left by a killed worker; that block is redone
        tmp.unlink(missing_ok=True)
    CATALOG_DIR.claim(out_dir, identity)


# ---- the worker ---------------------------------------------------------------------------------


def _write_rows(path: Path, rows: list[dict], fmt: str) -> None:
    if fmt == "jsonl":
        atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        return
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class BlockGenerator:
    """A Ray Data actor: loads the generator once, then generates whole blocks and writes their shards.

    Returns one stats row per block (what the driver's progress and summary need), not the texts."""

    def __init__(self, generator_kwargs: dict, config: dict, out_dir: str, fmt: str, n: int = 1,
                 best_of: str = "first", vocab_path: str | None = None, threads: int = 1) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.generator = load_generator(**generator_kwargs)
        self.config = DecodingConfig(**config)
        self.out_dir, self.fmt, self.n, self.best_of = Path(out_dir), fmt, n, best_of
        # Attribute coverage is reported for every run, not only with best_of="coverage".
        self.vocab = AttributeVocab.load(vocab_path) if vocab_path else AttributeVocab.default()

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in BlockStats.__dataclass_fields__}
        for block, payload in zip(batch["block"], batch["records"]):
            stats = self._block(int(block), json.loads(payload))
            for k, v in asdict(stats).items():
                out[k].append(v)
        return out

    def _block(self, block: int, items: list[dict]) -> BlockStats:
        shard = shard_path(self.out_dir, block, self.fmt)
        if shard.exists():  # a retried task whose first attempt got as far as the rename
            return BlockStats(**json.loads(stats_path(self.out_dir, block).read_text(encoding="utf-8")))
        records = [Record(d["content"], d["summary"], d["line"], d["extra"]) for d in items]
        stats = BlockStats(block=block, pid=os.getpid())
        start = time.perf_counter()
        rows = list(generated_rows(self.generator, records, self.config, stats, n=self.n, best_of=self.best_of,
                                   vocab=self.vocab, coverage_vocab=self.vocab))
        stats.seconds = time.perf_counter() - start
        # Stats first, then the shard: the shard's existence is what marks the block done.
        atomic_write_json(stats_path(self.out_dir, block), asdict(stats))
        _write_rows(shard, rows, self.fmt)
        return stats


@dataclass
class BlockStats(GenerationCounts):
    """One block's counts (written beside its shard, read back by a retried task and by the merge)."""

    block: int = 0
    pid: int = 0


# ---- the driver ----------------------------------------------------------------------------------


@dataclass
class CatalogSummary(BulkSummary):
    """A catalog job: bulk generation's summary (this run's records, tokens and time; coverage and endings over
    the whole catalog, earlier runs' blocks too), plus its blocks and Ray workers."""

    blocks: int = 0
    workers: int = 0
    output: str = ""

    @property
    def products_per_s(self) -> float:
        return self.samples_per_s

    def describe(self) -> str:
        done = self.generated + self.already_done
        cov = f"{self.attr_coverage:.3f}" if self.attr_coverage is not None else "n/a"
        return (f"{done}/{self.total} products written ({done / max(1, self.total):.1%} of the catalog) in "
                f"{self.blocks} blocks on {self.workers} Ray worker(s): {self.generated} generated now, "
                f"{self.already_done} already done (resumed), {len(self.bad_lines)} bad input line(s) skipped; "
                f"{self.seconds:.1f} s, {self.products_per_s:.2f} products/s, {self.tokens_per_s:.1f} tokens/s; "
                f"mean attribute coverage {cov}") + self.endings()

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "bad_lines"}
        return {**d, "bad_lines": len(self.bad_lines), "products_per_s": self.products_per_s,
                "tokens_per_s": self.tokens_per_s, "attr_coverage": self.attr_coverage}


def _init_ray(ray, address: str | None, workers: int | None) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        kw["address"] = address
    else:  # a local cluster with one CPU per worker (default: every core)
        kw["num_cpus"] = workers or os.cpu_count() or 1
    try:
        ray.init(**kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise AdgenError(f"--address {address}: cannot connect to a Ray cluster ({e}); start one with "
                         "`ray start --head`, or leave out --address for a local one") from None


def check_gpu_options(gpus_per_worker: float | None, device: str | None) -> None:
    """--gpus-per-worker against --device, before anything starts."""
    dev = str(device or "auto")
    if gpus_per_worker is not None:
        if not 0 <= gpus_per_worker <= 1:
            raise AdgenError(f"--gpus-per-worker must be between 0 and 1 (a fraction shares one GPU between workers; "
                             f"each worker's generator uses one GPU), not {gpus_per_worker:g}")
        if gpus_per_worker > 0 and dev == "cpu":
            raise AdgenError(f"--gpus-per-worker {gpus_per_worker:g} with --device cpu: the GPUs would be reserved "
                             "and left idle; leave out --device cpu, or pass --gpus-per-worker 0")
        if gpus_per_worker == 0 and dev.startswith("cuda"):
            raise AdgenError(f"--device {dev} with --gpus-per-worker 0: Ray hides the GPUs from workers that ask for "
                             "none; pass --gpus-per-worker 1 (or a fraction), or --device cpu")
    if dev.startswith("cuda:") and dev != "cuda:0":
        raise AdgenError(f"--device {dev} with --engine ray: Ray gives each worker its own GPU, which it sees as "
                         "cuda:0; use --device cuda (or auto) and choose GPUs with --gpus-per-worker")


def _driver_sees_cuda() -> bool:
    return torch.cuda.is_available()


def plan_workers(resources: dict, workers: int | None, gpus_per_worker: float | None, device: str | None,
                 todo: int) -> tuple[int, float]:
    """(workers, GPUs per worker) for the cluster's resources, or an AdgenError instead of a run that waits forever.

    GPUs per worker default to 1 where there are GPUs (this machine's or the cluster's) unless --device cpu: Ray
    hides the GPUs from an actor that asks for none, and it would load the model on the CPU in fp32."""
    cpus = int(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0))
    auto = gpus_per_worker is None
    if auto:
        cpu_only = str(device or "auto") == "cpu"
        gpus_per_worker = 1.0 if not cpu_only and (gpus > 0 or _driver_sees_cuda()) else 0.0
    if gpus_per_worker == 0:
        return min(workers or cpus, todo), 0.0
    fit = int(gpus / gpus_per_worker + 1e-9)  # workers the cluster's GPUs hold
    n = workers or fit
    if n < 1 or n > fit:
        why = " (the default where this machine or the cluster has a GPU)" if auto else ""
        need = max(n, 1)
        raise AdgenError(
            f"--gpus-per-worker {gpus_per_worker:g}{why} x {need} worker(s) needs {need * gpus_per_worker:g} GPU(s), "
            f"but the Ray cluster has {gpus:g}: lower --workers or --gpus-per-worker (a fraction shares a GPU; "
            "0 generates on CPUs), or add GPUs to the cluster")
    return min(n, todo), gpus_per_worker


def run_catalog(
    records: Sequence,
    output_dir: str | Path,
    *,
    generator_kwargs: dict,
    config: DecodingConfig | None = None,
    n: int = 1,
    best_of: str = "first",
    vocab_path: str | None = None,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    shard_format: str = "parquet",
    overwrite: bool = False,
    progress: bool = True,
) -> CatalogSummary:
    """Generate for every record on Ray Data into `output_dir` (see the module docstring); resumable.

    `gpus_per_worker`: Ray's `num_gpus` for each generator actor (None: 1 where there are GPUs, else 0)."""
    config = config or DecodingConfig()
    if shard_format not in SHARD_FORMATS:
        raise AdgenError(f"--shard-format must be {' or '.join(SHARD_FORMATS)}, not {shard_format!r}")
    if block_size < 1:
        raise AdgenError(f"--block-size must be >= 1, not {block_size}")
    if workers is not None and workers < 1:
        raise AdgenError(f"--workers must be >= 1, not {workers}")
    config.check_candidates(n)
    check_gpu_options(gpus_per_worker, generator_kwargs.get("device"))
    ray = import_ray()
    out_dir = Path(output_dir)
    settings = {"generator": {k: v for k, v in generator_kwargs.items()}, "decoding": asdict(config),
                "n": n, "best_of": best_of}
    identity = json.loads(json.dumps(catalog_identity(records, block_size=block_size, fmt=shard_format,
                                                      settings=settings), default=str))
    _prepare_dir(out_dir, identity, overwrite)

    blocks = [records[i : i + block_size] for i in range(0, len(records), block_size)]
    todo = [b for b in range(len(blocks)) if not shard_path(out_dir, b, shard_format).exists()]
    summary = CatalogSummary(total=len(records), blocks=len(blocks), output=str(out_dir))
    pending = set(todo)
    summary.already_done = sum(len(blocks[b]) for b in range(len(blocks)) if b not in pending)
    start = time.perf_counter()
    if todo:
        _init_ray(ray, address, workers)
        resources = ray.cluster_resources()
        summary.workers, gpus = plan_workers(resources, workers, gpus_per_worker, generator_kwargs.get("device"),
                                             len(todo))
        threads = max(1, int(resources.get("CPU", 1)) // summary.workers)
        items = [{"block": b, "records": json.dumps([_record_dict(r) for r in blocks[b]], ensure_ascii=False)}
                 for b in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            BlockGenerator,
            fn_constructor_kwargs={"generator_kwargs": generator_kwargs, "config": asdict(config),
                                   "out_dir": str(out_dir.resolve()), "fmt": shard_format, "n": n,
                                   "best_of": best_of, "vocab_path": vocab_path, "threads": threads},
            # Ray Data's actors restart and retry their task by default: a killed worker's block is redone
            # (or, if its shard was already renamed into place, only its stats are read back).
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=summary.workers), num_cpus=threads,
            num_gpus=gpus,
        )
        ray.data.DataContext.get_current().enable_progress_bars = progress
        bar = _products_bar(len(records), summary.already_done, progress)
        try:
            for row in ds.iter_rows():
                summary.generated += int(row["generated"])
                summary.completion_tokens += int(row["completion_tokens"])
                if bar is not None:
                    bar.update(int(row["generated"]))
        except Exception as e:
            raise AdgenError(f"the Ray run failed ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
                             f"every finished block is in {out_dir / 'shards'}: run the same command again to "
                             "resume") from None
        finally:
            if bar is not None:
                bar.close()
    summary.seconds = time.perf_counter() - start
    merge_shards(out_dir, [len(b) for b in blocks], shard_format, summary)
    atomic_write_json(out_dir / "summary.json", summary.to_json())
    return summary


def merge_shards(out_dir: Path, block_sizes: Sequence[int], fmt: str, summary: CatalogSummary | None = None) -> Path:
    """Check every block's shard (exactly its records) and write them in input order to `generated.<fmt>`.

    Streams shard by shard; adds every block's stats to `summary`."""
    missing = [b for b in range(len(block_sizes)) if not shard_path(out_dir, b, fmt).exists()]
    if missing:
        raise AdgenError(f"{out_dir}: {len(missing)} block(s) have no shard yet (e.g. block {missing[0]}); "
                         "run the same command again to finish them")
    target = out_dir / f"generated.{fmt}"
    with atomic_output(target) as tmp:
        if fmt == "jsonl":
            with open(tmp, "wb") as f:
                for b, size in enumerate(block_sizes):
                    data = shard_path(out_dir, b, fmt).read_bytes()
                    _check_count(out_dir, b, data.count(b"\n"), size)
                    f.write(data)
        else:
            paths = [shard_path(out_dir, b, fmt) for b in range(len(block_sizes))]
            # Blocks may differ in optional columns (e.g. summary only in some): one schema for all.
            schema = pa.unify_schemas([pq.read_schema(p) for p in paths], promote_options="permissive")
            with pq.ParquetWriter(tmp, schema) as writer:
                for b, (p, size) in enumerate(zip(paths, block_sizes)):
                    table = pq.read_table(p)
                    _check_count(out_dir, b, table.num_rows, size)
                    for name in schema.names:
                        if name not in table.column_names:
                            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
                    writer.write_table(table.select(schema.names).cast(schema))
    if summary is not None:
        for b in range(len(block_sizes)):
            s = json.loads(stats_path(out_dir, b).read_text(encoding="utf-8"))
            summary.coverage_sum += s["coverage_sum"]
            summary.coverage_n += s["coverage_n"]
            summary.length_cut += s["length_cut"]
            summary.loops += s["loops"]
    return target


def _check_count(out_dir: Path, block: int, rows: int, expected: int) -> None:
    if rows != expected:
        raise AdgenError(f"{shard_path(out_dir, block, 'x').with_suffix('')}: {rows} rows, expected {expected}; "
                         "delete that shard and run the same command again")


def read_generated(out_dir: str | Path) -> list[dict]:
    """The merged rows (tests, small catalogs): None-valued columns a row did not have are left out."""
    out_dir = Path(out_dir)
    if (out_dir / "generated.jsonl").exists():
        text = (out_dir / "generated.jsonl").read_text(encoding="utf-8")
        return [json.loads(x) for x in text.splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if v is not None}
            for r in pq.read_table(out_dir / "generated.parquet").to_pylist()]


def _products_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, unit="product", desc="products", dynamic_ncols=True)
