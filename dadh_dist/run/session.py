"""The one place that connects to Ray or starts it here (training runs, sweeps, serving).

Started here, Ray listens on 127.0.0.1 only and runs its dashboard: Ray Train's placement-group
cleaner polls the state API the dashboard serves (without it, it warns every few seconds), and a
Tune trial stopped early leaks its placement group without it (Ray issue 54305).
"""

from __future__ import annotations

import os

from dadh_dist.config import ConfigError


def _pin_ray_address() -> None:
    """Worker-process setup hook: point RAY_ADDRESS at this worker's own cluster.

    Train V2's placement-group cleaner finds the cluster by address autodetection, which fails
    when another Ray instance runs on the same machine ("Found multiple active Ray instances");
    a stopped trial's workers then keep their CPUs and the next trial waits forever.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = True,
               need_dashboard: bool = False):
    """Connect to the cluster (RAY_ADDRESS, as `ray job submit` sets it) or start Ray here.

    An already initialised Ray is used as it is. `need_dashboard` refuses a Ray without its
    dashboard (what Tune needs, see the module docstring). Returns Ray's context (None when Ray
    was already initialised and no dashboard check was asked for).
    """
    import ray

    if ray.is_initialized():
        if not need_dashboard:
            return None  # a second ray.init() would only log that Ray is already running
        ctx = ray.init(ignore_reinit_error=True)
    elif os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(log_to_driver=log_to_driver)
    else:
        ctx = ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                       dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                       runtime_env={"worker_process_setup_hook": _pin_ray_address})
    if need_dashboard and not ctx.dashboard_url:
        raise ConfigError("ray: this Ray runs without its dashboard; Tune needs it (a trial "
                          "stopped early otherwise leaks its workers and the sweep hangs). "
                          "Install ray[default] and start Ray with the dashboard")
    return ctx
