"""The one place that connects to Ray or starts it here (training runs, sweeps, serving).

Started here, Ray listens on 127.0.0.1 only (`loopback_only`) and runs its dashboard: Ray Train's
placement-group cleaner polls the state API the dashboard serves (without it, it warns every few
seconds), and a Tune trial stopped early leaks its placement group without it (Ray issue 54305).
"""

from __future__ import annotations

import os

from dadh_dist.config import ConfigError

# Ray's single-machine mode (its default on macOS and Windows), switched on by this variable = 0
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Make the Ray this process starts next listen on 127.0.0.1 only.

    `ray.init(_node_ip_address="127.0.0.1")` alone does not do it: Ray swaps a loopback address
    for the machine's routable one (`services.resolve_ip_for_localhost`), and its servers then
    listen on that address or on every interface. In Ray's single-machine mode the node's
    address stays 127.0.0.1 and every server binds there; no other node can join, which is what
    a Ray started in-process is for. Ray reads the variable when it is imported, so the constant
    is also set on a Ray already imported; the processes it starts inherit the variable.
    """
    os.environ[SINGLE_MACHINE_ENV] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _pin_ray_address() -> None:
    """Worker-process setup hook: point RAY_ADDRESS at this worker's own cluster.

    Train V2's placement-group cleaner finds the cluster by address autodetection, which fails
    when another Ray instance runs on the same machine ("Found multiple active Ray instances");
    a stopped trial's workers then keep their CPUs and the next trial waits forever.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def plain_log_prefix(stream=None) -> None:
    """Ray colours the `(RayTrainWorker pid=…)` prefix of the workers' lines it relays; into a
    file or a pipe (a job's log, `> out`) those colours are escape codes. Off there, unless the
    user set RAY_COLOR_PREFIX (Ray reads it as it prints each line)."""
    import sys

    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (isatty is not None and isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def ensure_ray(num_cpus: int | None = None, log_to_driver: bool = True,
               need_dashboard: bool = False):
    """Connect to the cluster (RAY_ADDRESS, as `ray job submit` sets it) or start Ray here.

    An already initialised Ray is used as it is. `need_dashboard` refuses a Ray without its
    dashboard (what Tune needs, see the module docstring). Returns Ray's context (None when Ray
    was already initialised and no dashboard check was asked for).
    """
    import ray

    plain_log_prefix()
    if ray.is_initialized():
        if not need_dashboard:
            return None  # a second ray.init() would only log that Ray is already running
        ctx = ray.init(ignore_reinit_error=True)
    elif os.environ.get("RAY_ADDRESS"):
        ctx = ray.init(log_to_driver=log_to_driver)
    else:
        loopback_only()
        ctx = ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                       dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                       runtime_env={"worker_process_setup_hook": _pin_ray_address})
    if need_dashboard and not ctx.dashboard_url:
        raise ConfigError("ray: this Ray runs without its dashboard; Tune needs it (a trial "
                          "stopped early otherwise leaks its workers and the sweep hangs). "
                          "Install ray[default] and start Ray with the dashboard")
    return ctx
