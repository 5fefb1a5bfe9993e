"""Run folders: where a run lives, its saved config, and the checkpoints kept in it.

The run folder is `<log.run_dir>/<run name>`; it holds `config.toml` (the resolved config), the
checkpoints, TensorBoard events (`tb/`) and `final_metrics.json`. Re-running the same name
resumes from its newest valid checkpoint; a different config under the same name is refused
once the run has a checkpoint (before that, as after a run that stopped on bad data, there is
nothing a new config could mix with: the new config replaces the saved one, and what the old
one wrote besides, `OUTPUTS`, goes).
With log.run_dir a URI the folder here is a local mirror and the run's files live at the URI.

One process at a time drives a run: `open_run` holds the run's lock (`LOCK`) from before
`prepare_run` touches anything until the run ends; a second driver is refused in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from dadh_dist import checkpoint as ckpt
from dadh_dist import config as config_mod
from dadh_dist import storage, uris
from dadh_dist.config import Config, ConfigError
from dadh_dist.monitor import say

KEEP_CHECKPOINTS = 2

DATA_RECORD = "data.json"
"""The identity of the data under data.root (`data.identity`) as the run last started on it: a
run resumes at another data.root only on the same files."""

OUTPUTS = ("tb", "final_metrics.json", DATA_RECORD)
"""What a run writes into its folder besides the config and the checkpoints."""

LOCK = ".run.lock"
"""The file in the run folder (a remote run's mirror) whose flock the run's driver holds; a dot
name, so nothing that lists the folder takes it for a checkpoint or an output to publish."""

TRIAL_LOCK_WAIT_S = 30.0
"""How long a Tune trial waits for its run's lock: a resumed sweep may start a trial again while
the process of its interrupted attempt is still being stopped (Tune kills it after 5 s)."""


def run_name(cfg: Config) -> str:
    if cfg.log.name:
        return cfg.log.name
    return f"{cfg.data.source}_{cfg.objective.bits}bit_{cfg.fingerprint()[:8]}"


def run_uri(cfg: Config) -> str | None:
    """The run's remote location when log.run_dir is a URI (None for a local run folder)."""
    if not uris.is_uri(cfg.log.run_dir):
        return None
    return uris.join(cfg.log.run_dir, run_name(cfg))


def run_folder(cfg: Config) -> Path:
    """Where this process reads and writes the run: the run folder, or a remote run's mirror."""
    uri = run_uri(cfg)
    if uri is not None:
        return storage.mirror_dir(uri)
    return Path(cfg.log.run_dir).expanduser().resolve() / run_name(cfg)


@contextlib.contextmanager
def open_run(cfg: Config, wait_s: float = 0.0):
    """Drive the run for the block: take its lock (`run_lock`), then `prepare_run`; yields
    (folder, checkpoint to resume from or None). A run folder that cannot be made or written is
    one ConfigError naming it."""
    with run_lock(cfg, wait_s) as folder:
        try:
            prepared = prepare_run(cfg)
        except OSError as e:
            raise _unwritable(folder, e) from None
        yield prepared


@contextlib.contextmanager
def run_lock(cfg: Config, wait_s: float = 0.0):
    """Hold the run's lock for the block (yields the run folder, made if missing): a second
    process that asks for it while it is held waits `wait_s`, then is refused with a ConfigError
    naming the run, and nothing of the run it would have driven is touched.

    An exclusive flock: the kernel releases it when the holder's process ends, however it ends,
    so no stale lock ever blocks a restart. It guards this machine only: for a run URI the lock
    is on this machine's mirror, and a driver of the same URI on another machine is not seen.
    """
    import fcntl

    folder = run_folder(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / LOCK, "a+")
    except OSError as e:
        raise _unwritable(folder, e) from None
    with fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _held(cfg, folder, fh) from None
                time.sleep(0.2)
        with contextlib.suppress(OSError):  # the holder's pid is only for the refusal's line
            fh.truncate(0)
            fh.write(f"{os.getpid()}\n")
            fh.flush()
        try:
            yield folder
        finally:
            with contextlib.suppress(OSError):
                fh.truncate(0)


def _held(cfg: Config, folder: Path, fh) -> ConfigError:
    fh.seek(0)
    pid = fh.read().strip()
    uri = run_uri(cfg)
    where = f"{uris.redact(uri)} (its mirror here: {folder})" if uri else str(folder)
    return ConfigError(
        f"log.name: run {run_name(cfg)!r} in {where} is being trained by another process on "
        f"this machine{f' (pid {pid})' if pid.isdigit() else ''}; wait for it to end or stop "
        "it, or use another log.name")


def _unwritable(folder: Path, e: OSError) -> ConfigError:
    return ConfigError(f"log.run_dir: cannot write the run folder {folder} ({_reason(e)})")


def _reason(e: OSError) -> str:
    """What went wrong, in a few words: the error's strerror, or for shutil.copytree's Error (a
    list of (source, destination, why)) the first file's."""
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        why = str(e.args[0][0][-1])
        return re.sub(r"^\[Errno \d+\] ([^:]*).*$", r"\1", why)
    return e.strerror or uris.first_line(e)


def prepare_run(cfg: Config) -> tuple[Path, Path | None]:
    """Create or reopen the run folder; returns (folder, checkpoint to resume from or None).

    For a remote run (log.run_dir a URI) the folder is the local mirror, the saved config is read
    from and written to the URI, and the checkpoint is a verified local copy of the newest remote
    one. Either way the data's identity is recorded (`DATA_RECORD`) where this machine sees the
    data.
    """
    # not at module level: the data package is heavy, and the tools' --help imports this one
    from dadh_dist.data.identity import identity

    folder = run_folder(cfg)
    uri = run_uri(cfg)
    saved = folder / "config.toml"
    found = identity(cfg.data)
    if uri is not None:
        raw = uris.read_bytes(uris.join(uri, "config.toml"))
        folder.mkdir(parents=True, exist_ok=True)
        if raw is not None:
            fetched = folder / ".remote_config.toml"
            ckpt.write_atomic(fetched, raw)
            if storage.checkpoints(uri):
                _refuse_changed(cfg, fetched, uris.redact(cfg.log.run_dir),
                                _read_record(uris.read_bytes(uris.join(uri, DATA_RECORD))), found)
            elif not _same_config(cfg, fetched):
                _clear_outputs(folder, uri)
        uris.write_bytes(uris.join(uri, "config.toml"), cfg.to_toml().encode())
        ckpt.write_atomic(saved, cfg.to_toml().encode())
        if found is not None:
            uris.write_bytes(uris.join(uri, DATA_RECORD), _record(cfg, found))
        return folder, newest_checkpoint(folder, uri)
    record = folder / DATA_RECORD
    if saved.is_file():
        if any(folder.glob("checkpoint_*")):
            _refuse_changed(cfg, saved, str(folder.parent),
                            _read_record(record.read_bytes() if record.is_file() else None), found)
        elif not _same_config(cfg, saved):
            _clear_outputs(folder, None)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_atomic(saved, cfg.to_toml().encode())
    if found is not None:
        ckpt.write_atomic(record, _record(cfg, found))
    return folder, newest_checkpoint(folder, None)


def _record(cfg: Config, found: dict) -> bytes:
    return json.dumps({"root": cfg.data.root, "files": found}, indent=1).encode()


def _read_record(raw: bytes | None) -> dict | None:
    """The files of a DATA_RECORD (None when there is none, or it is unreadable: a run from
    before records were kept, or a machine that did not see the data)."""
    try:
        files = json.loads(raw)["files"] if raw is not None else None
    except (ValueError, TypeError, KeyError):
        return None
    return files if isinstance(files, dict) else None


def newest_checkpoint(run_dir: Path, uri: str | None) -> Path | None:
    """The run's newest checkpoint that verifies (None if none): in the run folder, or for a
    remote run (`run_dir` its mirror) a verified local copy of the remote one."""
    return storage.latest_valid(uri, run_dir) if uri else ckpt.latest_valid(run_dir)


def _refuse_changed(cfg: Config, saved: Path, where: str, recorded: dict | None = None,
                    found: dict | None = None) -> None:
    """ConfigError unless the config saved with the run of this name in `where` (the runs'
    folder or URI) equals `cfg`, log.* aside. A data.root that is all that changed passes when
    the files there are those the run recorded (`recorded`; `found`: the new root's)."""
    from dadh_dist.data.identity import differing

    try:
        old = config_mod.load(saved)
    except ConfigError as e:
        raise ConfigError(f"log.name: the saved config of run {run_name(cfg)!r} in {where} is "
                          f"unreadable ({e})") from None
    if old.fingerprint() == cfg.fingerprint():
        odd = differing(recorded, found) if recorded is not None and found is not None else []
        if odd:
            say(f"warning: data.root's files changed since the run last started "
                f"({', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''}): resuming on them as "
                "they are now")
        return
    changed = old.differences(cfg) or ["scaling"]
    moved = ""
    if old.data.root and [c.split(":")[0] for c in changed] == ["data.root"]:
        # the data's place is part of the run: a run resumes only on the data it trained on
        if recorded is not None and not differing(recorded, found):
            say(f"note: data.root moved from {old.data.root} to {cfg.data.root}; its "
                f"{len(found)} file(s) are those the run recorded: resuming on them")
            return
        if recorded is None or found is None:  # a run from before records, or data not here
            moved = (f"; if the data moved, resume at its old data.root (a link from "
                     f"{old.data.root} to the new folder does it)")
        else:
            odd = differing(recorded, found)
            moved = (f"; the files at the new data.root differ from those the run recorded "
                     f"({', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''})")
    raise ConfigError(
        f"log.name: run {run_name(cfg)!r} already exists in {where} with a "
        f"different config ({', '.join(changed[:4])}); use another log.name or the same "
        f"config{moved}"
    )


def _same_config(cfg: Config, saved: Path) -> bool:
    """Whether the config saved in `saved` equals `cfg`, log.* aside (an unreadable one does
    not)."""
    try:
        return config_mod.load(saved).fingerprint() == cfg.fingerprint()
    except ConfigError:
        return False


def _clear_outputs(folder: Path, uri: str | None) -> None:
    """Remove the `OUTPUTS` of the config a new one replaces: here and at a remote run's URI."""
    for name in OUTPUTS:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if uri is not None:
        uris.delete_dir(uris.join(uri, "tb"))
        uris.delete_file(uris.join(uri, "final_metrics.json"))
        uris.delete_file(uris.join(uri, DATA_RECORD))


def keep_checkpoint(folder: Path, staged: Path) -> Path:
    """Copy a staged checkpoint into the run folder. Nothing there is deleted before the copy
    verifies: neither the older checkpoints nor one of the same t (a restart writing it again).
    A copy that fails (a full disk) or is interrupted leaves nothing behind; the failure is a
    one-line StorageError."""
    manifest = ckpt.verify(staged)
    dest = folder / f"checkpoint_{manifest['t']:06d}"
    tmp = folder / f".incoming_{dest.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(staged, tmp)
        ckpt.verify(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a copy cut short keeps no space
        if isinstance(e, OSError):
            raise uris.StorageError(
                f"{folder}: {dest.name} could not be written ({_reason(e)}); the run's earlier "
                "checkpoints are kept: rerun the same command to resume once there is room"
            ) from None
        raise
    # a checkpoint of the same t is set aside under a name latest_valid still finds, should we
    # die before the swap ends, and removed after it
    old = dest.with_name(f"{dest.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    older = sorted(p for p in folder.glob("checkpoint_*") if p.is_dir() and p != dest)
    for p in older[: max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return dest
