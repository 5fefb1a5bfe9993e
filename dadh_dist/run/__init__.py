"""One training run from a Config: its folder and resume rule, in this process or on Ray Train.

    from dadh_dist import run
    final = run.run(cfg)            # scaling.use_ray picks run_ray or run_local

Modules: `folders` (where a run lives, its lock, saved config, kept checkpoints), `resume` (which
checkpoint a restart opens), `local` (no Ray), `ray_train` (TorchTrainer and its workers),
`session` (connecting to or starting Ray).
"""

from __future__ import annotations

from dadh_dist.config import Config
from dadh_dist.run.folders import open_run, prepare_run, run_folder, run_name, run_uri
from dadh_dist.run.local import run_local
from dadh_dist.run.ray_train import RunFailed, build_trainer, prune_unregistered, run_ray

__all__ = ["RunFailed", "build_trainer", "open_run", "prepare_run", "prune_unregistered", "run",
           "run_folder", "run_local", "run_name", "run_ray", "run_uri"]


def run(cfg: Config, progress: bool = True) -> dict:
    """Train one run to the end (or resume it) and return its final metrics. `progress`: the
    per-batch bar on this terminal (an in-process run's; Ray workers have no terminal)."""
    return run_ray(cfg) if cfg.scaling.use_ray else run_local(cfg, progress=progress)
