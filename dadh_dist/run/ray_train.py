"""A run on Ray Train: the `TorchTrainer` (shared by `run_ray` and each Tune trial) and the
function each of its workers runs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from dadh_dist import checkpoint as ckpt
from dadh_dist import config as config_mod
from dadh_dist import storage, uris
from dadh_dist.config import Config, ConfigError
from dadh_dist.run.folders import KEEP_CHECKPOINTS, open_run, run_name, run_uri
from dadh_dist.run.local import data_here, worker_threads
from dadh_dist.run.resume import agreed_resume
from dadh_dist.run.session import ensure_ray

# Ray Train 2.60 reads the worker-group start timeout only from this variable, which it forwards
# from the driver to its controller.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# How often Ray Train's controller collects the workers' reports (Ray's default 2 s). A worker's
# report waits for that collection, so at the default no outer iteration takes less than 2 s: the
# debug config ran 5x slower under Ray than in-process. Forwarded to the controller likewise; a
# value the user sets in the environment wins.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_S = "0.25"
# Ray Train logs every report, with all its metrics, at INFO from a logger named after the
# source file that reports (not under "ray.train"), and every checkpoint's path from its storage
# module's logger
_REPORT_LOGGER_SUFFIX = os.path.join("train", "v2", "_internal", "execution", "context.py")
_STORAGE_LOGGER = "ray.train.v2._internal.execution.storage"
# Where Ray Train keeps the names of the checkpoints it registered, in the run folder
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


class RunFailed(RuntimeError):
    """The run stopped: its workers failed, or could not be (re)started, more often than
    scaling.max_failures allows. The message is one line; the checkpoints stay for a resume."""


# What a worker raises that a restart from the last checkpoint raises again (the same data,
# config, seed and t): matched by class name along the exception's MRO, as the CLI matches its
# exit codes. A mistake in the input (exit 2), or a run that failed (exit 1).
STOP_AT_ONCE = {"ConfigError": True, "DataError": True, "NonFiniteLoss": False}


class WorkerStopped(RuntimeError):
    """A worker failed in a way no restart mends (`STOP_AT_ONCE`): Ray Train's controller
    stopped the run at once instead of restarting it scaling.max_failures times. The message
    is one line; `user`: the input is at fault (bad data or config), not the run."""

    def __init__(self, message: str, user: bool = False):
        super().__init__(message)
        self.user = user  # pickled with the instance's __dict__ (controller -> driver)


def stop_at_once(rank: int, error: BaseException) -> WorkerStopped | None:
    """The WorkerStopped a worker's exception calls for, or None (Ray's restarts go on)."""
    for cls in type(error).__mro__:
        if cls.__module__.startswith("dadh_dist") and cls.__name__ in STOP_AT_ONCE:
            return WorkerStopped(f"worker {rank}: {error_line(error)}; not restarted (a restart "
                                 "fails the same way)", user=STOP_AT_ONCE[cls.__name__])
    return None


@functools.cache
def _stop_at_once_callback():
    """The Ray Train callback that stops a run at once on a `STOP_AT_ONCE` error. Ray Train
    (2.60) restarts the group on any worker's exception, up to scaling.max_failures times; a
    ControllerError raised from a callback on Ray's controller is one its failure policy never
    retries. The class is made on first use (Ray is imported only for a Ray run) and travels to
    the controller by value."""
    from ray.train import ControllerError, UserCallback

    class StopAtOnce(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict) -> None:
            for rank, error in sorted(worker_exceptions.items()):
                stopped = stop_at_once(rank, error)
                if stopped is not None:
                    raise ControllerError(stopped)

    return StopAtOnce


def ray_worker(config: dict) -> None:
    """train_loop_per_worker for TorchTrainer: rebuild the Config and run the loop."""
    import ray.train
    import torch

    from dadh_dist import loop
    from dadh_dist.distributed import TorchCollectives

    cfg = config_mod.from_dict(config["config"])
    os.environ.update(config.get("env", {}))
    _quiet_report_log()
    ckpt.remove_stale_staging()  # what workers killed on this node before left in its temp dir
    torch.set_num_threads(worker_threads(cfg))
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        fast = cfg.train.tf32
        torch.backends.cudnn.benchmark = fast
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast
    uri = config.get("run_uri")
    run_dir = storage.mirror_dir(uri) if uri else Path(config["run_dir"])
    collectives = TorchCollectives(device if cfg.scaling.use_gpu else None)
    resume, own_copy = agreed_resume(collectives, ray.train.get_checkpoint(), run_dir, uri)

    def report(metrics: dict, staged: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(staged)) if staged else None
        ray.train.report(metrics, checkpoint=checkpoint)

    publish = None
    if uri and ray.train.get_context().get_world_rank() == 0:
        publish = storage.Publisher(run_dir, uri)
    env = loop.WorkerEnv(
        collectives=collectives,
        device=device,
        report=report,
        resume_from=resume,
        run_dir=run_dir,
        publish=publish,
        report_restored=bool(config.get("report_restored", False)),
    )
    try:
        loop.train(cfg, env)
    finally:
        if own_copy is not None:  # one full checkpoint per worker and restart otherwise
            shutil.rmtree(own_copy.parent, ignore_errors=True)


def _quiet_report_log() -> None:
    """The loop prints its own progress line: Ray's per-report INFO lines are turned down to
    warnings (found among the loggers already made, without importing Ray's internals)."""
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(_REPORT_LOGGER_SUFFIX) or name == _STORAGE_LOGGER:
            logging.getLogger(name).setLevel(logging.WARNING)


def build_trainer(cfg: Config, folder: Path, callbacks=None, report_restored: bool = False):
    """The TorchTrainer for one run (used by `run_ray` and by each Tune trial).

    Failures (docs/design.md §3): a lost worker restarts the group from the last checkpoint, at most
    scaling.max_failures times. A (re)start whose workers do not get their resources within
    scaling.start_timeout_s fails too, at most as often again (Ray counts those apart, and by
    default would retry them forever: a fixed-size run that lost a node would wait for it without
    end). With scaling.min_workers > 0 the group is elastic: Ray restarts it with as many workers
    as the cluster holds, down to min_workers, and grows it back when nodes return; each start
    splits the batch and B's rows over its own worker count.

    A worker's error that a restart would raise again (`STOP_AT_ONCE`: bad data or config, a
    non-finite loss) stops the run at once, whatever scaling.max_failures (`WorkerStopped`).

    `report_restored` (Tune trials): a resumed run reports its restored iteration once more
    (`loop.WorkerEnv.report_restored`).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    os.environ[START_TIMEOUT_ENV] = repr(float(s.start_timeout_s))
    os.environ.setdefault(POLL_ENV, POLL_S)
    uri = run_uri(cfg)
    if uri is None:
        where = {"run_dir": str(folder), "storage_path": str(folder.parent)}
    else:
        # Workers may sit on other machines: they fetch the checkpoint from the URI themselves,
        # and Ray Train stores checkpoints through the filesystem the URI names.
        fs, runs_path = uris.resolve(cfg.log.run_dir)
        where = {"run_uri": uri, "storage_path": runs_path, "storage_filesystem": fs}
    return TorchTrainer(
        train_loop_per_worker=ray_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            **{k: v for k, v in where.items() if not k.startswith("storage_")},
            # fault-injection switches for tests reach the workers wherever they run
            "env": {k: v for k, v in os.environ.items() if k.startswith("DADH_FAULT")},
            "report_restored": report_restored,
        },
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo",
                                 timeout_s=s.collective_timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(s.min_workers, s.num_workers) if s.elastic else s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name(cfg),
            storage_path=where["storage_path"],
            storage_filesystem=where.get("storage_filesystem"),
            failure_config=ray.train.FailureConfig(
                max_failures=s.max_failures, controller_failure_limit=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=[*(callbacks or []), _stop_at_once_callback()()],
        ),
    )


def check_fits(cfg: Config, resources: dict | None = None) -> None:
    """ConfigError when the workers a run needs to start (min_workers of an elastic run) ask for
    more CPUs or GPUs than `resources` (the Ray started here) holds: Ray Train would wait
    scaling.start_timeout_s for them, max_failures + 1 times, and blame a lost node."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    s = cfg.scaling
    workers = s.min_workers if s.elastic else s.num_workers
    what = "scaling.min_workers" if s.elastic else "scaling.num_workers"
    asks = {"CPU": workers * s.cpus_per_worker, "GPU": workers if s.use_gpu else 0}
    for kind, need in asks.items():
        have = float(resources.get(kind, 0))
        if need > have + 1e-9:
            per = f"scaling.cpus_per_worker = {s.cpus_per_worker:g}" if kind == "CPU" else "1"
            raise ConfigError(f"{what}: {workers} worker(s) x {per} {kind} = {need:g} {kind}, but "
                              f"the Ray started here has {have:g}; ask for fewer, or run on a "
                              "cluster (RAY_ADDRESS)")


def run_ray(cfg: Config) -> dict:
    """Train the run on Ray Train, this process its driver: it holds the run's lock throughout
    (`folders.open_run`); the workers find the checkpoint to resume from themselves."""
    import ray.train

    cfg = data_here(cfg)
    with open_run(cfg) as (folder, _):
        here = not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
        ensure_ray()
        if here:  # a Ray of this machine alone: no node will join, what it lacks never comes
            check_fits(cfg)
        try:
            fit(build_trainer(cfg, folder))
        except ray.train.TrainingFailedError as e:
            stopped = getattr(e, "controller_failure", None)
            user = isinstance(stopped, WorkerStopped) and stopped.user
            raise (ConfigError if user else RunFailed)(failure_message(cfg, folder, e)) from e
        finally:
            prune_unregistered(cfg, folder)  # never raises: the run's own outcome goes on
        uri = run_uri(cfg)
        if uri is None:
            final = json.loads((folder / "final_metrics.json").read_text())
        else:
            raw = uris.read_bytes(uris.join(uri, "final_metrics.json"))
            if raw is None:
                raise uris.StorageError(f"{uris.redact(uri)}: the run finished but its "
                                        "final_metrics.json never arrived")
            final = json.loads(raw)
    final["run_dir"] = uris.redact(uri) if uri else str(folder)
    return final


def fit(trainer):
    """`trainer.fit()`, with Ctrl-C as a KeyboardInterrupt (the CLI's "interrupted", exit 130).

    In the main thread Ray Train's fit installs its own SIGINT handler: it aborts the run (the
    controller actor exits) and then raises SystemExit (the process ended with status 1 and
    nothing said), and it stays installed after fit. The handler that was there before is put
    back, whatever happens; the run's checkpoints stay for a resume.
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit as e:  # raised by Ray's handler, the only caller of sys.exit under fit
        raise KeyboardInterrupt from e
    finally:
        if main:
            signal.signal(signal.SIGINT, before)


def prune_unregistered(cfg: Config, folder: Path) -> None:
    """After a fit, however it ended: remove the checkpoints Ray Train never registered, bar the
    run's KEEP_CHECKPOINTS newest. Ray prunes only what it registered, and a checkpoint reported
    by a group that was lost before the report reached the controller stays unregistered (the
    restart resumes from it all the same, `resume.restart_checkpoint`), so each interrupted
    attempt left one more behind. Kept: whatever Ray registered (its next fit restores those
    names), and the KEEP_CHECKPOINTS newest by t (verified, on a local run). Nothing is removed
    when Ray's record of its checkpoints does not read; a store that fails is a warning (it runs
    after the fit, whose outcome must not be hidden by it)."""
    try:
        _prune_unregistered(cfg, folder)
    except (OSError, uris.StorageError) as e:
        ckpt.warning(f"checkpoints Ray never registered were not pruned: {uris.first_line(e)}")


def _prune_unregistered(cfg: Config, folder: Path) -> None:
    uri = run_uri(cfg)
    if uri is None:
        raw = (folder / RAY_SNAPSHOT).read_bytes() if (folder / RAY_SNAPSHOT).is_file() else None
    else:
        raw = uris.read_bytes(uris.join(uri, RAY_SNAPSHOT))
    registered = _registered(raw)
    if registered is None:
        return
    if uri is None:
        names = {p.name for p in folder.glob(f"{storage.CHECKPOINT_PREFIX}*") if p.is_dir()}
        found = _newest_verified(folder, names)
    else:
        found = storage.checkpoints(uri)
        names = {rel.partition("/")[0] for rel, _ in uris.list_files(uri)
                 if rel.startswith(storage.CHECKPOINT_PREFIX) and "/" in rel}
    keep = registered | {name for _, name in found[:KEEP_CHECKPOINTS]}
    for name in sorted(names - keep):
        if uri is None:
            shutil.rmtree(folder / name, ignore_errors=True)
        else:
            uris.delete_dir(uris.join(uri, name))


def _registered(raw: bytes | None) -> set[str] | None:
    """The checkpoint folder names in Ray's snapshot (none when Ray wrote none yet); None when
    it does not read as the snapshot of Ray 2.60."""
    if raw is None:
        return set()
    try:
        results = json.loads(raw)["checkpoint_results"]
        return {r["checkpoint_dir_name"] for r in results}
    except (ValueError, KeyError, TypeError):
        return None


def _newest_verified(folder: Path, names: set[str]) -> list[tuple[int, str]]:
    """(t, name) of the KEEP_CHECKPOINTS newest of `names` that verify, newest first: by their
    manifests' t, each hashed only until enough have verified."""
    by_t = []
    for name in names:
        try:
            by_t.append((int(json.loads((folder / name / ckpt.MANIFEST).read_text())["t"]), name))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no manifest (half-written) or an unreadable one: never among the kept
    out = []
    for t, name in sorted(by_t, reverse=True):
        if len(out) == KEEP_CHECKPOINTS:
            break
        try:
            ckpt.verify(folder / name)
        except ckpt.CheckpointError:
            continue
        out.append((t, name))
    return out


def failure_message(cfg: Config, folder: Path, error: Exception) -> str:
    """One line saying why Ray Train gave up, what was tried, and where the work is."""
    s = cfg.scaling
    cause = getattr(error, "controller_failure", None)
    uri = run_uri(cfg)
    if uri is None:
        latest = ckpt.latest_valid(folder)
    else:
        found = storage.checkpoints(uri)
        latest = uris.redact(uris.join(uri, found[0][1])) if found else None
    if isinstance(cause, WorkerStopped):  # the same command would fail the same way again
        return f"run stopped: {cause}; " + (f"last checkpoint {latest}" if latest
                                            else "no checkpoint was written")
    where = (f"last checkpoint {latest}; rerun the same command to resume" if latest
             else "no checkpoint was written")
    if type(cause).__name__ in ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError"):
        size = f"{s.min_workers}..{s.num_workers}" if s.elastic else f"{s.num_workers}"
        hint = "" if s.elastic else "; set scaling.min_workers to go on with fewer workers"
        return (f"run stopped: Ray Train could not (re)start {size} worker(s) within "
                f"scaling.start_timeout_s={s.start_timeout_s:g} s, {s.max_failures + 1} time(s) "
                f"(a lost node?){hint}; {where}")
    return (f"run stopped after scaling.max_failures={s.max_failures} restart(s): "
            f"{error_line(error)}; {where}")


def error_line(error: BaseException | str) -> str:
    """Why a Ray Train run, a Tune trial or Tune itself failed, in one line: the innermost
    exception's type and message, found through Ray's wrappers (a RayTaskError's `cause`,
    Train's `worker_failures` by rank, `controller_failure`, a worker's exception carried with
    its traceback). `error` may also be a traceback's text: Tune's error.txt, which Result.error
    holds when the exception could not be unpickled."""
    where = ""
    for _ in range(8):  # the wrappers nest a few levels deep; a cycle must not hang the table
        if isinstance(error, str):
            return where + _exception_line(error)
        if isinstance(error, WorkerStopped):  # its line names the worker and the error already
            return where + str(error)
        cause = getattr(error, "cause", None)
        inner = getattr(error, "controller_failure", None)
        failures = getattr(error, "worker_failures", None)
        if failures:
            rank, error = min(failures.items(), key=lambda kv: kv[0])
            where += f"worker {rank}: "
        elif isinstance(cause, BaseException) and cause is not error:
            error = cause
        elif isinstance(inner, BaseException):
            error = inner
        else:
            break
    text = str(error).strip()
    if text.startswith("Traceback"):  # a worker's exception as Train returns it, with its
        return where + _exception_line(text)  # traceback for a message
    name, line = type(error).__name__, uris.first_line(error)
    return where + (name if line == name else f"{name}: {line}")


# a traceback's exception line: `ValueError: ...`, `dadh_dist.loop.NonFiniteLoss: ...`, unindented
_RAISED = re.compile(r"[A-Za-z_][\w.]*(\([\w.]+\))?: \S")


def _exception_line(text: str) -> str:
    """The last exception line of a traceback's text (the innermost cause, when the text holds
    several: a worker's traceback inside Train's error), else its last line."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    raised = [ln for ln in lines if _RAISED.match(ln)]
    return (raised or lines or ["(no error text)"])[-1].strip()
