"""A run without Ray: the same per-worker loop in this process (scaling.use_ray = false)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from dadh_dist import checkpoint as ckpt
from dadh_dist import storage, uris
from dadh_dist.config import Config
from dadh_dist.run.folders import KEEP_CHECKPOINTS, keep_checkpoint, open_run, run_uri


def data_here(cfg: Config) -> Config:
    """Where this machine is the one that reads the data (an in-process run, or Ray started
    here): `cfg` with its relative data paths made absolute (a Ray worker's working directory is
    not ours), and a missing data folder refused before any worker starts. On a cluster
    (RAY_ADDRESS) the workers read the data on their own nodes, which may see paths this one does
    not, and start in the job's working directory: `cfg` as it is, refused only for what its
    data settings alone tell (a root set for a source that reads none, none for one that does)."""
    from dadh_dist.data import check_root

    if cfg.scaling.use_ray and os.environ.get("RAY_ADDRESS"):
        check_root(cfg.data, here=False)
        return cfg
    cfg = cfg.with_absolute_paths()
    check_root(cfg.data)
    if cfg.scaling.use_ray and cfg.model.pretrained_path:
        # the workers read it: a missing or unreadable file refused before Ray starts them (in
        # one line, not after max_failures restarts of workers that fail on it)
        from dadh_dist.models import read_state_dict

        read_state_dict(Path(cfg.model.pretrained_path))
    return cfg


def worker_threads(cfg: Config) -> int:
    """torch's intra-op threads of one worker: its CPUs. In-process runs use the same count as
    a Ray worker: the thread count changes the order of float sums in convolutions, so 1 process
    and W workers give the same B only when each runs with the same number of threads. Never
    more than the CPUs this process may run on: threads beyond them only wait on each other
    (measured on 2 cores: 4 threads train the debug config 7x slower, 64 do not finish)."""
    return max(1, min(round(cfg.scaling.cpus_per_worker), usable_cpus()))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_local(cfg: Config, dataset=None, progress: bool = True) -> dict:
    """Train the run in this process, holding its lock throughout (`folders.open_run`)."""
    from dadh_dist import loop

    if dataset is None:
        cfg = data_here(cfg)
    threads = worker_threads(cfg)
    if threads < round(cfg.scaling.cpus_per_worker):
        print(f"note: scaling.cpus_per_worker = {cfg.scaling.cpus_per_worker:g} is more than the "
              f"{threads} CPU(s) this process may use: torch runs {threads} thread(s)",
              file=sys.stderr, flush=True)
    ckpt.remove_stale_staging()  # what a killed run left in the temporary directory
    uri = run_uri(cfg)
    with open_run(cfg) as (folder, resume):

        def report(metrics: dict, staged: Path | None) -> None:
            if staged is not None:
                kept = keep_checkpoint(folder, staged)
                if uri is not None:
                    storage.upload_checkpoint(kept, uris.join(uri, kept.name))
                    storage.prune_checkpoints(uri, KEEP_CHECKPOINTS)

        env = loop.WorkerEnv(report=report, resume_from=resume, run_dir=folder, dataset=dataset,
                             publish=storage.Publisher(folder, uri) if uri else None,
                             progress=progress)
        with torch_threads(threads):
            final = loop.train(cfg, env)
    final["run_dir"] = uris.redact(uri) if uri else str(folder)
    return final
