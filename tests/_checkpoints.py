"""Checkpoint helpers shared by the fault and resume tests."""

from __future__ import annotations

from pathlib import Path

import torch


def flip_byte(path: Path) -> None:
    """Corrupt a file in place: invert the byte in its middle."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_same_state(a, b, where: str = "state") -> None:
    """Two checkpoint states hold identical values: B, both streams' weights, both optimisers'
    moments and both schedules (any difference is named by its path). The training's wall time
    (loop.WALL_KEY) is when, not what: not compared."""
    from dadh_dist.loop import WALL_KEY

    if isinstance(a, dict):
        skip = {WALL_KEY} if where == "state" else set()
        assert a.keys() - skip == b.keys() - skip, where
        for key in a.keys() - skip:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def keep_merged(run: Path, staged: Path | None, metrics: dict) -> Path | None:
    """What Ray Train does with a checkpoint every worker reports, for plain gloo workers on
    one machine: each worker copies its folder's files (its block of B; rank 0's also the state
    and the manifest) into one folder, and after a barrier rank 0 keeps it in `run`. Called on
    every rank; returns the kept folder on rank 0."""
    import shutil

    import torch.distributed as dist

    from dadh_dist import run as runner

    if staged is None:
        return None
    merge = Path(run) / f".merge_{int(metrics['t']):06d}"
    merge.mkdir(parents=True, exist_ok=True)
    for path in staged.iterdir():
        shutil.copy2(path, merge / path.name)
    dist.barrier()
    kept = None
    try:
        if dist.get_rank() == 0:
            kept = runner.folders.keep_checkpoint(Path(run), merge)
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(merge, ignore_errors=True)
        dist.barrier()
    return kept
