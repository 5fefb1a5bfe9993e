"""Shared benchmark plumbing: Markdown tables, timing, peak memory of a fresh process, and the
first-call (compile) cost of the numba kernels.

Peak memory is the kernel's high-water mark of the resident set (VmHWM), read by a child process
that ran one variant only: tracemalloc does not see torch's allocations, and a parent that ran
several variants would report the largest of them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo group or a server the benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats with 4 significant digits (whole numbers from 1,000 up)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def timed(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Best (minimum) wall time of `repeat` calls after `warmup` untimed ones: (s, last result).

    The minimum, not the median: on a shared machine the noise only ever adds time.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def timed_cpu(fn: Callable[[], object], repeat: int = 3,
              warmup: int = 1) -> tuple[float, float, object]:
    """Like `timed`, plus the least CPU time of this process (all its threads) over the calls.

    On a busy machine CPU time says what the work costs; wall time also holds the waiting.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    walls, cpus = [], []
    for _ in range(max(1, repeat)):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), result


def ratio(baseline: float, ours: float) -> str:
    """'12.3×' (how many times faster ours is)."""
    return f"{baseline / ours:.1f}×" if ours > 0 else "∞"


def verdict(ok: bool) -> str:
    return "pass" if ok else "MISS"


def exit_status(checks: Sequence[tuple[str, bool]], targets: Sequence[tuple[str, bool]] = (),
                judged: bool = True) -> int:
    """Print what the exit status rests on and return it (for `sys.exit`).

    checks: (what, ok) of results that must equal the baseline's, judged in every run, so a
    fast but wrong kernel fails. targets: (what, met) of speed and memory targets, judged only
    when `judged` (not in a smoke run, whose toy sizes say nothing about the targets' sizes).
    1 when a check failed or a judged target was missed, else 0.
    """
    failed = [what for what, ok in checks if not ok]
    missed = [what for what, ok in targets if not ok]
    print()
    if checks:
        print(f"- checks against the baseline: {len(checks) - len(failed)} of {len(checks)} pass"
              + (f"; FAILED: {'; '.join(failed)}" if failed else ""))
    if targets and judged:
        print(f"- targets: {len(targets) - len(missed)} of {len(targets)} met"
              + (f"; MISSED: {'; '.join(missed)}" if missed else ""))
    elif targets:
        print(f"- targets: not judged at smoke sizes ({len(targets) - len(missed)} of "
              f"{len(targets)} would be met)")
    status = 1 if failed or (judged and missed) else 0
    print(f"- exit status {status}")
    return status


def memory_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    rss = hwm = float("nan")
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, hwm


def run_child(script: str | Path, spec: dict, timeout_s: float = 1800) -> dict:
    """Run `script --child '<json spec>'` in a fresh interpreter; returns its last stdout line.

    The child prints one JSON object as its last line (timings, peak memory, result paths).
    """
    cmd = [sys.executable, str(script), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_call_seconds(snippet: str, timeout_s: float = 900) -> tuple[float, float]:
    """(cold, cached): seconds of `snippet`'s first call to a compiled kernel in a fresh process,
    first with an empty numba cache (the compile), then again with the cache it left behind.

    The snippet runs with `import time` done and must set `seconds`; the other imports it needs
    happen before its clock starts, so only the kernel's first call is counted.
    """
    code = (f"import time\n{snippet}\nprint(repr(seconds))\n")
    with tempfile.TemporaryDirectory(prefix="dadh_numba_cache_") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        out = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=timeout_s, env=env, cwd=Path(__file__).parent)
            if proc.returncode != 0:
                raise RuntimeError(f"first-call probe failed:\n{proc.stderr[-3000:]}")
            out.append(float(proc.stdout.strip().splitlines()[-1]))
    return out[0], out[1]
