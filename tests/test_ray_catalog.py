"""`adgen generate --engine ray`: a local Ray cluster with 2 CPU workers writes the same rows as the
single-process engine (greedy), and a worker or the driver killed mid-run still ends with every record
written exactly once. Spawns processes: slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adgen.data.records import read_records
from adgen.errors import AdgenError
from adgen.generation.config import DecodingConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 24
BLOCK = 4


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster of 2 CPUs, owned by this test process (other drivers join it by address)."""
    import ray  # the test extra has it: no skip
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, adgen_dev_path) -> Path:
    """40 dev records as a catalog (content + an id, no copy yet)."""
    rows = [{"sku": f"sku-{i}", "content": r.content} for i, r in enumerate(read_records(adgen_dev_path).records[:40])]
    path = tmp_path_factory.mktemp("catalog") / "catalog.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def generator_kwargs(tiny_llama3_dir) -> dict:
    # what the CLI passes for --model DIR --device cpu (--dtype auto is fp32 on CPU)
    return dict(model_spec=str(tiny_llama3_dir), adapter=None, backend="hf", dtype="auto", device="cpu",
                batch_size=32, continuous=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, catalog, generator_kwargs) -> list[dict]:
    """The single-process engine's output for the catalog (today's `generate --input` path)."""
    from adgen.generation import load_generator
    from adgen.generation.bulk import generate_bulk

    out = tmp_path_factory.mktemp("reference") / "ref.jsonl"
    generate_bulk(load_generator(**generator_kwargs), read_records(catalog, require_summary=False).records, out,
                  DecodingConfig(max_new_tokens=MAX_NEW), progress=False)
    return [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]


def _records(catalog):
    return read_records(catalog, require_summary=False).records


def _run(catalog, out, generator_kwargs, **kw):
    from adgen.generation.ray_catalog import run_catalog

    return run_catalog(_records(catalog), out, generator_kwargs=generator_kwargs,
                       config=DecodingConfig(max_new_tokens=MAX_NEW), workers=2, block_size=BLOCK, progress=False, **kw)


def _assert_exactly_once_and_equal(out: Path, reference: list[dict]) -> None:
    from adgen.generation.ray_catalog import read_generated

    rows = read_generated(out)
    assert [r["line"] for r in rows] == list(range(1, 41))  # every record, once, in input order
    assert rows == reference
    shards = sorted((out / "shards").glob("part-*.parquet")) or sorted((out / "shards").glob("part-*.jsonl"))
    assert len(shards) == 10 and not list((out / "shards").glob(".*.tmp"))


def test_two_workers_equal_single_process(ray_cluster, catalog, generator_kwargs, reference, tmp_path):
    out = tmp_path / "run"
    summary = _run(catalog, out, generator_kwargs, shard_format="jsonl")
    assert summary.generated == 40 and summary.already_done == 0 and summary.workers == 2
    assert summary.completion_tokens > 0 and summary.products_per_s > 0 and summary.attr_coverage is not None
    _assert_exactly_once_and_equal(out, reference)
    assert json.loads((out / "summary.json").read_text())["generated"] == 40

    # done: a rerun starts no worker and only merges again
    again = _run(catalog, out, generator_kwargs, shard_format="jsonl")
    assert again.generated == 0 and again.already_done == 40 and again.workers == 0
    # another model / decoding in the same directory is refused, not mixed in
    with pytest.raises(AdgenError, match="holds a run of another catalog or other settings.*decoding"):
        from adgen.generation.ray_catalog import run_catalog

        run_catalog(_records(catalog), out, generator_kwargs=generator_kwargs,
                    config=DecodingConfig(max_new_tokens=MAX_NEW + 1), workers=2, block_size=BLOCK,
                    shard_format="jsonl", progress=False)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def test_worker_killed_mid_run_writes_every_record_once(ray_cluster, catalog, generator_kwargs, reference, tmp_path):
    out = tmp_path / "run"
    killed: dict = {}

    def kill_a_worker():
        # Once the first block is written, SIGKILL one of the generator actors (a process of this test's cluster).
        deadline = time.monotonic() + 300
        while not list((out / "shards").glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in _descendants(os.getpid()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::MapWorker(MapBatches(BlockGenerator))"):
                killed["shards_before"] = len(list((out / "shards").glob("part-*.parquet")))
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return

    t = threading.Thread(target=kill_a_worker, daemon=True)
    t.start()
    summary = _run(catalog, out, generator_kwargs)
    t.join(5)
    assert killed.get("pid") and killed["shards_before"] < 10, killed  # it really died mid-run
    assert summary.generated == 40
    _assert_exactly_once_and_equal(out, reference)


def test_driver_killed_mid_run_then_rerun(ray_cluster, catalog, tiny_llama3_dir, reference, tmp_path):
    from adgen.cli import main

    out = tmp_path / "run"
    args = ["generate", "--model", str(tiny_llama3_dir), "--device", "cpu", "--input", str(catalog), "--output", str(out),
            "--engine", "ray", "--address", ray_cluster, "--workers", "2", "--block-size", str(BLOCK),
            "--max-new-tokens", str(MAX_NEW), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    driver = subprocess.Popen([sys.executable, "-m", "adgen", *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "shards").glob("part-*.parquet")) and time.monotonic() < deadline:
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            time.sleep(0.02)
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait(30) == -signal.SIGKILL
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.stderr.close()
    written = len(list((out / "shards").glob("part-*.parquet")))
    assert 1 <= written < 10 and not (out / "generated.parquet").exists()

    assert main(args) == 0  # the rerun generates only the missing blocks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["already_done"] >= written * BLOCK and summary["generated"] + summary["already_done"] == 40
    _assert_exactly_once_and_equal(out, reference)


def test_without_ray_one_line_error(tmp_path, catalog):
    code = ("import sys; sys.modules['ray'] = None; from adgen.cli import main; "
            f"sys.exit(main(['generate', '--input', {str(catalog)!r}, '--output', {str(tmp_path / 'o')!r}, "
            "'--engine', 'ray']))")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "adgen: error: Ray is not installed: pip install 'adgen[ray]' (or pip install 'ray[data]'), or use --engine local"]
