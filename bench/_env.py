"""Machine, load and library versions, printed under every benchmark table (STYLE habit 8).

Timings on a shared 2-core box move with whatever else runs, so the load average is recorded
next to the numbers it may have disturbed.

Importing this module sets OMP_WAIT_POLICY=PASSIVE unless the caller set it, so every benchmark
imports it before torch. With the default (spinning) policy, torch's OpenMP threads on a busy
machine wait for each other at every small parallel op: one DCC sweep at n = 100k took 6-10 s
with 2 threads instead of 0.8 s. Passive waiting costs nothing measurable on an idle machine.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see above

REPO = Path(__file__).resolve().parent.parent
LIBRARIES = ("numpy", "torch", "torchvision", "faiss", "ray")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "?")
    except ImportError:
        return "not installed"


def _gpu() -> str:
    try:
        import torch
    except ImportError:
        return "none"
    if not torch.cuda.is_available():
        return "none"
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    return f"{torch.cuda.device_count()} × {', '.join(sorted(names))} (CUDA {torch.version.cuda})"


def _git() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "dadh_dist"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (dadh_dist modified)" if dirty else "")


def _blas_threads() -> str:
    """Threads of the BLAS libraries loaded now (numpy's matmul baselines run on these)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (no threadpoolctl)"
    pools = [f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info()
             if i.get("user_api") == "blas"]
    return ", ".join(pools) or "none loaded"


def environment() -> dict[str, str]:
    """What a reader needs to compare these numbers with theirs."""
    info = {
        "cpu": f"{_cpu_model()}, {_cores()} cores usable",
        "ram": _ram_gib(),
        "gpu": _gpu(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "commit": _git(),
    }
    info.update({name: _version(name) for name in LIBRARIES})
    info["BLAS threads"] = _blas_threads()
    try:
        import torch

        info["torch threads"] = str(torch.get_num_threads())
        info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    except ImportError:
        pass
    return info


def print_environment(load_at_start: str) -> None:
    """Markdown bullet list: machine, versions, load average at the start and now."""
    print()
    for key, value in environment().items():
        print(f"- {key}: {value}")
    print(f"- load average (1/5/15 min) at start: {load_at_start}; at end: {load_average()}")
    print(f"- command: python {' '.join(sys.argv)}")
