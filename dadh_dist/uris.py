"""Locations given as URIs (`s3://`, `gs://`, `hdfs://`, `file://`: any filesystem pyarrow
opens): their syntax (is it a URI, join, split, the user-info masked in messages) and the few
file operations the project needs on them (read, write, list, copy a folder, delete).

Credentials come the way the filesystem expects them (for S3: the AWS environment variables or
instance role of each node), never inside the URI: a `user:secret@` part is refused before any
request, and anything before `@` is masked in messages. Query parameters such as
`?endpoint_override=host:port&scheme=http` pass through to pyarrow. What a run folder holds
behind a URI (checkpoints, the local mirror, publishing) is `storage`'s business.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

SECRET_HINT = ("give credentials through the environment (for S3: AWS_ACCESS_KEY_ID / "
               "AWS_SECRET_ACCESS_KEY or the node's role), never inside a URI")


def userinfo(uri: str) -> str:
    """The user-info of a URI ('' if none): everything between '://' and the last '@' before the
    query string, since a secret may contain '/' (a path holding '@' counts too: safe side)."""
    rest = str(uri).partition("://")[2].split("?")[0].split("#")[0]
    return rest.rpartition("@")[0]


def carries_secret(uri: str) -> bool:
    """Whether a URI holds a `user:secret@` part."""
    return ":" in userinfo(uri)


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
        raise StorageError(f"{redact(uri)}: cannot open this location ({first_line(e)})") from None
    return fs, root.rstrip("/") + "/" + s.path.strip("/")


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line (pyarrow's can carry a whole schema)."""
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
        raise StorageError(f"{redact(uri)}: read failed ({first_line(e)})") from None


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
        raise StorageError(f"{redact(uri)}: write failed ({first_line(e)})") from None


def list_files(uri: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file under `uri`, sorted; empty when it does not exist."""
    import pyarrow.fs

    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True,
                                                         allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{redact(uri)}: listing failed ({first_line(e)})") from None
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
            raise StorageError(f"{redact(join(uri, rel))}: read failed ({first_line(e)})") \
                from None
        os.replace(part, dest)
    return local


def upload_file(local: Path, uri: str) -> None:
    """Send one local file, in chunks."""
    def write(dst) -> None:
        with open(local, "rb") as src:
            _pump(src, dst)

    _send(uri, write)


def delete_file(uri: str) -> None:
    """Delete one file (nothing happens when it does not exist)."""
    fs, path = resolve(uri)
    _delete(uri, fs.delete_file, path)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    _made_dirs.difference_update({d for d in _made_dirs
                                  if d[0] == id(fs) and (d[1] + "/").startswith(path + "/")})
    _delete(uri, fs.delete_dir, path)


def _delete(uri: str, delete, path: str) -> None:
    try:
        delete(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"{redact(uri)}: delete failed ({first_line(e)})") from None
