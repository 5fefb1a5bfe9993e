"""Checkpoints with a manifest written last (docs/design.md §3).

A checkpoint folder holds `state.pt` (both streams, optimisers, schedulers, B, t; random streams
are derived from (seed, t, rank), so none is saved),
`config.toml` (the resolved config) and `manifest.json`, written last, with the SHA-256 of every
file. A folder whose manifest is missing, unreadable or does not match its files is refused
with a message naming the file; `latest_valid` then falls back to the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
STATE = "state.pt"
CONFIG = "config.toml"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (names the file at fault)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(folder: str | Path, state: dict, config_toml: str, fingerprint: str,
         before_manifest: Callable[[], None] | None = None) -> Path:
    """Write state and config, then the manifest that vouches for them (`before_manifest`: a
    fault-injection hook, called when the files are written but not yet vouched for)."""
    import torch  # here, not at the top: the CLI's error handling imports this module

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(folder / STATE, buf.getvalue())
    write_atomic(folder / CONFIG, config_toml.encode())
    if before_manifest is not None:
        before_manifest()
    manifest = {
        "format": FORMAT,
        "t": int(state["t"]),
        "fingerprint": fingerprint,
        "files": {name: _sha256(folder / name) for name in (STATE, CONFIG)},
    }
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return folder


def verify(folder: str | Path) -> dict:
    """The manifest of a checkpoint whose files all match it; CheckpointError otherwise."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing manifest (checkpoint incomplete)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        manifest["t"], manifest["fingerprint"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: contents do not match the manifest (corrupt)")
    return manifest


def load(folder: str | Path, map_location="cpu") -> tuple[dict, dict]:
    """(state, manifest) of a verified checkpoint."""
    import torch

    manifest = verify(folder)
    # tensors and plain containers only: a checkpoint from a shared bucket cannot run code here
    try:
        state = torch.load(Path(folder) / STATE, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{Path(folder) / STATE}: holds more than tensors and plain values "
                              f"({str(e).strip().splitlines()[0]})") from None
    return state, manifest


def latest_valid(run_folder: str | Path, warn=None) -> Path | None:
    """The verified checkpoint with the highest t under `run_folder` (None if there is none).

    Refused checkpoints are reported through `warn` (stderr by default) and skipped.
    """
    run_folder = Path(run_folder)
    if not run_folder.is_dir():
        return None
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    best: tuple[int, str, Path] | None = None
    for folder in sorted(run_folder.glob("checkpoint_*")):
        if not folder.is_dir():
            continue
        try:
            manifest = verify(folder)
        except CheckpointError as e:
            warn(f"skipping checkpoint: {e}")
            continue
        key = (manifest["t"], folder.name, folder)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None
