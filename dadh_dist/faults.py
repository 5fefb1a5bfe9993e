"""Fault injection for tests: `DADH_FAULT` holds comma-separated specs, each firing once.

    kill:<phase>:<t>:<rank>   the worker exits (code 17) in phase streams|codes|checkpoint
                              of outer iteration t (0-based)
    nan:<t>:<rank>            the worker's stream outputs turn NaN at iteration t's first step
    flip:<t>:<rank>           one bit of that worker's B flips after iteration t's code step

A fired kill leaves a marker in the run folder, so the restarted worker runs through.
"""

from __future__ import annotations

import os
from pathlib import Path

KILL_EXIT_CODE = 17


def _specs() -> list[list[str]]:
    raw = os.environ.get("DADH_FAULT", "")
    return [s.split(":") for s in raw.split(",") if s.strip()]


def armed(kind: str, t: int, rank: int, phase: str | None = None) -> bool:
    for spec in _specs():
        if spec[0] != kind:
            continue
        if kind == "kill":
            if spec[1:] == [phase, str(t), str(rank)]:
                return True
        elif spec[1:] == [str(t), str(rank)]:
            return True
    return False


def maybe_kill(phase: str, t: int, rank: int, run_dir: Path | None) -> None:
    if run_dir is None or not armed("kill", t, rank, phase):
        return
    marker = run_dir / f".fault_{phase}_{t}_{rank}"
    if marker.exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("fired")
    os._exit(KILL_EXIT_CODE)
