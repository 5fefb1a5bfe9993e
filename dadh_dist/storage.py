"""Run folders behind a URI (`dadh_dist.uri`: any filesystem pyarrow opens).

A run whose `log.run_dir` is a URI keeps the same layout as a local one (`config.toml`, `tb/`,
`final_metrics.json`, `checkpoint_*`), stored remotely. Whoever writes works in a local mirror
(`mirror_dir`, the same path on every restart on one machine) and publishes it: `Publisher` sends
the files that changed since its last call; checkpoints go up manifest last, so a checkpoint cut
short by a crash is refused when read back. Under Ray Train the checkpoints travel through Ray's
own storage (`storage_filesystem`), the rest through the rank-0 worker's `Publisher`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from dadh_dist import checkpoint as ckpt
from dadh_dist import uris

CHECKPOINT_PREFIX = "checkpoint_"


def upload_checkpoint(local: Path, dest: str) -> None:
    """Send a verified checkpoint folder, its manifest last (a half-sent one is refused later),
    then list what the store holds: StorageError unless every file is there at its local size,
    so that nothing older is pruned on the strength of a copy that did not arrive whole."""
    sizes = {p.name: p.stat().st_size for p in local.iterdir() if p.is_file()}
    for name in sorted(sizes, key=lambda n: (n == ckpt.MANIFEST, n)):
        uris.upload_file(local / name, uris.join(dest, name))
    held = dict(uris.list_files(dest))
    for name, size in sorted(sizes.items()):
        if held.get(name) != size:
            got = "missing" if name not in held else f"{held[name]} of {size} bytes"
            raise uris.StorageError(f"{uris.redact(uris.join(dest, name))}: upload not confirmed "
                                   f"({got}); older checkpoints kept")


def checkpoints(run_uri: str, warn=None) -> list[tuple[int, str]]:
    """(t, folder name) of the remote checkpoints whose manifest reads, newest first."""
    warn = warn or ckpt.warning
    t_by_name: dict[str, int] = {}
    for rel, _ in uris.list_files(run_uri):
        name, _, rest = rel.partition("/")
        if name.startswith(CHECKPOINT_PREFIX) and rest == ckpt.MANIFEST:
            try:
                t_by_name[name] = int(json.loads(uris.read_bytes(uris.join(run_uri, rel)))["t"])
            except (TypeError, ValueError, KeyError) as e:
                warn(f"skipping checkpoint: {uris.redact(uris.join(run_uri, rel))}: unreadable "
                     f"manifest ({e})")
    return sorted(((t, n) for n, t in t_by_name.items()), reverse=True)


def fetch_checkpoint(source: str, local: Path) -> Path:
    """A verified local copy of the remote checkpoint `source` (reused when already present).

    The processes of one machine that fetch the same checkpoint (every worker resuming a run)
    take turns on a lock file next to it: the first downloads, the others find its copy. A copy
    is reused only while its manifest is the remote one: the run may have been started again
    under its URI since, with a checkpoint of the same name.
    """
    local.parent.mkdir(parents=True, exist_ok=True)
    with _locked(local.with_name(f".{local.name}.lock")):
        remote = uris.read_bytes(uris.join(source, ckpt.MANIFEST))
        if remote is not None and _manifest_bytes(local) == remote and _verifies(local):
            return local
        shutil.rmtree(local, ignore_errors=True)  # a copy cut short by an earlier crash
        tmp = local.with_name(f".incoming_{local.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            uris.download_dir(source, tmp)
            ckpt.verify(tmp)
            tmp.rename(local)
        except ckpt.CheckpointError as e:
            reason = str(e).split(": ", 1)[-1]
            raise ckpt.CheckpointError(f"{uris.redact(source)}: {reason}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
    return local


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock between the processes of one machine (flock on `path`)."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _manifest_bytes(folder: Path) -> bytes | None:
    try:
        return (folder / ckpt.MANIFEST).read_bytes()
    except OSError:
        return None


def _verifies(folder: Path) -> bool:
    try:
        ckpt.verify(folder)
        return True
    except ckpt.CheckpointError:
        return False


def latest_valid(run_uri: str, mirror: Path, warn=None) -> Path | None:
    """A local, verified copy of the newest remote checkpoint that verifies (None if none)."""
    warn = warn or ckpt.warning
    for _, name in checkpoints(run_uri, warn):
        try:
            return fetch_checkpoint(uris.join(run_uri, name), mirror / name)
        except ckpt.CheckpointError as e:
            warn(f"skipping checkpoint: {e}")
    return None


def prune_checkpoints(run_uri: str, keep: int) -> None:
    for _, name in checkpoints(run_uri)[keep:]:
        uris.delete_dir(uris.join(run_uri, name))


def mirror_dir(run_uri: str) -> Path:
    """The local working copy of a remote run: one fixed folder per run URI, machine and user,
    so a restarted worker finds what its previous attempt wrote (fault markers, TensorBoard
    files). Per user: the shared temporary directory's folder belongs to whoever made it first."""
    digest = hashlib.sha256(run_uri.encode()).hexdigest()[:16]
    name = uris.split(run_uri)[1] or "run"
    root = Path(os.environ.get("DADH_MIRROR_DIR")
                or Path(tempfile.gettempdir()) / f"dadh_dist-{os.getuid()}")
    return root / f"{name}-{digest}"


def _published(rel: str) -> bool:
    """Files of the mirror that belong in the remote run folder (checkpoints go their own way)."""
    first = rel.split("/", 1)[0]
    return not (first.startswith((CHECKPOINT_PREFIX, ".")) or rel.endswith(".tmp"))


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class Publisher:
    """Sends the mirror's changed files (TensorBoard events, metrics, config) to the run URI."""

    def __init__(self, mirror: Path, run_uri: str):
        self.mirror = mirror
        self.run_uri = run_uri
        self.sent: dict[str, tuple[int, int]] = {}
        config = mirror / "config.toml"  # sent by the driver when the run opened; it never changes
        if config.is_file():
            self.sent["config.toml"] = _stamp(config)

    def _files(self):
        """The mirror's publishable files, without walking into checkpoint folders."""
        for top in sorted(self.mirror.iterdir()):
            if not _published(top.name):
                continue
            inside = sorted(top.rglob("*")) if top.is_dir() else [top]
            yield from (p for p in inside
                        if p.is_file() and _published(p.relative_to(self.mirror).as_posix()))

    def __call__(self) -> int:
        """Upload what changed since the last call; returns the number of files sent."""
        count = 0
        for path in self._files():
            rel = path.relative_to(self.mirror).as_posix()
            stamp = _stamp(path)
            if self.sent.get(rel) == stamp:
                continue
            uris.upload_file(path, uris.join(self.run_uri, rel))
            self.sent[rel] = stamp
            count += 1
        return count
