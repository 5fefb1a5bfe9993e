"""Checkpoints with a manifest written last (docs/design.md §3).

A checkpoint folder holds `state.pt` (both streams, optimisers, schedulers, t; random streams
are derived from (seed, t, rank), so none is saved), `config.toml` (the resolved config), one
file of B's rows per worker, `codes_<start>_<stop>.npy` (int8 ±1, each written by the worker that
holds those rows: Ray merges every worker's files into one checkpoint folder), and
`manifest.json`, written last by rank 0, with the SHA-256 of every file, every block's included
(the workers send rank 0 their blocks' digests), and the blocks' row ranges. A folder whose
manifest is missing, unreadable or does not match its files (a block missing included) is
refused with a message naming the file; `latest_valid` then falls back to the previous
checkpoint. Checkpoints of format 1 hold the whole B inside state.pt and still load.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import sys
import threading
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
STATE = "state.pt"
CONFIG = "config.toml"
FORMAT = 2
BLOCK = "codes_{start:012d}_{stop:012d}.npy"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (names the file at fault)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def replacing(path: Path):
    """Yield a temporary name beside `path` for the block to write; `path` is replaced by it
    when the block ends, so readers never see half a file. The temporary file is the writer's
    own (processes of one machine may write one file at once: serve replicas opening one run)
    and goes however the block fails, an interrupt included (a full disk keeps its space)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (`replacing`), synced before the rename."""
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_block(folder: str | Path, start: int, stop: int, B_rows) -> tuple[str, str]:
    """Write one worker's rows [start, stop) of B (int8 (stop - start, k)) into `folder`;
    returns (file name, SHA-256) for rank 0's manifest."""
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = BLOCK.format(start=start, stop=stop)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(np.asarray(B_rows, dtype=np.int8)), allow_pickle=False)
    write_atomic(folder / name, buf.getvalue())
    return name, _sha256(folder / name)


def save(folder: str | Path, state: dict, config_toml: str, fingerprint: str,
         before_manifest: Callable[[], None] | None = None,
         blocks: list[tuple[int, int, str, str]] | None = None,
         shape: tuple[int, int] | None = None) -> Path:
    """Write state and config, then the manifest that vouches for them and for every block of B
    (`blocks`: (start, stop, file, SHA-256) of each worker's `save_block`, in row order;
    `shape`: B's (n, k)). `before_manifest`: a fault-injection hook, called when the files are
    written but not yet vouched for."""
    import torch  # here, not at the top: the CLI's error handling imports this module

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(folder / STATE, buf.getvalue())
    write_atomic(folder / CONFIG, config_toml.encode())
    if before_manifest is not None:
        before_manifest()
    files = {name: _sha256(folder / name) for name in (STATE, CONFIG)}
    manifest = {"format": FORMAT, "t": int(state["t"]), "fingerprint": fingerprint}
    if blocks is not None:
        problem = _untiled([(a, b) for a, b, _, _ in blocks], shape)
        if problem:
            raise ValueError(problem)
        files.update((name, digest) for _, _, name, digest in blocks)
        manifest["codes"] = {"shape": [int(v) for v in shape],
                             "blocks": [[int(a), int(b), name] for a, b, name, _ in blocks]}
    manifest["files"] = files
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return folder


def verify(folder: str | Path) -> dict:
    """The manifest of a checkpoint whose files all match it; CheckpointError otherwise."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    with _reading(mpath):
        if not mpath.is_file():
            raise CheckpointError(f"{mpath}: missing manifest (checkpoint incomplete)")
        raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    problem = _malformed(manifest)
    if problem:
        raise CheckpointError(f"{mpath}: unreadable manifest ({problem})")
    for name, digest in manifest["files"].items():
        path = folder / name
        with _reading(path):
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the manifest but missing")
            if _sha256(path) != digest:
                raise CheckpointError(f"{path}: contents do not match the manifest (corrupt)")
    return manifest


@contextlib.contextmanager
def _reading(path: Path):
    """A file that cannot be read (another user's, a failing disk) refuses the checkpoint."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def _malformed(manifest) -> str | None:
    """What makes a parsed manifest unusable (None if nothing): the fields `verify`, `load` and
    `latest_valid` rely on, of the types they rely on. Both formats list state and config."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    t, files = manifest.get("t"), manifest.get("files")
    if not isinstance(t, int) or isinstance(t, bool):
        return f"t is {t!r}, not an integer"
    if not isinstance(manifest.get("fingerprint"), str):
        return "no fingerprint"
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return "files is not a table of SHA-256 digests"
    for name in (STATE, CONFIG):
        if name not in files:
            return f"lists no {name}"
    if "codes" not in manifest:
        return None
    codes = manifest["codes"]
    try:
        n, k = (int(v) for v in codes["shape"])
        blocks = [(int(a), int(b), str(name)) for a, b, name in codes["blocks"]]
    except (TypeError, ValueError, KeyError) as e:
        return f"codes: {e}"
    missing = [name for _, _, name in blocks if name not in files]
    if missing:
        return f"codes: block {missing[0]} not among the files"
    return _untiled([(a, b) for a, b, _ in blocks], (n, k))


def _untiled(ranges: list[tuple[int, int]], shape: tuple[int, int] | None) -> str | None:
    """Why the row ranges [start, stop) do not tile B's rows [0, n) in order (None if they do)."""
    at = 0
    for start, stop in ranges:
        if start != at or stop < start:
            return f"blocks of B must tile the rows in order: {start} after {at}"
        at = stop
    if shape is None or at != shape[0]:
        return f"blocks of B cover rows [0, {at}) but B has shape {shape}"
    return None


def load(folder: str | Path, map_location="cpu", codes: bool = True) -> tuple[dict, dict]:
    """(state, manifest) of a verified checkpoint; state["B"] is the whole (n, k) B, assembled
    from its blocks, unless `codes` is False (a worker that reads only its rows: `load_rows`;
    a format-1 state.pt holds the whole B whatever `codes` says)."""
    import torch

    manifest = verify(folder)
    # tensors and plain containers only: a checkpoint from a shared bucket cannot run code here
    try:
        state = torch.load(Path(folder) / STATE, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{Path(folder) / STATE}: holds more than tensors and plain values "
                              f"({str(e).strip().splitlines()[0]})") from None
    if codes and "codes" in manifest:
        n = codes_shape(manifest, state)[0]
        state["B"] = load_rows(folder, manifest, state, 0, n)
    return state, manifest


def codes_shape(manifest: dict, state: dict | None = None) -> tuple[int, int]:
    """B's (n, k) in a checkpoint (format 2: the manifest; format 1: state.pt's B)."""
    if "codes" in manifest:
        return tuple(int(v) for v in manifest["codes"]["shape"])
    return tuple(state["B"].shape)


def load_rows(folder: str | Path, manifest: dict, state: dict | None, start: int, stop: int):
    """Rows [start, stop) of a checkpoint's B as an int8 tensor, reading only the blocks that
    overlap them (memory-mapped), whatever split wrote them. `state`: format 1's state.pt."""
    import numpy as np
    import torch

    if "codes" not in manifest:  # format 1: the whole B inside state.pt
        return state["B"][start:stop].to(torch.int8).clone()
    n, k = codes_shape(manifest)
    out = np.empty((stop - start, k), np.int8)
    for a, b, name in manifest["codes"]["blocks"]:
        lo, hi = max(a, start), min(b, stop)
        if lo >= hi:
            continue
        path = Path(folder) / name
        try:
            rows = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise CheckpointError(f"{path}: not a block of codes ({e})") from None
        if rows.shape != (b - a, k) or rows.dtype != np.int8:
            raise CheckpointError(f"{path}: holds {rows.dtype} {rows.shape}, the manifest says "
                                  f"int8 {(b - a, k)}")
        out[lo - start : hi - start] = rows[lo - a : hi - a]
    return torch.from_numpy(out)


def latest_valid(run_folder: str | Path, warn=None) -> Path | None:
    """The verified checkpoint with the highest t under `run_folder` (None if there is none).

    Refused checkpoints are reported through `warn` (`warning` by default) and skipped.
    """
    run_folder = Path(run_folder)
    if not run_folder.is_dir():
        return None
    warn = warn or warning
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


def warning(msg: str) -> None:
    """`warning: msg` on stderr, flushed. Not print(): Ray patches print in its workers (where
    resumes look for checkpoints) to log the line as well, which reached the driver twice. Not
    `monitor.say` either: monitor imports this module, and on stdout a warning would mix into a
    tool's output (search's results)."""
    sys.stderr.write(f"warning: {msg}\n")
    sys.stderr.flush()


STAGING_PREFIXES = ("dadh_ckpt_", "dadh_resume_")
"""Private folders a worker makes in the temporary directory: a checkpoint being staged for Ray,
a copy of the checkpoint it resumes from. Each name carries its maker's process id."""
STALE_AFTER_S = 3600.0


def staging_prefix(kind: str) -> str:
    """`dadh_ckpt_<pid>_` or `dadh_resume_<pid>_`: the prefix of this process's private folder."""
    prefix = f"dadh_{kind}_"
    if prefix not in STAGING_PREFIXES:
        raise ValueError(f"staging kind {kind!r}: expected ckpt or resume")
    return f"{prefix}{os.getpid()}_"


def remove_stale_staging(root: str | Path | None = None, now: float | None = None,
                         alive: Callable[[int], bool] | None = None,
                         prefixes: tuple[str, ...] = STAGING_PREFIXES,
                         stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the private folders under `root` (the temporary directory) that a killed worker
    left behind: those whose process is gone and that have not changed for STALE_AFTER_S (a
    worker killed mid-checkpoint never reaches its cleanup; on a node that restarts workers
    these would pile up, a checkpoint's size each). A folder of a live process, a recent one,
    or one whose name holds no process id is left alone (the id follows the prefix, then `_`,
    `-` or the name's end). An export's own staging inside its --out: other `prefixes`, with
    `stale_after_s` = 0. Returns what was deleted."""
    import re
    import shutil
    import tempfile
    import time

    root = Path(root or tempfile.gettempdir())
    now = time.time() if now is None else now
    alive = alive or _process_alive
    removed = []
    for prefix in prefixes:
        for folder in root.glob(f"{prefix}*"):
            pid = re.match(r"(\d+)(?:[_-]|$)", folder.name[len(prefix):])
            try:
                if (not folder.is_dir() or pid is None or alive(int(pid[1]))
                        or now - folder.stat().st_mtime < stale_after_s):
                    continue
            except OSError:  # removed meanwhile by another worker of this node
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
