"""Peak RSS, page faults and kernel time of N steps of the demo recipe in this process (one allocator setup).

TRACE=1 prints each step's peak RSS and the RSS after the trimmer. LEAN=0 turns the lean norm / MLP blocks off. TRIM=0 drops the trainer's heap trim, TRIM=each trims after every step, unset = the trainer's own rule; the allocator itself is chosen from outside (bench/memory_allocators.sh:
THP_MEM_ALLOC_ENABLE, MALLOC_MMAP_THRESHOLD_, LD_PRELOAD=libjemalloc). Last line: RESULT <tag> wall tok/s maxrss
minflt utime stime sys_share.
"""
import os, sys, resource, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]
import adgen.train.memory as M  # the loop looks its heap trimmer up here
import adgen.train.trainer as T
from adgen.train.config import load_train_config
if os.environ.get("TRIM") == "0":  # never trim
    M.heap_trimmer = lambda device: (lambda: None)
elif os.environ.get("TRIM") == "each":  # trim after every step (the trainer before 2026-12-02)
    M.heap_trimmer = lambda device: (lambda: M.malloc_trim()(0))
if os.environ.get("TRACE"):  # one line per step: the step's peak RSS (sampled every 50 ms), the RSS after the trimmer
    import threading

    def _rss():
        return M.rss_bytes() / 2**30

    _peak = [0.0]

    def _sample():
        while True:
            _peak[0] = max(_peak[0], _rss())
            time.sleep(0.05)

    threading.Thread(target=_sample, daemon=True).start()
    _inner = M.heap_trimmer

    def _traced(device):
        trimmer, step = _inner(device), [0]

        def after_step():
            step[0] += 1
            trimmer()
            print(f"step {step[0]:3d} peak {_peak[0]:.2f} GiB, after the trimmer {_rss():.2f} GiB", flush=True)
            _peak[0] = 0.0
        return after_step

    M.heap_trimmer = _traced
steps = int(os.environ.get("STEPS", "12"))
out = f"/tmp/adgen-mem-{os.getpid()}"
cfg = load_train_config("demo-smollm2-135m", {"max_steps": steps, "output_dir": out, "progress": False,
      "train_data": str(ROOT.parent / "shared/adgen/train.json"), "eval_data": str(ROOT.parent / "shared/adgen/dev.json"), "plot": False,
      "max_eval_samples": 8, "log_every": 4, "lean_layers": os.environ.get("LEAN", "1") != "0"})
t0 = time.time()
r = T.train(cfg, overwrite=True)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"RESULT {os.environ.get('TAG'):14s} wall={time.time()-t0:4.0f}s tok/s={r.summary.get('tokens_per_s', 0):5.0f} maxrss={ru.ru_maxrss/2**20:.2f}GiB "
      f"minflt={ru.ru_minflt/1e6:5.2f}M utime={ru.ru_utime:4.0f} stime={ru.ru_stime:4.0f} sys_share={ru.ru_stime/(ru.ru_utime+ru.ru_stime):.3f}", flush=True)
import shutil  # noqa: E402
shutil.rmtree(out, ignore_errors=True)
