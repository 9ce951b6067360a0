"""The GPU check at the end of scripts/setup.sh: which GPU is here, and can the installed torch use it?

    .venv/bin/python scripts/check_gpu.py

Prints the GPU(s) `nvidia-smi` lists and what torch sees (its CUDA build, device name, compute capability).
Exits 1, naming the fix, when a GPU is present but torch cannot use it (a CPU-only torch, or a CUDA build newer
than the driver supports): otherwise training and generation would silently run on the CPU. Without nvidia-smi
(a CPU-only machine) it only reports and exits 0.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

FIX = ("install a torch build for this driver: `.venv/bin/python -m pip uninstall -y torch`, then "
       "`ADGEN_TORCH_SPEC='torch==2.13.0 --index-url <the PyTorch wheel index for CUDA {cuda} or older>' "
       "bash scripts/setup.sh` (PyTorch's install selector lists the indexes)")


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def nvidia_gpus() -> tuple[list[str], str | None] | None:
    """(one "name, driver, memory" line per GPU, the newest CUDA the driver supports), or None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = _run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if out is None:
        print("[setup] warning: nvidia-smi is here but failed (NVIDIA driver not loaded?): no GPU can be used "
              "until `nvidia-smi` works", file=sys.stderr)
    gpus = [line.strip() for line in (out or "").splitlines() if line.strip()]
    header = _run([smi]) or ""
    m = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return gpus, m.group(1) if m else None


def torch_report() -> tuple[bool, list[str]]:
    """(torch runs a kernel on the GPU, lines describing torch's view)."""
    import torch

    lines = [f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none, a CPU-only build'})"]
    if not torch.cuda.is_available():
        return False, lines + ["torch.cuda.is_available(): False"]
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        native = "bf16 native" if major >= 8 else "no native bf16: adgen uses fp32 here"
        lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}, compute capability {major}.{minor} ({native})")
    try:  # a build without kernels for this GPU's architecture fails only here
        (torch.ones(8, device="cuda") * 2).sum().item()
    except RuntimeError as e:
        return False, lines + [f"a kernel on cuda:0 failed: {str(e).splitlines()[0][:200]}"]
    return True, lines


def main() -> int:
    found = nvidia_gpus()
    if found is None:
        print("[setup] no nvidia-smi: no NVIDIA GPU here; adgen runs on the CPU")
    else:
        gpus, driver_cuda = found
        for line in gpus or ["(nvidia-smi lists no GPU)"]:
            print(f"[setup] GPU: {line}" + (f" (driver supports CUDA <= {driver_cuda})" if driver_cuda else ""))
    usable, lines = torch_report()
    for line in lines:
        print(f"[setup] {line}")
    if found is not None and found[0] and not usable:
        cuda = found[1] or "the driver's version (nvidia-smi's header)"
        print(f"[setup] error: a GPU is present but torch cannot use it; {FIX.format(cuda=cuda)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
