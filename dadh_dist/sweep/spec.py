"""The sweep file (docs/design.md §4): its schema, the parsed `Sweep` and its checks.

A sweep file (TOML) names a base training config, the base overrides, a search space over dotted
keys, the number of trials, the validation metric, the scheduler (ASHA over outer iterations by
default) and the search algorithm (random, or Optuna). See `configs/sweep_debug.toml`. Every
check runs here, before Ray starts: a bad key or type fails with its name, not in a trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from dadh_dist import config as config_mod
from dadh_dist.config import Config, ConfigError

KINDS = ("loguniform", "uniform", "choice", "grid")
SCHEDULERS = ("asha", "none")
SEARCHES = ("random", "optuna")
MODES = ("max", "min")
# Keys the sweep sets itself: where each trial runs, and the resources it is given.
RESERVED_SECTIONS = ("log", "scaling")
# Overrides no trial would see, and what to use instead.
IGNORED_OVERRIDES = {
    "log.name": "each trial's run is trial_<id> in the sweep folder; name the sweep with --name "
                "or the sweep file's name key",
    "scaling.use_ray": "every trial of a sweep is a Ray Train run; drop it",
}


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
            "base": {k: v for k, v in self.base.flat().items()
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
        flat = self.base.flat()
        return {k: flat[k] for k in self.space}


def trial_config(base: Config, params: dict, folder: Path | str, trial: str,
                 cpus_per_worker: float | None = None) -> Config:
    """One trial's config: the base plus the trial's parameters, through the CLI's override
    code, placed in `<folder>/<trial>`."""
    overrides = {**params, "log.run_dir": str(folder), "log.name": trial}
    if cpus_per_worker is not None:
        overrides["scaling.cpus_per_worker"] = cpus_per_worker
    return base.with_overrides(overrides)


# ---------------------------------------------------------------------------------------------
# Parsing

# the sweep file's keys and their types (tables: overrides, space, asha)
_TOP = {
    "name": str, "base": str, "num_samples": int, "metric": str, "mode": str, "scheduler": str,
    "search": str, "max_concurrent_trials": int, "trial_cpus": float, "seed": int,
    "include_base": bool, "overrides": dict, "space": dict, "asha": dict,
}
# the top-level keys that are Sweep fields of the same name
_SETTINGS = ("num_samples", "metric", "mode", "scheduler", "search", "max_concurrent_trials",
             "trial_cpus", "seed", "include_base")
_ASHA = {"grace_period": int, "reduction_factor": float}
_DIST = {"kind": str, "low": float, "high": float, "values": list}


class _CommandLineError(ConfigError):
    """A mistake on the command line (an override, --num-samples, --name), not in the file."""


def load_sweep(path: str | Path, overrides: dict | list[str] | None = None,
               num_samples: int | None = None, name: str | None = None) -> Sweep:
    """Parse and check a sweep file; `overrides` (parsed dotted keys, or `key=value` strings)
    apply to the base config after the file's own, `num_samples` and `name` replace the file's
    (the command line's --num-samples and --name). Every search-space key is tried against the
    base config here, so a bad key or type fails before any trial starts. Errors name the file,
    except those of the command line's arguments, which name the argument."""
    if num_samples is not None and num_samples < 1:
        raise _CommandLineError(f"--num-samples: must be >= 1, got {num_samples}")
    if name is not None and not _plain_name(name):
        raise _CommandLineError(f"--name: {name!r} must be a plain folder name")
    p = Path(path)
    raw = config_mod.read_toml(p, "sweep file")
    try:
        return _build_sweep(p.resolve(), raw, overrides or {}, num_samples, name)
    except _CommandLineError:
        raise
    except ConfigError as e:
        raise ConfigError(f"{p.name}: {e}") from None


def _build_sweep(path: Path, raw: dict, overrides: dict | list[str], num_samples: int | None,
                 name: str | None) -> Sweep:
    top = _read_table("", raw, _TOP)
    if "base" not in top:
        raise ConfigError("base: missing; name the training config to sweep from")
    asha = _read_table("asha.", top.get("asha", {}), _ASHA)
    base_path = _find_base(top["base"], path)
    _check_base_file_uses_ray(base_path)
    file_overrides = _flatten(top.get("overrides", {}))
    try:
        extra = config_mod.parse_overrides(overrides)
    except ConfigError as e:
        raise _CommandLineError(str(e)) from None
    s = Sweep(path=path, name=name or top.get("name") or path.stem, base_path=base_path,
              base=_base_config(base_path, file_overrides, extra),
              space=_read_space(top.get("space", {})),
              **{k: top[k] for k in _SETTINGS if k in top}, **asha)
    if num_samples is not None:
        s = dataclasses.replace(s, num_samples=num_samples)
    for check in _CHECKS:
        check(s)
    _check_overrides_reach_trials(s, file_overrides, ConfigError, "overrides: ")
    _check_overrides_reach_trials(s, extra, _CommandLineError)
    points = _space_configs(s)
    _check_every_trial_reports_metric(s, points)
    # ASHA's horizon: the longest trial
    max_t = max([s.base.train.outer_iters,
                 *(cfg.train.outer_iters for cfgs in points.values() for cfg in cfgs)])
    _check_grace_period_fits(s, max_t)
    return dataclasses.replace(s, max_t=max_t)


def _typed(key: str, value, typ):
    """`config.coerce`, plus the sweep file's own containers: a table, a list of any values."""
    if typ in (dict, list):
        if not isinstance(value, typ):
            raise ConfigError(f"{key}: expected {'table' if typ is dict else 'list'}, "
                              f"got {value!r}")
        return value
    return config_mod.coerce(key, value, typ)


def _read_table(prefix: str, table: dict, schema: dict) -> dict:
    """A table's keys checked against `schema` (name and type), values coerced."""
    out = {}
    for k, v in table.items():
        if k not in schema:
            raise config_mod.unknown_key(f"{prefix}{k}", k, schema)
        out[k] = _typed(f"{prefix}{k}", v, schema[k])
    return out


def _flatten(table: dict, prefix: str = "", leaf=lambda v: False) -> dict:
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


def _find_base(raw: str, sweep_path: Path) -> Path:
    """The base config: an absolute path, next to the sweep file, or under the working
    directory, in that order."""
    p = Path(raw).expanduser()
    candidates = [p] if p.is_absolute() else [sweep_path.parent / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"base: config file {raw!r} not found next to {sweep_path} or in the "
                      f"working directory ({Path.cwd()})")


def _check_base_file_uses_ray(base_path: Path) -> None:
    """Refuse a base file that turns Ray off: every trial is a Ray Train run, so the key would be
    ignored. Read from the file, before the overrides are applied (checks that use_ray = false
    brings, such as num_workers = 1, would fail first and hide the cause)."""
    scaling = config_mod.read_toml(base_path).get("scaling")
    if isinstance(scaling, dict) and scaling.get("use_ray") is False:
        raise ConfigError(f"base: {base_path} sets scaling.use_ray = false, but every trial of a "
                          "sweep is a Ray Train run (on a local Ray if none is running); drop "
                          "the key there, or sweep another base")


def _base_config(base_path: Path, file_overrides: dict, extra: dict) -> Config:
    """The base config: its file, then the sweep file's [overrides], then the command line's
    (`extra`; its errors are the command line's)."""
    try:
        base = config_mod.load(base_path, file_overrides)
    except ConfigError as e:
        raise ConfigError(f"overrides: {e}") from None
    try:
        return base.with_overrides(extra) if extra else base
    except ConfigError as e:
        raise _CommandLineError(str(e)) from None


def _is_dist(table: dict) -> bool:
    return "kind" in table or not any(isinstance(v, dict) for v in table.values())


def _read_space(table: dict) -> dict[str, Dist]:
    space = {key: _parse_dist(f"space.{key}", spec)
             for key, spec in _flatten(table, leaf=_is_dist).items()}
    if not space:
        raise ConfigError("space: empty; give at least one key, e.g. "
                          '[space."objective.gamma"] kind = "loguniform" low = 10 high = 1000')
    return space


def _parse_dist(key: str, spec) -> Dist:
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected a table such as {{kind = \"loguniform\", low = 10, "
                          f"high = 1000}}, got {spec!r}")
    for k in spec:
        if k not in _DIST:
            raise config_mod.unknown_key(f"{key}.{k}", k, _DIST)
    if "kind" not in spec:
        raise ConfigError(f"{key}.kind: missing; one of {', '.join(KINDS)}")
    kind = _typed(f"{key}.kind", spec["kind"], str)
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    if kind in ("choice", "grid"):
        return _parse_values(key, kind, spec)
    return _parse_range(key, kind, spec)


def _parse_values(key: str, kind: str, spec: dict) -> Dist:
    extra = sorted(set(spec) - {"kind", "values"})
    if extra:
        raise ConfigError(f"{key}.{extra[0]}: not used by kind = {kind!r} (give values)")
    values = _typed(f"{key}.values", spec.get("values"), list)
    if not values:
        raise ConfigError(f"{key}.values: give at least one value")
    return Dist(kind, values=values)


def _parse_range(key: str, kind: str, spec: dict) -> Dist:
    extra = sorted(set(spec) - {"kind", "low", "high"})
    if extra:
        raise ConfigError(f"{key}.{extra[0]}: not used by kind = {kind!r} (give low and high)")
    for bound in ("low", "high"):
        if bound not in spec:
            raise ConfigError(f"{key}.{bound}: missing")
    low = _typed(f"{key}.low", spec["low"], float)
    high = _typed(f"{key}.high", spec["high"], float)
    if not high > low:
        raise ConfigError(f"{key}.high: must be > low ({low}), got {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{key}.low: loguniform needs low > 0, got {low}")
    return Dist(kind, low=low, high=high)


# ---------------------------------------------------------------------------------------------
# Checks: each raises a ConfigError naming the key, and changes nothing


def _plain_name(name: str) -> bool:
    return "/" not in name and name not in ("", ".", "..")


def _check_name(s: Sweep) -> None:
    if not _plain_name(s.name):
        raise ConfigError(f"name: {s.name!r} must be a plain folder name")


def _check_counts(s: Sweep) -> None:
    if s.num_samples < 1:
        raise ConfigError(f"num_samples: must be >= 1, got {s.num_samples}")
    if s.max_concurrent_trials < 0:
        raise ConfigError(f"max_concurrent_trials: must be >= 0 (0 = as many as fit), got "
                          f"{s.max_concurrent_trials}")
    if not s.trial_cpus > 0:
        raise ConfigError(f"trial_cpus: must be > 0 (Tune cannot place an empty bundle), got "
                          f"{s.trial_cpus}")


def _check_choices(s: Sweep) -> None:
    for key, allowed in (("mode", MODES), ("scheduler", SCHEDULERS), ("search", SEARCHES)):
        if getattr(s, key) not in allowed:
            raise ConfigError(f"{key}: {getattr(s, key)!r} is not one of {', '.join(allowed)}")


# The keys that decide which metrics a run reports (what `reported_metrics` reads). The space
# can give them only finitely many values (ints and lists: choice or grid), so every
# combination is known before the sweep starts.
METRIC_KEYS = ("eval.encoders", "eval.topk", "eval.precision_at")


def reported_metrics(cfg: Config) -> list[str]:
    """The validation metrics a run of `cfg` reports after every outer iteration."""
    out = []
    for enc in cfg.eval.encoders:
        out.append(f"val/map_all_{enc}")
        if cfg.eval.topk:
            out.append(f"val/map_at_{cfg.eval.topk}_{enc}")
        out.append(f"val/p_at_{cfg.eval.precision_at}_{enc}")
    return out


def _check_metric(s: Sweep) -> None:
    if not s.metric.startswith("val/"):
        raise ConfigError(f"metric: {s.metric!r} is not a validation metric (val/...); trials are "
                          "selected on held-out validation queries, never on the query set")


def _check_asha(s: Sweep) -> None:
    if s.grace_period < 1:
        raise ConfigError(f"asha.grace_period: must be >= 1, got {s.grace_period}")
    if not s.reduction_factor > 1:
        raise ConfigError(f"asha.reduction_factor: must be > 1, got {s.reduction_factor}")


def _check_include_base(s: Sweep) -> None:
    if not s.include_base:
        return
    for k, v in s.base_point().items():
        if s.space[k].kind == "grid":
            raise ConfigError(f"include_base: space.{k} is a grid (every trial already takes "
                              "its values); use choice, or drop include_base")
        if not s.space[k].contains(v):
            raise ConfigError(f"include_base: the base value of {k} ({v!r}) lies outside "
                              f"space.{k}")


def _check_optuna(s: Sweep) -> None:
    if s.search != "optuna":
        return
    grids = [k for k, d in s.space.items() if d.kind == "grid"]
    if grids:
        raise ConfigError(f"space.{grids[0]}: grid needs search = \"random\" (Optuna samples "
                          "its own points; use choice)")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("search: optuna is not installed (pip install "
                          "'dadh_dist[optuna]')") from None


def _check_eval_every(cfg: Config, where: str) -> None:
    if cfg.train.eval_every != 1:
        raise ConfigError(f"{where}: train.eval_every = {cfg.train.eval_every}; a sweep ranks "
                          "trials on validation mAP after every outer iteration, set it to 1")


def _check_base(s: Sweep) -> None:
    _check_eval_every(s.base, "overrides")


def _check_space_keys(s: Sweep) -> None:
    defaults = Config().flat()
    for key, dist in s.space.items():
        section = key.split(".")[0]
        if section in RESERVED_SECTIONS:
            raise ConfigError(f"space.{key}: {section}.* is set by the sweep itself "
                              "(trial folders and resources); sweep other keys")
        real = dist.kind in ("loguniform", "uniform")
        if real and key in defaults and not isinstance(defaults[key], float):
            raise ConfigError(f"space.{key}: {dist.kind} draws real numbers but {key} is a "
                              f"{type(defaults[key]).__name__}; use choice or grid")


_CHECKS = (_check_name, _check_counts, _check_choices, _check_metric, _check_asha,
           _check_include_base, _check_optuna, _check_base, _check_space_keys)


def _check_overrides_reach_trials(s: Sweep, overrides: dict, error: type[ConfigError],
                                  where: str = "") -> None:
    """Refuse an override that no trial would see: a key the sweep sets itself, or a swept key
    (every trial takes the space's value; with include_base the first trial takes this one)."""
    for key in overrides:
        if key in IGNORED_OVERRIDES:
            raise error(f"{where}{key}: not used by a sweep ({IGNORED_OVERRIDES[key]})")
        if key in s.space and not s.include_base:
            raise error(f"{where}{key}: swept by space.{key}, so no trial would take this "
                        f"value; change space.{key}, or remove it from the space to fix the key")


def _space_configs(s: Sweep) -> dict[str, list[Config]]:
    """Per space key, the trial configs of its representative values (the other keys at the
    base's): the check that each value is valid for its key, and what ASHA's max_t and the
    metric check read."""
    out = {}
    for key, dist in s.space.items():
        out[key] = []
        for value in dist.representatives():
            try:
                cfg = trial_config(s.base, {key: value}, s.folder, "check")
            except ConfigError as e:
                raise ConfigError(f"space.{key}: {e}") from None
            _check_eval_every(cfg, f"space.{key}")
            out[key].append(cfg)
    return out


def _reported_with(base: Config, point: dict) -> list[str]:
    """`reported_metrics` of the base with `point`'s (resolved) eval values."""
    ev = dataclasses.replace(base.eval, **{k.removeprefix("eval."): v for k, v in point.items()})
    return reported_metrics(dataclasses.replace(base, eval=ev))


def _check_every_trial_reports_metric(s: Sweep, points: dict[str, list[Config]]) -> None:
    """A trial that never reports the metric would stop the whole sweep at its first report
    (Tune requires it in every result); every combination of METRIC_KEYS values is checked."""
    swept = {k: [getattr(cfg.eval, k.removeprefix("eval.")) for cfg in points[k]]
             for k in METRIC_KEYS if k in s.space}
    base_reports = s.metric in reported_metrics(s.base)
    if s.include_base and not base_reports:  # the first trial runs the base itself
        raise ConfigError(f"metric: {s.metric!r} is not reported by the base config, which "
                          f"include_base runs as the first trial; one of "
                          f"{', '.join(reported_metrics(s.base))}")
    for values in itertools.product(*swept.values()):
        point = dict(zip(swept, values))
        reported = _reported_with(s.base, point)
        if s.metric in reported:
            continue
        if not point:
            raise ConfigError(f"metric: {s.metric!r} is not reported by the base config; "
                              f"one of {', '.join(reported)}")
        # name the one value that loses the metric where there is one, else the whole point
        alone = [k for k in point if base_reports
                 and s.metric not in _reported_with(s.base, {k: point[k]})]
        culprit = ", ".join(f"{k} = {point[k]!r}" for k in alone[:1] or point)
        raise ConfigError(f"metric: {s.metric!r} is not reported by the trials with {culprit} "
                          f"(they report {', '.join(reported)}); give a metric every trial "
                          "reports, or change the space")


def _check_grace_period_fits(s: Sweep, max_t: int) -> None:
    if s.scheduler == "asha" and s.grace_period > max_t:
        raise ConfigError(f"asha.grace_period: {s.grace_period} exceeds train.outer_iters "
                          f"({max_t}); no trial could be stopped early")
