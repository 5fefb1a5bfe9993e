"""What each trial is given (docs/design.md §4): trial concurrency and per-worker CPUs from
the cluster.

Tune reserves only the trial function's bundle; each trial's TorchTrainer then asks for its
workers. Launching more trials than the workers fit would leave them waiting forever, so
concurrency is capped here from the cluster's totals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dadh_dist.config import ConfigError
from dadh_dist.sweep.spec import Sweep


@dataclass
class Resources:
    trial_cpus: float
    """CPUs of the trial function itself (it only waits on its TorchTrainer)."""
    cpus_per_worker: float
    """CPUs of each training worker (the base config's, shrunk if one trial would not fit)."""
    concurrency: int
    """Trials run at the same time."""
    gpus_per_trial: int


def plan_resources(s: Sweep, cluster: dict) -> Resources:
    """Trial concurrency and per-worker CPUs from the cluster's resources (as
    `ray.cluster_resources()` gives them)."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    sc = s.base.scaling
    w, cpw, tc = sc.num_workers, sc.cpus_per_worker, s.trial_cpus
    if tc + w * cpw > cpus + 1e-9:
        cpw = math.floor(round((cpus - tc) / w, 6) * 100) / 100
        if cpw < 0.01:
            raise ConfigError(f"scaling.num_workers: {w} worker(s) and the trial function "
                              f"({tc} CPU) do not fit on the cluster's {cpus:g} CPUs")
    concurrency = max(1, int((cpus + 1e-9) // (tc + w * cpw)))
    if sc.use_gpu:
        if gpus < w:
            raise ConfigError(f"scaling.use_gpu: each trial needs {w} GPU(s), the cluster has "
                              f"{gpus:g}")
        concurrency = min(concurrency, int(gpus // w))
    if s.max_concurrent_trials:
        concurrency = min(concurrency, s.max_concurrent_trials)
    return Resources(tc, cpw, concurrency, w if sc.use_gpu else 0)
