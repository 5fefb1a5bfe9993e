"""Run folders behind a URI (`s3://`, `gs://`, `hdfs://`, `file://`: any filesystem pyarrow opens).

A run whose `log.run_dir` is a URI keeps the same layout as a local one (`config.toml`, `tb/`,
`final_metrics.json`, `checkpoint_*`), stored remotely. Whoever writes works in a local mirror
(`mirror_dir`, the same path on every restart on one machine) and publishes it: `Publisher` sends
the files that changed since its last call; checkpoints go up manifest last, so a checkpoint cut
short by a crash is refused when read back. Under Ray Train the checkpoints travel through Ray's
own storage (`storage_filesystem`), the rest through the rank-0 worker's `Publisher`.

Credentials come the way the filesystem expects them (for S3: the AWS environment variables or
instance role of each node). Query parameters such as `?endpoint_override=host:port&scheme=http`
pass through to pyarrow; anything before `@` in a URI is masked in messages (the config refuses a
`log.run_dir` that carries a secret).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from dadh_dist import checkpoint as ckpt
from dadh_dist.config import SECRET_HINT, carries_secret, userinfo

CHECKPOINT_PREFIX = "checkpoint_"


class StorageError(RuntimeError):
    """A remote read or write that failed (the message names the URI, credentials masked)."""


def is_uri(location: str) -> bool:
    return "://" in str(location)


def redact(uri: str) -> str:
    """The URI with its user-info (`config.userinfo`) masked."""
    user = userinfo(uri)
    return str(uri).replace(f"://{user}@", "://***@", 1) if user else str(uri)


def join(uri: str, *parts: str) -> str:
    """`uri`/part/... with the query string (pyarrow's filesystem options) kept at the end."""
    s = urlsplit(uri)
    path = "/".join([s.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((s.scheme, s.netloc, path, s.query, s.fragment))


def split(uri: str) -> tuple[str, str]:
    """(parent URI, last path element), the query string kept on the parent."""
    s = urlsplit(uri)
    head, _, name = s.path.rstrip("/").rpartition("/")
    return urlunsplit((s.scheme, s.netloc, head, s.query, s.fragment)), name


@functools.lru_cache(maxsize=16)
def _root(base: str):
    """(filesystem, path of the URI's root in it): built once per scheme, host/bucket and options
    (building an S3 filesystem may look up credentials)."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(base)


def resolve(uri: str):
    """(pyarrow filesystem, path inside it); one filesystem object per bucket and options."""
    if carries_secret(uri):
        raise StorageError(f"{redact(uri)}: the URI carries a secret (user:secret@); "
                           f"{SECRET_HINT}")
    s = urlsplit(uri)
    try:
        fs, root = _root(urlunsplit((s.scheme, s.netloc, "/", s.query, "")))
    except (ValueError, OSError) as e:
        raise StorageError(f"{redact(uri)}: cannot open this location ({_first_line(e)})") from None
    return fs, root.rstrip("/") + "/" + s.path.strip("/")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_bytes(uri: str) -> bytes | None:
    """The object's contents, or None when it does not exist (one request)."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"{redact(uri)}: read failed ({_first_line(e)})") from None


_made_dirs: set[tuple[int, str]] = set()


def write_bytes(uri: str, data: bytes) -> None:
    _send(uri, lambda dst: dst.write(data))


def _send(uri: str, write) -> None:
    """Open `uri` for writing (its folder made once per process) and call write(stream)."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    try:
        if (id(fs), parent) not in _made_dirs:  # object stores answer this with a request
            fs.create_dir(parent, recursive=True)
            _made_dirs.add((id(fs), parent))
        with fs.open_output_stream(path) as dst:
            write(dst)
    except OSError as e:
        raise StorageError(f"{redact(uri)}: write failed ({_first_line(e)})") from None


def list_files(uri: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file under `uri`, sorted; empty when it does not exist."""
    import pyarrow.fs

    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True,
                                                         allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{redact(uri)}: listing failed ({_first_line(e)})") from None
    root = path.rstrip("/") + "/"
    return sorted((i.path[len(root):], i.size) for i in infos
                  if i.type == pyarrow.fs.FileType.File and i.path.startswith(root))


_CHUNK = 8 << 20  # bytes per read when copying files: a checkpoint is never held whole


def _pump(src, dst) -> None:
    while chunk := src.read(_CHUNK):
        dst.write(chunk)


def download_dir(uri: str, local: Path) -> Path:
    """Copy every file under `uri` into `local` (each written atomically, in chunks)."""
    local.mkdir(parents=True, exist_ok=True)
    for rel, _ in list_files(uri):
        fs, path = resolve(join(uri, rel))
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        try:
            with fs.open_input_stream(path) as src, open(part, "wb") as dst:
                _pump(src, dst)
        except FileNotFoundError:  # deleted while we listed
            part.unlink(missing_ok=True)
            continue
        except OSError as e:
            part.unlink(missing_ok=True)
            raise StorageError(f"{redact(join(uri, rel))}: read failed ({_first_line(e)})") \
                from None
        os.replace(part, dest)
    return local


def upload_file(local: Path, uri: str) -> None:
    """Send one local file, in chunks."""
    def write(dst) -> None:
        with open(local, "rb") as src:
            _pump(src, dst)

    _send(uri, write)


def upload_checkpoint(local: Path, uri: str) -> None:
    """Send a verified checkpoint folder, its manifest last (a half-sent one is refused later),
    then list what the store holds: StorageError unless every file is there at its local size,
    so that nothing older is pruned on the strength of a copy that did not arrive whole."""
    sizes = {p.name: p.stat().st_size for p in local.iterdir() if p.is_file()}
    for name in sorted(sizes, key=lambda n: (n == ckpt.MANIFEST, n)):
        upload_file(local / name, join(uri, name))
    held = dict(list_files(uri))
    for name, size in sorted(sizes.items()):
        if held.get(name) != size:
            got = "missing" if name not in held else f"{held[name]} of {size} bytes"
            raise StorageError(f"{redact(join(uri, name))}: upload not confirmed ({got}); "
                               "older checkpoints kept")


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    _made_dirs.difference_update({d for d in _made_dirs
                                  if d[0] == id(fs) and (d[1] + "/").startswith(path + "/")})
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"{redact(uri)}: delete failed ({_first_line(e)})") from None


def checkpoints(run_uri: str, warn=None) -> list[tuple[int, str]]:
    """(t, folder name) of the remote checkpoints whose manifest reads, newest first."""
    warn = warn or _warn
    t_by_name: dict[str, int] = {}
    for rel, _ in list_files(run_uri):
        name, _, rest = rel.partition("/")
        if name.startswith(CHECKPOINT_PREFIX) and rest == ckpt.MANIFEST:
            try:
                t_by_name[name] = int(json.loads(read_bytes(join(run_uri, rel)))["t"])
            except (TypeError, ValueError, KeyError) as e:
                warn(f"skipping checkpoint: {redact(join(run_uri, rel))}: unreadable manifest "
                     f"({e})")
    return sorted(((t, n) for n, t in t_by_name.items()), reverse=True)


def fetch_checkpoint(uri: str, local: Path) -> Path:
    """A verified local copy of the remote checkpoint `uri` (reused when already present).

    The processes of one machine that fetch the same checkpoint (every worker resuming a run)
    take turns on a lock file next to it: the first downloads, the others find its copy.
    """
    local.parent.mkdir(parents=True, exist_ok=True)
    with _locked(local.with_name(f".{local.name}.lock")):
        if _verifies(local):
            return local
        shutil.rmtree(local, ignore_errors=True)  # a copy cut short by an earlier crash
        tmp = local.with_name(f".incoming_{local.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            download_dir(uri, tmp)
            ckpt.verify(tmp)
            tmp.rename(local)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"{redact(uri)}: {str(e).split(': ', 1)[-1]}") from None
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


def _verifies(folder: Path) -> bool:
    try:
        ckpt.verify(folder)
        return True
    except ckpt.CheckpointError:
        return False


def latest_valid(run_uri: str, mirror: Path, warn=None) -> Path | None:
    """A local, verified copy of the newest remote checkpoint that verifies (None if none)."""
    warn = warn or _warn
    for _, name in checkpoints(run_uri, warn):
        try:
            return fetch_checkpoint(join(run_uri, name), mirror / name)
        except ckpt.CheckpointError as e:
            warn(f"skipping checkpoint: {e}")
    return None


def prune_checkpoints(run_uri: str, keep: int) -> None:
    for _, name in checkpoints(run_uri)[keep:]:
        delete_dir(join(run_uri, name))


def mirror_dir(run_uri: str) -> Path:
    """The local working copy of a remote run: one fixed folder per run URI and machine, so a
    restarted worker finds what its previous attempt wrote (fault markers, TensorBoard files)."""
    digest = hashlib.sha256(run_uri.encode()).hexdigest()[:16]
    name = split(run_uri)[1] or "run"
    root = Path(os.environ.get("DADH_MIRROR_DIR") or Path(tempfile.gettempdir()) / "dadh_dist")
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
            upload_file(path, join(self.run_uri, rel))
            self.sent[rel] = stamp
            count += 1
        return count


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)
