"""Run folders: where a run lives, its saved config, and the checkpoints kept in it.

The run folder is `<log.run_dir>/<run name>`; it holds `config.toml` (the resolved config), the
checkpoints, TensorBoard events (`tb/`) and `final_metrics.json`. Re-running the same name
resumes from its newest valid checkpoint; a different config under the same name is refused
once the run has a checkpoint (before that, as after a run that stopped on bad data, there is
nothing a new config could mix with: the new config replaces the saved one, and what the old
one wrote besides, `OUTPUTS`, goes).
With log.run_dir a URI the folder here is a local mirror and the run's files live at the URI.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dadh_dist import checkpoint as ckpt
from dadh_dist import config as config_mod
from dadh_dist import storage, uris
from dadh_dist.config import Config, ConfigError

KEEP_CHECKPOINTS = 2

OUTPUTS = ("tb", "final_metrics.json")
"""What a run writes into its folder besides the config and the checkpoints."""


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


def prepare_run(cfg: Config) -> tuple[Path, Path | None]:
    """Create or reopen the run folder; returns (folder, checkpoint to resume from or None).

    For a remote run (log.run_dir a URI) the folder is the local mirror, the saved config is read
    from and written to the URI, and the checkpoint is a verified local copy of the newest remote
    one.
    """
    folder = run_folder(cfg)
    uri = run_uri(cfg)
    saved = folder / "config.toml"
    if uri is not None:
        raw = uris.read_bytes(uris.join(uri, "config.toml"))
        folder.mkdir(parents=True, exist_ok=True)
        if raw is not None:
            fetched = folder / ".remote_config.toml"
            ckpt.write_atomic(fetched, raw)
            if storage.checkpoints(uri):
                _refuse_changed(cfg, fetched, uris.redact(cfg.log.run_dir))
            elif not _same_config(cfg, fetched):
                _clear_outputs(folder, uri)
        uris.write_bytes(uris.join(uri, "config.toml"), cfg.to_toml().encode())
        ckpt.write_atomic(saved, cfg.to_toml().encode())
        return folder, newest_checkpoint(folder, uri)
    if saved.is_file():
        if any(folder.glob("checkpoint_*")):
            _refuse_changed(cfg, saved, str(folder.parent))
        elif not _same_config(cfg, saved):
            _clear_outputs(folder, None)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_atomic(saved, cfg.to_toml().encode())
    return folder, newest_checkpoint(folder, None)


def newest_checkpoint(run_dir: Path, uri: str | None) -> Path | None:
    """The run's newest checkpoint that verifies (None if none): in the run folder, or for a
    remote run (`run_dir` its mirror) a verified local copy of the remote one."""
    return storage.latest_valid(uri, run_dir) if uri else ckpt.latest_valid(run_dir)


def _refuse_changed(cfg: Config, saved: Path, where: str) -> None:
    """ConfigError unless the config saved with the run of this name in `where` (the runs'
    folder or URI) equals `cfg`, log.* aside."""
    try:
        old = config_mod.load(saved)
    except ConfigError as e:
        raise ConfigError(f"log.name: the saved config of run {run_name(cfg)!r} in {where} is "
                          f"unreadable ({e})") from None
    if old.fingerprint() != cfg.fingerprint():
        changed = old.differences(cfg) or ["scaling"]
        # the data's place is part of the run: a run resumes only on the data it trained on
        moved = (f"; if the data moved, resume at its old data.root (a link from "
                 f"{old.data.root} to the new folder does it)"
                 if old.data.root and [c.split(":")[0] for c in changed] == ["data.root"]
                 else "")
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


def keep_checkpoint(folder: Path, staged: Path) -> Path:
    """Copy a staged checkpoint into the run folder. Nothing there is deleted before the copy
    verifies: neither the older checkpoints nor one of the same t (a restart writing it again)."""
    manifest = ckpt.verify(staged)
    dest = folder / f"checkpoint_{manifest['t']:06d}"
    tmp = folder / f".incoming_{dest.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(staged, tmp)
    try:
        ckpt.verify(tmp)
    except ckpt.CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
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
