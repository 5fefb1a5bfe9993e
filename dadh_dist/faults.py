"""Fault injection for tests: `DADH_FAULT` holds comma-separated specs.

    kill:<phase>:<t>:<rank>   the worker exits (code 17) in phase streams|codes|checkpoint
                              of outer iteration t (0-based)
    nan:<t>:<rank>            the worker's stream outputs turn NaN at iteration t's first step
    flip:<t>:<rank>           one bit of that worker's B flips after iteration t's code step
    node:<t>:<sid>            a worker whose Unix session is <sid> kills that session's process
                              group at the start of outer iteration t: a whole Ray node, when the
                              node was started as its own session (`ray start --block` under
                              setsid, as tests/test_lost_node.py does); any other worker ignores it

A fired kill leaves a marker in the run folder, so it fires once and the restarted worker runs
through (a node's session is gone with the node). nan and flip fire every time their point is
reached: a restart from an earlier checkpoint meets them again, as it would a fault of the data.
The training loop reaches these points through one `Faults` object per worker.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


def maybe_kill_node(t: int, run_dir: Path | None) -> None:
    """Take this worker's whole node down (raylet, agents, this worker) if a node spec says so.

    The spec names the node by its session id, so the fault can only ever kill processes of the
    session it was aimed at. Ray workers put themselves in process groups of their own, so the
    worker kills the node's group, then exits; the node's other workers die with their raylet.
    """
    sid = os.getsid(0)
    for spec in _specs():
        if spec[0] == "node" and spec[1:] == [str(t), str(sid)]:
            if run_dir is not None:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / f".fault_node_{t}_{sid}").write_text("fired")
            os.killpg(sid, signal.SIGKILL)
            os._exit(KILL_EXIT_CODE)


class Faults:
    """The fault-injection points of one worker, read once from DADH_FAULT. The loop calls each
    point where its fault would strike; with DADH_FAULT unset every call does nothing."""

    def __init__(self, rank: int, run_dir: Path | None):
        self.rank, self.run_dir = rank, run_dir
        self.active = bool(_specs())

    def kill(self, phase: str, t: int) -> None:
        """Exit here if `kill:<phase>:<t>:<rank>` names this point (streams, codes)."""
        if self.active:
            maybe_kill(phase, t, self.rank, self.run_dir)

    def lose_node(self, t: int) -> None:
        if self.active:
            maybe_kill_node(t, self.run_dir)

    def poison(self, t: int, X: torch.Tensor) -> torch.Tensor:
        """The first mini-batch's stream outputs of iteration t, NaN under `nan:<t>:<rank>`."""
        return X * float("nan") if self.active and armed("nan", t, self.rank) else X

    def flip(self, t: int, B: torch.Tensor) -> None:
        """One bit of this worker's B flips in place under `flip:<t>:<rank>`."""
        if self.active and armed("flip", t, self.rank):
            B[0, 0] = -B[0, 0]

    def during_checkpoint(self, t: int) -> Callable[[], None]:
        """Called between a checkpoint's files and its manifest (`kill:checkpoint:<t>:<rank>`)."""
        return functools.partial(self.kill, "checkpoint", t)
