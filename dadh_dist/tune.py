"""Ray Tune sweeps over any dotted config key (DESIGN §4).

A sweep file (TOML) names a base training config, the base overrides, a search space over dotted
keys, the number of trials, the validation metric, the scheduler (ASHA over outer iterations by
default) and the search algorithm (random, or Optuna). See `configs/sweep_debug.toml`.

Three levels are kept apart, as in Ray's Train+Tune examples: `loop.train` runs on each worker,
`run.build_trainer` builds one run's `TorchTrainer`, and this module runs the sweep. Each trial
is a function that resolves its config with the same override code as the CLI (`config.load`),
then builds and fits a `TorchTrainer` whose `TuneReportCallback` forwards rank 0's reports to Tune
(Ray ≥ 2.50, Train V2: `Tuner(TorchTrainer)` no longer works).

Layout of `<log.run_dir>/<sweep name>/`:
  sweep.json          what the sweep is (a rerun with a different sweep is refused) + resources
  tune/               Tune's experiment state; a rerun restores it and finishes the sweep
  trial_<id>/         each trial's run folder (config.toml, checkpoints, tb/, final_metrics.json)
  hparams/            TensorBoard hparams: every trial's parameters and validation mAP
  best_config.toml    the best trial's resolved config, runnable with jobs/train.py --config
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dadh_dist import config as config_mod
from dadh_dist import run
from dadh_dist.config import Config, ConfigError
from dadh_dist.run.local import check_data_here
from dadh_dist.run.session import ensure_ray

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("loguniform", "uniform", "choice", "grid")
SCHEDULERS = ("asha", "none")
SEARCHES = ("random", "optuna")
MODES = ("max", "min")
# Keys the sweep sets itself: where each trial runs, and the resources it is given.
RESERVED_SECTIONS = ("log", "scaling")
# Paths a trial must see as the user meant them: Tune runs each trial in its own directory.
PATH_KEYS = ("data.root", "model.pretrained_path")


class SweepFailed(RuntimeError):
    """No trial produced the metric (every trial failed); the message says where to look."""


@dataclass
class Dist:
    """One search-space entry: a distribution over the values of one dotted config key."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    values: list = field(default_factory=list)

    def representatives(self) -> list:
        """Values that stand for the whole range when checking the key up front."""
        return list(self.values) if self.kind in ("choice", "grid") else [self.low, self.high]

    def contains(self, value) -> bool:
        if self.kind in ("choice", "grid"):
            return value in self.values
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def to_tune(self):
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))


@dataclass
class Sweep:
    """A parsed, validated sweep file."""

    path: Path
    name: str
    base_path: Path
    base: Config
    """The base config with the sweep's overrides (and the command line's) applied."""
    space: dict[str, Dist]
    num_samples: int = 8
    metric: str = "val/map_all_fg"
    mode: str = "max"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    search: str = "random"
    max_concurrent_trials: int = 0
    trial_cpus: float = 0.2
    seed: int = 0
    include_base: bool = False
    """The first trial takes the base config's own values: the default the sweep must beat,
    measured under the same budget."""
    max_t: int = 1
    """Most outer iterations any trial runs (ASHA's horizon)."""

    @property
    def folder(self) -> Path:
        return Path(self.base.log.run_dir).expanduser().resolve() / self.name

    @property
    def expected_trials(self) -> int:
        grids = [len(d.values) for d in self.space.values() if d.kind == "grid"]
        return self.num_samples * math.prod(grids)

    def identity(self) -> dict:
        """Everything that defines the sweep's trials (resources and log excluded)."""
        return {
            "base": {k: v for k, v in _flat_config(self.base).items()
                     if not k.startswith("log.") and k != "scaling.cpus_per_worker"},
            "space": {k: dataclasses.asdict(d) for k, d in sorted(self.space.items())},
            "num_samples": self.num_samples, "metric": self.metric, "mode": self.mode,
            "scheduler": self.scheduler, "grace_period": self.grace_period,
            "reduction_factor": self.reduction_factor, "search": self.search, "seed": self.seed,
            # only when set, so that the records of sweeps made before the option still match
            **({"include_base": True} if self.include_base else {}),
        }

    def base_point(self) -> dict:
        """The base config's values of the swept keys."""
        flat = _flat_config(self.base)
        return {k: flat[k] for k in self.space}


# ---------------------------------------------------------------------------------------------
# The sweep file

# the sweep file's keys and their types (tables: overrides, space, asha)
_TOP = {
    "name": str, "base": str, "num_samples": int, "metric": str, "mode": str, "scheduler": str,
    "search": str, "max_concurrent_trials": int, "trial_cpus": float, "seed": int,
    "include_base": bool, "overrides": dict, "space": dict, "asha": dict,
}
_ASHA = {"grace_period": int, "reduction_factor": float}
_DIST = {"kind": str, "low": float, "high": float, "values": list}


def _check_type(key: str, value, typ):
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }[typ](value)
    if not ok:
        name = "table" if typ is dict else typ.__name__
        raise ConfigError(f"{key}: expected {name}, got {value!r}")
    return float(value) if typ is float else value


def _unknown(key: str, name: str, known) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}; known: {', '.join(known)}")


def _flatten(table: dict, prefix: str, leaf=lambda v: False) -> dict:
    """TOML tables to dotted keys: `[overrides.train] outer_iters = 3` and
    `"train.outer_iters" = 3` both give `train.outer_iters`."""
    out = {}
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and not leaf(v):
            out.update(_flatten(v, key, leaf))
        else:
            out[key] = v
    return out


def _flat_config(cfg: Config) -> dict:
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}


def _find_base(raw: str, sweep_path: Path) -> Path:
    """The base config: absolute, next to the sweep file, under the working directory, or
    under the repository root, in that order."""
    p = Path(raw).expanduser()
    candidates = [p] if p.is_absolute() else [sweep_path.parent / p, Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"base: config file {raw!r} not found next to {sweep_path}, in the "
                      f"working directory or in {REPO_ROOT}")


def _parse_dist(key: str, spec) -> Dist:
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected a table such as {{kind = \"loguniform\", low = 10, "
                          f"high = 1000}}, got {spec!r}")
    for k in spec:
        if k not in _DIST:
            raise _unknown(f"{key}.{k}", k, _DIST)
    if "kind" not in spec:
        raise ConfigError(f"{key}.kind: missing; one of {', '.join(KINDS)}")
    kind = _check_type(f"{key}.kind", spec["kind"], str)
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    if kind in ("choice", "grid"):
        extra = sorted(set(spec) - {"kind", "values"})
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: not used by kind = {kind!r} (give values)")
        values = _check_type(f"{key}.values", spec.get("values"), list)
        if not values:
            raise ConfigError(f"{key}.values: give at least one value")
        return Dist(kind, values=values)
    extra = sorted(set(spec) - {"kind", "low", "high"})
    if extra:
        raise ConfigError(f"{key}.{extra[0]}: not used by kind = {kind!r} (give low and high)")
    for bound in ("low", "high"):
        if bound not in spec:
            raise ConfigError(f"{key}.{bound}: missing")
    low = _check_type(f"{key}.low", spec["low"], float)
    high = _check_type(f"{key}.high", spec["high"], float)
    if not high > low:
        raise ConfigError(f"{key}.high: must be > low ({low}), got {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{key}.low: loguniform needs low > 0, got {low}")
    return Dist(kind, low=low, high=high)


def trial_config(base: Config, params: dict, folder: Path | str, trial: str,
                 cpus_per_worker: float | None = None) -> Config:
    """One trial's config: the base plus the trial's parameters, through `config.load`'s
    override code (the CLI's), placed in `<folder>/<trial>`."""
    overrides = {**_flat_config(base), **params, "log.run_dir": str(folder), "log.name": trial}
    if cpus_per_worker is not None:
        overrides["scaling.cpus_per_worker"] = cpus_per_worker
    return config_mod.load(None, overrides)


def _reported_metrics(cfg: Config) -> list[str]:
    out = []
    for enc in cfg.eval.encoders:
        out.append(f"val/map_all_{enc}")
        if cfg.eval.topk:
            out.append(f"val/map_at_{cfg.eval.topk}_{enc}")
        out.append(f"val/p_at_{cfg.eval.precision_at}_{enc}")
    return out


def load_sweep(path: str | Path, overrides: dict | list[str] | None = None,
               num_samples: int | None = None, name: str | None = None) -> Sweep:
    """Parse and check a sweep file; `overrides` (dotted `key=value`) apply to the base config
    after the file's own. Every search-space key is tried against the base config here, so a
    bad key or type fails before any trial starts."""
    p = Path(path)
    raw = config_mod.read_toml(p, "sweep file")
    try:
        return _build_sweep(p.resolve(), raw, overrides or [], num_samples, name)
    except ConfigError as e:
        raise ConfigError(f"{p.name}: {e}") from None


def _build_sweep(path: Path, raw: dict, cli_overrides: list[str], num_samples, name) -> Sweep:
    for k, v in raw.items():
        if k not in _TOP:
            raise _unknown(k, k, _TOP)
        _check_type(k, v, _TOP[k])
    if "base" not in raw:
        raise ConfigError("base: missing; name the training config to sweep from")
    for k in raw.get("asha", {}):
        if k not in _ASHA:
            raise _unknown(f"asha.{k}", k, _ASHA)
    asha = {k: _check_type(f"asha.{k}", v, _ASHA[k]) for k, v in raw.get("asha", {}).items()}
    base_path = _find_base(raw["base"], path)
    file_overrides = _flatten(raw.get("overrides", {}), "")
    try:
        base = config_mod.load(base_path, file_overrides)
        if cli_overrides:
            base = base.with_overrides(cli_overrides)
    except ConfigError as e:
        raise ConfigError(f"overrides: {e}") from None
    space = {
        key: _parse_dist(f"space.{key}", spec)
        for key, spec in _flatten(raw.get("space", {}), "", leaf=_is_dist).items()
    }
    if not space:
        raise ConfigError("space: empty; give at least one key, e.g. "
                          '[space."objective.gamma"] kind = "loguniform" low = 10 high = 1000')
    s = Sweep(path=path, name=name or raw.get("name") or path.stem, base_path=base_path,
              base=base, space=space)
    for k in ("num_samples", "metric", "mode", "scheduler", "search", "max_concurrent_trials",
              "trial_cpus", "seed", "include_base"):
        if k in raw:
            setattr(s, k, raw[k] if _TOP[k] is not float else float(raw[k]))
    s.grace_period = asha.get("grace_period", s.grace_period)
    s.reduction_factor = asha.get("reduction_factor", s.reduction_factor)
    if num_samples is not None:
        s.num_samples = num_samples
    _validate(s)
    return s


def _is_dist(table: dict) -> bool:
    return "kind" in table or not any(isinstance(v, dict) for v in table.values())


def _absolute_paths(cfg: Config) -> Config:
    """Relative data and weight paths made absolute: a Tune trial runs in its own directory."""
    flat = _flat_config(cfg)
    changed = {k: str(Path(flat[k]).expanduser().resolve()) for k in PATH_KEYS
               if flat[k] and "://" not in flat[k] and not Path(flat[k]).is_absolute()}
    return config_mod.load(None, {**flat, **changed}) if changed else cfg


def _validate(s: Sweep) -> None:
    if "/" in s.name or s.name in ("", ".", ".."):
        raise ConfigError(f"name: {s.name!r} must be a plain folder name")
    if s.num_samples < 1:
        raise ConfigError(f"num_samples: must be >= 1, got {s.num_samples}")
    if s.max_concurrent_trials < 0:
        raise ConfigError(f"max_concurrent_trials: must be >= 0 (0 = as many as fit), got "
                          f"{s.max_concurrent_trials}")
    if not s.trial_cpus > 0:
        raise ConfigError(f"trial_cpus: must be > 0 (Tune cannot place an empty bundle), got "
                          f"{s.trial_cpus}")
    for key, allowed in (("mode", MODES), ("scheduler", SCHEDULERS), ("search", SEARCHES)):
        if getattr(s, key) not in allowed:
            raise ConfigError(f"{key}: {getattr(s, key)!r} is not one of {', '.join(allowed)}")
    if not s.metric.startswith("val/"):
        raise ConfigError(f"metric: {s.metric!r} is not a validation metric (val/...); trials are "
                          "selected on held-out validation queries, never on the query set")
    reported = _reported_metrics(s.base)
    if s.metric not in reported:
        raise ConfigError(f"metric: {s.metric!r} is not reported by the base config; "
                          f"one of {', '.join(reported)}")
    if s.grace_period < 1:
        raise ConfigError(f"asha.grace_period: must be >= 1, got {s.grace_period}")
    if not s.reduction_factor > 1:
        raise ConfigError(f"asha.reduction_factor: must be > 1, got {s.reduction_factor}")
    if s.include_base:
        for k, v in s.base_point().items():
            if s.space[k].kind == "grid":
                raise ConfigError(f"include_base: space.{k} is a grid (every trial already takes "
                                  "its values); use choice, or drop include_base")
            if not s.space[k].contains(v):
                raise ConfigError(f"include_base: the base value of {k} ({v!r}) lies outside "
                                  f"space.{k}")
    if s.search == "optuna":
        grids = [k for k, d in s.space.items() if d.kind == "grid"]
        if grids:
            raise ConfigError(f"space.{grids[0]}: grid needs search = \"random\" (Optuna samples "
                              "its own points; use choice)")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("search: optuna is not installed (pip install "
                              "'dadh_dist[optuna]')") from None
    defaults = _flat_config(Config())
    horizons = [s.base.train.outer_iters]
    _check_eval_every(s.base, "overrides")
    for key, dist in s.space.items():
        if key.split(".")[0] in RESERVED_SECTIONS:
            raise ConfigError(f"space.{key}: {key.split('.')[0]}.* is set by the sweep itself "
                              "(trial folders and resources); sweep other keys")
        real = dist.kind in ("loguniform", "uniform")
        if real and key in defaults and not isinstance(defaults[key], float):
            raise ConfigError(f"space.{key}: {dist.kind} draws real numbers but {key} is a "
                              f"{type(defaults[key]).__name__}; use choice or grid")
        for value in dist.representatives():
            try:
                cfg = trial_config(s.base, {key: value}, s.folder, "check")
            except ConfigError as e:
                raise ConfigError(f"space.{key}: {e}") from None
            _check_eval_every(cfg, f"space.{key}")
            horizons.append(cfg.train.outer_iters)
    s.max_t = max(horizons)
    if s.scheduler == "asha" and s.grace_period > s.max_t:
        raise ConfigError(f"asha.grace_period: {s.grace_period} exceeds train.outer_iters "
                          f"({s.max_t}); no trial could be stopped early")


def _check_eval_every(cfg: Config, where: str) -> None:
    if cfg.train.eval_every != 1:
        raise ConfigError(f"{where}: train.eval_every = {cfg.train.eval_every}; a sweep ranks "
                          "trials on validation mAP after every outer iteration, set it to 1")


# ---------------------------------------------------------------------------------------------
# Resources


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
    """Trial concurrency and per-worker CPUs from the cluster's resources.

    Tune reserves only the trial function's bundle; each trial's TorchTrainer then asks for its
    workers. Launching more trials than the workers fit would leave them waiting forever, so
    concurrency is capped here from the cluster's totals.
    """
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


# ---------------------------------------------------------------------------------------------
# Trials


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_main(params: dict, sweep: dict) -> None:
    """Tune's trial function: one full (distributed) training run in `<sweep>/trial_<id>`."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base = config_mod.from_dict(sweep["base"])
    trial = f"trial_{tune.get_context().get_trial_id()}"
    cfg = trial_config(base, params, sweep["folder"], trial, sweep["cpus_per_worker"])
    # An interrupted trial reopens its run folder and resumes from its last checkpoint.
    folder, _ = run.prepare_run(cfg)
    run.build_trainer(cfg, folder, callbacks=[TuneReportCallback()]).fit()


def _live_placement_groups() -> set[str]:
    """Ids of this job's placement groups that still hold resources."""
    import ray
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    return {pid for pid, info in placement_group_table().items()
            if info["state"] != "REMOVED" and pid.endswith(job)}


def _remove_placement_groups(ids: set[str]) -> None:
    """Free what a Ctrl-C left behind: a trial killed while its TorchTrainer was placing its
    workers leaves their placement group alive for as long as this job lives (Train's cleaner
    only knows groups it was told about), and a resumed sweep in this process would wait on it
    forever. Tune has stopped every trial by now, so every group created since is a leftover."""
    import ray
    from ray.util import remove_placement_group
    from ray.util.placement_group import PlacementGroup

    for pid in sorted(ids):
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pid))))


def _check_identity(s: Sweep) -> dict | None:
    """Refuse a changed sweep under an existing name; returns the saved record (or None)."""
    saved = s.folder / "sweep.json"
    if not saved.is_file():
        return None
    record = json.loads(saved.read_text())
    old, new = record["sweep"], json.loads(json.dumps(s.identity()))
    if old != new:
        changed = [k for k in new if old.get(k) != new[k]]
        if "base" in changed:
            changed.remove("base")
            changed += [k for k in new["base"] if old["base"].get(k) != new["base"][k]][:3]
        raise ConfigError(f"name: sweep {s.name!r} already exists in {s.folder.parent} with a "
                          f"different sweep ({', '.join(changed[:4])}); use another name")
    return record


def _save_record(s: Sweep, res: Resources) -> None:
    s.folder.mkdir(parents=True, exist_ok=True)
    record = {"sweep": s.identity(), "sweep_file": str(s.path),
              "resources": dataclasses.asdict(res)}
    tmp = s.folder / "sweep.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(s.folder / "sweep.json")


def _make_tuner(s: Sweep, trainable, res: Resources):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = [s.base_point()] if s.include_base else None
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search, limit = OptunaSearch(seed=s.seed, points_to_evaluate=points), res.concurrency
    else:
        # a SearchAlgorithm, not a Searcher: TuneConfig.max_concurrent_trials would be ignored
        search, limit = BasicVariantGenerator(random_state=s.seed, points_to_evaluate=points,
                                              max_concurrent=res.concurrency), None
    if s.scheduler == "asha":
        # time_attr t = the loop's outer iteration, which survives a trial's resume;
        # stop_last_trials=False lets a trial that reaches max_t finish and write its results.
        scheduler = ASHAScheduler(time_attr="t", max_t=s.max_t, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor, stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={k: d.to_tune() for k, d in s.space.items()},
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode, num_samples=s.num_samples, search_alg=search,
            scheduler=scheduler, max_concurrent_trials=limit,
            trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(s.folder)),
    )


def run_sweep(s: Sweep) -> dict:
    """Run (or resume) the sweep; prints Tune's table and a summary, writes best_config.toml."""
    import ray
    from ray import tune

    record = _check_identity(s)
    check_data_here(s.base)  # not once per trial, after Ray has started
    ensure_ray(need_dashboard=True)
    if record is not None:
        res = Resources(**record["resources"])  # a trial's config must not change on resume
    else:
        res = plan_resources(s, ray.cluster_resources())
        _save_record(s, res)
    payload = {"base": _absolute_paths(s.base).to_dict(), "folder": str(s.folder),
               "cpus_per_worker": res.cpus_per_worker}
    trainable = tune.with_resources(tune.with_parameters(trial_main, sweep=payload),
                                    {"CPU": res.trial_cpus})
    exp = s.folder / "tune"
    gpus = f" + {res.gpus_per_trial} GPU" if res.gpus_per_trial else ""
    print(f"sweep {s.name}: {s.expected_trials} trials, {res.concurrency} at a time, "
          f"{s.base.scaling.num_workers} worker(s) x {res.cpus_per_worker:g} CPU per trial{gpus}; "
          f"folder {s.folder}", flush=True)
    if tune.Tuner.can_restore(exp):
        print(f"sweep {s.name}: resuming the interrupted sweep in {exp}", flush=True)
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True)
    else:
        tuner = _make_tuner(s, trainable, res)
    before = _live_placement_groups()
    try:
        results = tuner.fit()
    finally:
        _remove_placement_groups(_live_placement_groups() - before)
    # After Ctrl-C Tune marks the trials it stopped as terminated in memory; the state it saved
    # (what a rerun restores) still has them pending or running.
    saved = tune.ExperimentAnalysis(str(exp)).trials
    finished = sum(t.status in ("TERMINATED", "ERROR") for t in saved)
    return summarize(s, results, finished)


# ---------------------------------------------------------------------------------------------
# Results


def _trial_rows(s: Sweep, results) -> list[dict]:
    rows = []
    for r in results:
        df = r.metrics_dataframe
        vals = []
        if df is not None and s.metric in df.columns:
            vals = [float(v) for v in df[s.metric].dropna()]
        metrics = r.metrics or {}  # None for a trial that failed before its first report
        last_t = int(metrics.get("t", 0) or 0)
        rows.append({
            "trial": Path(r.path).name,
            "params": {k: r.config.get(k) for k in s.space},
            "iters": last_t,
            "val": vals[-1] if vals else None,
            "val_best": (max(vals) if s.mode == "max" else min(vals)) if vals else None,
            "test": metrics.get("test/" + s.metric.removeprefix("val/")),
            "time_s": metrics.get("time_total_s"),
            "error": r.error is not None,
        })
    return sorted(rows, key=lambda row: row["trial"])


def _best(s: Sweep, rows: list[dict]) -> dict | None:
    """The best trial among those that ran every outer iteration (what best_config.toml trains);
    ranked on the final validation metric."""
    done = [r for r in rows if r["val"] is not None and r["iters"] >= s.max_t and not r["error"]]
    if not done:
        return None
    sign = 1 if s.mode == "max" else -1
    return max(done, key=lambda r: sign * r["val"])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(s: Sweep, rows: list[dict], best: dict | None) -> str:
    keys = list(s.space)
    head = ["trial", *keys, "iters", f"{s.metric} (last)", "(best iter)",
            "test/" + s.metric.removeprefix("val/"), "time s"]
    body = []
    base = s.base_point() if s.include_base else None
    for r in rows:
        status = " (error)" if r["error"] else " *" if best is r else ""
        status += " (base)" if r["params"] == base else ""
        body.append([r["trial"] + status, *[_fmt(r["params"][k]) for k in keys], str(r["iters"]),
                     _fmt(r["val"]), _fmt(r["val_best"]),
                     _fmt(r["test"]) if best is r else "", _fmt(r["time_s"])])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_best_config(s: Sweep, best: dict) -> Path:
    """The best trial's resolved config as a runnable file: a fresh run (log.name cleared) in the
    base's run_dir, with the base's resources and paths as the user wrote them."""
    flat = _flat_config(config_mod.load(s.folder / best["trial"] / "config.toml"))
    base = _flat_config(s.base)
    for key in ("log.run_dir", "scaling.cpus_per_worker", *PATH_KEYS):
        flat[key] = base[key]
    flat["log.name"] = ""
    text = config_mod.load(None, flat).to_toml()
    params = ", ".join(f"{k} = {_fmt(v)}" for k, v in best["params"].items())
    header = (f"# Best trial of sweep {s.name!r} ({best['trial']}): {params}\n"
              f"# {s.metric} = {best['val']:.4f} after {best['iters']} outer iterations.\n"
              f"# Train it: python jobs/train.py --config <this file>\n")
    path = s.folder / "best_config.toml"
    tmp = path.with_name("best_config.toml.tmp")
    tmp.write_text(header + text)
    tmp.replace(path)
    return path


def write_hparams(s: Sweep, rows: list[dict]) -> Path:
    """One TensorBoard hparams session per trial: its parameters and validation metric."""
    from torch.utils.tensorboard import SummaryWriter

    folder = s.folder / "hparams"
    shutil.rmtree(folder, ignore_errors=True)  # rewritten whole, so a resumed sweep has no doubles
    writer = SummaryWriter(log_dir=str(folder))
    for r in rows:
        if r["val_best"] is None:
            continue
        hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
              for k, v in r["params"].items()}
        writer.add_hparams(hp, {f"hparam/{s.metric}": r["val_best"],
                                "hparam/outer_iters": float(r["iters"])}, run_name=r["trial"])
    writer.close()
    return folder


def summarize(s: Sweep, results, finished: int) -> dict:
    rows = _trial_rows(s, results)
    interrupted = finished < s.expected_trials
    best = None if interrupted else _best(s, rows)
    print(f"\nsweep {s.name}: {finished}/{s.expected_trials} trials finished"
          + (f", {results.num_errors} failed" if results.num_errors else ""))
    print(format_table(s, rows, best), flush=True)
    out = {"folder": str(s.folder), "rows": rows, "interrupted": interrupted, "best": best,
           "best_config": None}
    if interrupted:
        print(f"sweep {s.name} interrupted; rerun the same command to resume it", flush=True)
        return out
    write_hparams(s, rows)
    if best is None:
        raise SweepFailed(f"sweep {s.name}: no trial completed all {s.max_t} outer iterations "
                          f"with {s.metric}; see the trial errors in {s.folder / 'tune'}")
    out["best_config"] = str(write_best_config(s, best))
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
    print(f"best: {best['trial']} ({params}) {s.metric}={best['val']:.4f} "
          f"test/{s.metric.removeprefix('val/')}={_fmt(best['test'])}")
    print(f"best config: {out['best_config']}  "
          f"(python jobs/train.py --config {out['best_config']})")
    print(f"TensorBoard: tensorboard --logdir {s.folder}", flush=True)
    return out
