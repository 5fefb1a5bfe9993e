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
    moments and both schedules (any difference is named by its path)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where
