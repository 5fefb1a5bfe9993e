"""One training run from a Config: the run folder, resume, and the Ray Train `TorchTrainer`.

Shared by `jobs/train.py` and the Tune trial function. The run folder is
`<log.run_dir>/<run name>`; it holds `config.toml` (the resolved config), the checkpoints,
TensorBoard events (`tb/`) and `final_metrics.json`. Re-running the same name resumes from its
newest valid checkpoint; a different config under the same name is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from dadh_dist import checkpoint as ckpt
from dadh_dist import config as config_mod
from dadh_dist import storage
from dadh_dist.config import Config, ConfigError

KEEP_CHECKPOINTS = 2
# Ray Train 2.60 reads the worker-group start timeout only from this variable, which it forwards
# from the driver to its controller.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class RunFailed(RuntimeError):
    """The run stopped: its workers failed, or could not be (re)started, more often than
    scaling.max_failures allows. The message is one line; the checkpoints stay for a resume."""


def run_name(cfg: Config) -> str:
    if cfg.log.name:
        return cfg.log.name
    return f"{cfg.data.source}_{cfg.objective.bits}bit_{cfg.fingerprint()[:8]}"


def run_uri(cfg: Config) -> str | None:
    """The run's remote location when log.run_dir is a URI (None for a local run folder)."""
    if not storage.is_uri(cfg.log.run_dir):
        return None
    return storage.join(cfg.log.run_dir, run_name(cfg))


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
        raw = storage.read_bytes(storage.join(uri, "config.toml"))
        folder.mkdir(parents=True, exist_ok=True)
        if raw is not None:
            fetched = folder / ".remote_config.toml"
            ckpt.write_atomic(fetched, raw)
            _refuse_changed(cfg, fetched, storage.redact(cfg.log.run_dir))
        storage.write_bytes(storage.join(uri, "config.toml"), cfg.to_toml().encode())
        ckpt.write_atomic(saved, cfg.to_toml().encode())
        return folder, newest_checkpoint(folder, uri)
    if saved.is_file():
        _refuse_changed(cfg, saved, str(folder.parent))
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
        changed = old.differences(cfg)[:4] or ["scaling"]
        raise ConfigError(
            f"log.name: run {run_name(cfg)!r} already exists in {where} with a "
            f"different config ({', '.join(changed)}); use another log.name or the same config"
        )


# ---------------------------------------------------------------------------------------------
# Without Ray: the same loop in this process.


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


def run_local(cfg: Config, dataset=None) -> dict:
    from dadh_dist import loop

    if dataset is None:
        check_data_here(cfg)
    folder, resume = prepare_run(cfg)
    uri = run_uri(cfg)

    def report(metrics: dict, staged: Path | None) -> None:
        if staged is not None:
            kept = keep_checkpoint(folder, staged)
            if uri is not None:
                storage.upload_checkpoint(kept, storage.join(uri, kept.name))
                storage.prune_checkpoints(uri, KEEP_CHECKPOINTS)

    env = loop.WorkerEnv(report=report, resume_from=resume, run_dir=folder, dataset=dataset,
                         publish=storage.Publisher(folder, uri) if uri else None)
    with torch_threads(worker_threads(cfg)):
        final = loop.train(cfg, env)
    final["run_dir"] = storage.redact(uri) if uri else str(folder)
    return final


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


# ---------------------------------------------------------------------------------------------
# Ray Train


def ray_worker(config: dict) -> None:
    """train_loop_per_worker for TorchTrainer: rebuild the Config and run the loop."""
    import ray.train
    import torch

    from dadh_dist import loop
    from dadh_dist.distributed import TorchCollectives

    cfg = config_mod.from_dict(config["config"])
    os.environ.update(config.get("env", {}))
    _quiet_report_log()
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
    )
    try:
        loop.train(cfg, env)
    finally:
        if own_copy is not None:  # one full checkpoint per worker and restart otherwise
            shutil.rmtree(own_copy.parent, ignore_errors=True)


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
    return storage.fetch_checkpoint(storage.join(uri, name), run_dir / name), None


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
            print(f"warning: {e}; looking for the run's newest valid checkpoint", flush=True)
    stored = newest_checkpoint(run_dir, uri)
    # just verified by newest_checkpoint: read its t without hashing the state a second time
    stored_t = (json.loads((stored / ckpt.MANIFEST).read_text())["t"] if stored is not None
                else -1)
    if ray_t > stored_t:
        return restored
    if stored is None:
        print("warning: no valid checkpoint; resuming from the start", flush=True)
    elif 0 <= ray_t < stored_t:
        print(f"note: Ray handed back checkpoint t={ray_t}; the run holds a newer one, "
              f"{stored.name} (t={stored_t}): resuming from that", flush=True)
    return stored


def _quiet_report_log() -> None:
    """Ray Train logs every report, with all its metrics, at INFO from a logger named after its
    source file (not under "ray.train"); the loop prints its own progress line instead."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _copy_for_resume(src: Path) -> Path:
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="dadh_resume_")) / src.name
    shutil.copytree(src, dest)
    return dest


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster (RAY_ADDRESS, as set by `ray job submit`) or start Ray here."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # With the dashboard (on loopback): Ray Train's placement-group cleaner polls the state
        # API it serves, and without it warns every few seconds for the whole run.
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=True)


def build_trainer(cfg: Config, folder: Path, callbacks=None):
    """The TorchTrainer for one run (used by `run_ray` and by each Tune trial).

    Failures (DESIGN §3): a lost worker restarts the group from the last checkpoint, at most
    scaling.max_failures times. A (re)start whose workers do not get their resources within
    scaling.start_timeout_s fails too, at most as often again (Ray counts those apart, and by
    default would retry them forever: a fixed-size run that lost a node would wait for it without
    end). With scaling.min_workers > 0 the group is elastic: Ray restarts it with as many workers
    as the cluster holds, down to min_workers, and grows it back when nodes return; each start
    splits the batch and B's rows over its own worker count.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    os.environ[START_TIMEOUT_ENV] = repr(float(s.start_timeout_s))
    uri = run_uri(cfg)
    if uri is None:
        where = {"run_dir": str(folder), "storage_path": str(folder.parent)}
    else:
        # Workers may sit on other machines: they fetch the checkpoint from the URI themselves,
        # and Ray Train stores checkpoints through the filesystem the URI names.
        fs, runs_path = storage.resolve(cfg.log.run_dir)
        where = {"run_uri": uri, "storage_path": runs_path, "storage_filesystem": fs}
    return TorchTrainer(
        train_loop_per_worker=ray_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            **{k: v for k, v in where.items() if not k.startswith("storage_")},
            # fault-injection switches for tests reach the workers wherever they run
            "env": {k: v for k, v in os.environ.items() if k.startswith("DADH_FAULT")},
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
            callbacks=callbacks,
        ),
    )


def check_data_here(cfg: Config) -> None:
    """Refuse a missing data folder before any worker starts, where this machine is the one that
    reads the data (an in-process run, or Ray started here). On a cluster (RAY_ADDRESS) the
    workers read it on their own nodes, which may see paths this one does not."""
    from dadh_dist.data import check_root

    if not cfg.scaling.use_ray or not os.environ.get("RAY_ADDRESS"):
        check_root(cfg.data)


def run_ray(cfg: Config) -> dict:
    import ray.train

    check_data_here(cfg)
    folder, _ = prepare_run(cfg)  # the workers find the checkpoint to resume from themselves
    ensure_ray()
    try:
        build_trainer(cfg, folder).fit()
    except ray.train.TrainingFailedError as e:
        raise RunFailed(failure_message(cfg, folder, e)) from e
    uri = run_uri(cfg)
    if uri is None:
        final = json.loads((folder / "final_metrics.json").read_text())
    else:
        raw = storage.read_bytes(storage.join(uri, "final_metrics.json"))
        if raw is None:
            raise storage.StorageError(f"{storage.redact(uri)}: the run finished but its "
                                       "final_metrics.json never arrived")
        final = json.loads(raw)
    final["run_dir"] = storage.redact(uri) if uri else str(folder)
    return final


def failure_message(cfg: Config, folder: Path, error: Exception) -> str:
    """One line saying why Ray Train gave up, what was tried, and where the work is."""
    s = cfg.scaling
    cause = getattr(error, "controller_failure", None)
    uri = run_uri(cfg)
    if uri is None:
        latest = ckpt.latest_valid(folder)
    else:
        found = storage.checkpoints(uri)
        latest = storage.redact(storage.join(uri, found[0][1])) if found else None
    where = (f"last checkpoint {latest}; rerun the same command to resume" if latest
             else "no checkpoint was written")
    if type(cause).__name__ in ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError"):
        size = f"{s.min_workers}..{s.num_workers}" if s.elastic else f"{s.num_workers}"
        hint = "" if s.elastic else "; set scaling.min_workers to go on with fewer workers"
        return (f"run stopped: Ray Train could not (re)start {size} worker(s) within "
                f"scaling.start_timeout_s={s.start_timeout_s:g} s, {s.max_failures + 1} time(s) "
                f"(a lost node?){hint}; {where}")
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, first = min(failures.items(), key=lambda kv: kv[0])
        what = f"worker {rank}: {_one_line(first)}"
    else:
        what = _one_line(cause if cause is not None else error)
    return (f"run stopped after scaling.max_failures={s.max_failures} restart(s): {what}; "
            f"{where}")


def _one_line(error: BaseException) -> str:
    """A traceback's last line (the exception), or a message's first line."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def run(cfg: Config) -> dict:
    return run_ray(cfg) if cfg.scaling.use_ray else run_local(cfg)
