"""A run without Ray: the same per-worker loop in this process (scaling.use_ray = false)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dadh_dist import checkpoint as ckpt
from dadh_dist import storage, uris
from dadh_dist.config import Config
from dadh_dist.run.folders import KEEP_CHECKPOINTS, keep_checkpoint, prepare_run, run_uri


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
    return cfg


def worker_threads(cfg: Config) -> int:
    """torch's intra-op threads of one worker: its CPUs. In-process runs use the same count as
    a Ray worker: the thread count changes the order of float sums in convolutions, so 1 process
    and W workers give the same B only when each runs with the same number of threads."""
    return max(1, round(cfg.scaling.cpus_per_worker))


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
    from dadh_dist import loop

    if dataset is None:
        cfg = data_here(cfg)
    ckpt.remove_stale_staging()  # what a killed run left in the temporary directory
    folder, resume = prepare_run(cfg)
    uri = run_uri(cfg)

    def report(metrics: dict, staged: Path | None) -> None:
        if staged is not None:
            kept = keep_checkpoint(folder, staged)
            if uri is not None:
                storage.upload_checkpoint(kept, uris.join(uri, kept.name))
                storage.prune_checkpoints(uri, KEEP_CHECKPOINTS)

    env = loop.WorkerEnv(report=report, resume_from=resume, run_dir=folder, dataset=dataset,
                         publish=storage.Publisher(folder, uri) if uri else None,
                         progress=progress)
    with torch_threads(worker_threads(cfg)):
        final = loop.train(cfg, env)
    final["run_dir"] = uris.redact(uri) if uri else str(folder)
    return final
