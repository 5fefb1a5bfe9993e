"""Which checkpoint a restarted Ray Train group resumes from (docs/design.md §3, checkpoints).

A fresh start resumes from the run folder's newest valid checkpoint (`folders.prepare_run`).
A restarted group has two candidates, the checkpoint Ray hands back and the run's own storage;
rank 0 picks the newest that verifies and every worker opens that one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from dadh_dist import checkpoint as ckpt
from dadh_dist import storage, uris
from dadh_dist.monitor import say
from dadh_dist.run.folders import newest_checkpoint


def agreed_resume(c, restored, run_dir: Path, uri: str | None) -> tuple[Path | None, Path | None]:
    """The checkpoint every worker of a (re)started group resumes from: rank 0 picks it, by
    `restart_checkpoint`, from what Ray hands back (`restored`, a ray.train.Checkpoint or None)
    and the run's storage, and broadcasts its name; each worker then opens that one. Returns
    (checkpoint or None, a private copy to delete after loading or None).

    Ray registers a checkpoint only once every worker's report of it has reached its controller,
    so after a lost worker it may hand back an older one, or none: the run's storage holds the
    newest (report returns only after the upload), and a resume never starts over while a valid
    checkpoint exists.
    """
    with (restored.as_directory() if restored is not None else contextlib.nullcontext()) as d:
        ray_copy = Path(d) if d is not None else None
        choice = None
        if c.rank == 0:
            chosen = restart_checkpoint(ray_copy, run_dir, uri)
            if chosen is not None:
                choice = ("ray" if chosen == ray_copy else "run", chosen.name)
        choice = c.broadcast_object(choice)
        if choice is None:
            return None, None
        kind, name = choice
        if kind == "ray":
            if ray_copy is None:
                raise ckpt.CheckpointError(
                    f"worker {c.rank}: rank 0 resumes from Ray's checkpoint {name} but Ray "
                    "handed this worker none")
            # as_directory may hand out a temporary copy; keep our own until it is loaded
            own = _copy_for_resume(ray_copy)
            return own, own
    if uri is None:
        return run_dir / name, None
    return storage.fetch_checkpoint(uris.join(uri, name), run_dir / name), None


def restart_checkpoint(restored: Path | None, run_dir: Path, uri: str | None) -> Path | None:
    """The newest checkpoint that verifies among `restored` (what Ray hands back, or None) and
    the run's own (in the run folder, or for a remote run a verified copy in its mirror
    `run_dir`); None when there is none (start over). On a tie the run's own copy wins: every
    worker can open it."""
    ray_t = -1
    if restored is not None:
        try:
            ray_t = ckpt.verify(restored)["t"]
        except ckpt.CheckpointError as e:
            ckpt.warning(f"{e}; looking for the run's newest valid checkpoint")
    stored = newest_checkpoint(run_dir, uri)
    # just verified by newest_checkpoint: read its t without hashing the state a second time
    stored_t = (json.loads((stored / ckpt.MANIFEST).read_text())["t"] if stored is not None
                else -1)
    if ray_t > stored_t:
        return restored
    if stored is None:
        if restored is not None or any(run_dir.glob("checkpoint_*")):  # a fresh run: silent
            ckpt.warning("no valid checkpoint; resuming from the start")
    elif 0 <= ray_t < stored_t:
        say(f"note: Ray handed back checkpoint t={ray_t}; the run holds a newer one, "
            f"{stored.name} (t={stored_t}): resuming from that")
    return stored


def _copy_for_resume(src: Path) -> Path:
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix=ckpt.staging_prefix("resume"))) / src.name
    shutil.copytree(src, dest)
    return dest
