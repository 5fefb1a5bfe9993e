"""A sweep's results (docs/design.md §4): one row per trial, the best trial, the table, and the
files left behind — `best_config.toml` (runnable with jobs/train.py --config) and `hparams/`
(TensorBoard's hparams view of every trial's parameters and validation metric).

Everything here reads Tune's results as plain attributes (`metrics`, `metrics_dataframe`,
`config`, `path`, `error`, and the attributes of Ray's exceptions) and never talks to Ray.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dadh_dist import config as config_mod
from dadh_dist.checkpoint import write_atomic
from dadh_dist.config import PATH_KEYS
from dadh_dist.data.problems import with_check_command
from dadh_dist.run.ray_train import error_line
from dadh_dist.sweep.spec import Sweep


class SweepFailed(RuntimeError):
    """No trial produced the metric (every trial failed); the message says where to look.
    `result`: what `summarize` returns for a sweep that ended, the rows of the trials that ran
    (failed or stopped) and the sweep's folder, for `tune --json` to print all the same."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


def trial_rows(s: Sweep, results) -> list[dict]:
    """One row per trial, ordered by trial name: its parameters, outer iterations run, the
    metric's last and best values, the test metric, time, and why it failed (None if not)."""
    return sorted((_row(s, r) for r in results), key=lambda row: row["trial"])


def _row(s: Sweep, r) -> dict:
    df = r.metrics_dataframe
    vals = []
    if df is not None and s.metric in df.columns:
        vals = [float(v) for v in df[s.metric].dropna()]
    metrics = r.metrics or {}  # None for a trial that failed before its first report
    trial = Path(r.path).name
    ran = r.config or _ran_with(s, trial)
    return {
        "trial": trial,
        "params": {k: ran.get(k) for k in s.space},
        "iters": int(metrics.get("t", 0) or 0),
        "val": vals[-1] if vals else None,
        "val_best": (max(vals) if s.mode == "max" else min(vals)) if vals else None,
        "test": metrics.get("test/" + s.metric.removeprefix("val/")),
        "time_s": metrics.get("time_total_s"),
        "error": _trial_error(r, s.folder / trial / "config.toml"),
    }


def _ran_with(s: Sweep, trial: str) -> dict:
    """A trial's values from its run folder's config.toml: Tune's saved state gives no config
    for a trial that has not reported yet (read back after Tune failed); {} before it started."""
    saved = s.folder / trial / "config.toml"
    return config_mod.load(saved).flat() if saved.is_file() else {}


def _trial_error(r, saved: Path) -> str | None:
    """The trial's error in one line, and where Tune keeps its whole traceback. A data error's
    check-data hint names the trial's own config (`saved`, its run folder's config.toml)."""
    if r.error is None:
        return None
    traceback = Path(r.path) / "error.txt"
    where = f"traceback: {traceback}" if traceback.is_file() else f"trial folder: {r.path}"
    line = error_line(r.error)
    if saved.is_file():  # else the placeholder stays: the trial never started
        line = with_check_command(line, str(saved))
    return f"{line} ({where})"


def best_row(s: Sweep, rows: list[dict]) -> dict | None:
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
    """The trials as a text table; the best is marked `*`, the base config's trial `(base)`, a
    failed one `(error)`, with its error in a last column (there only when a trial failed)."""
    keys = list(s.space)
    failed = any(r["error"] for r in rows)
    head = ["trial", *keys, "iters", f"{s.metric} (last)", "(best iter)",
            "test/" + s.metric.removeprefix("val/"), "time s", *(["error"] if failed else [])]
    body = []
    base = s.base_point() if s.include_base else None
    for r in rows:
        status = " (error)" if r["error"] else " *" if best is r else ""
        status += " (base)" if r["params"] == base else ""
        body.append([r["trial"] + status, *[_fmt(r["params"][k]) for k in keys], str(r["iters"]),
                     _fmt(r["val"]), _fmt(r["val_best"]),
                     _fmt(r["test"]) if best is r else "", _fmt(r["time_s"]),
                     *([r["error"] or ""] if failed else [])])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip()
             for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_best_config(s: Sweep, best: dict) -> Path:
    """The best trial's resolved config as a runnable file: a fresh run (log.name cleared) in the
    base's run_dir, with the base's resources and paths as the user wrote them."""
    trial = config_mod.load(s.folder / best["trial"] / "config.toml")
    base = s.base.flat()
    keep = {key: base[key] for key in ("log.run_dir", "scaling.cpus_per_worker", *PATH_KEYS)}
    text = trial.with_overrides({**keep, "log.name": ""}).to_toml()
    params = ", ".join(f"{k} = {_fmt(v)}" for k, v in best["params"].items())
    header = (f"# Best trial of sweep {s.name!r} ({best['trial']}): {params}\n"
              f"# {s.metric} = {best['val']:.4f} after {best['iters']} outer iterations.\n"
              f"# Train it: python jobs/train.py --config <this file>\n")
    path = s.folder / "best_config.toml"
    write_atomic(path, (header + text).encode())
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
    """Print the sweep's table and, once every trial has finished, write its hparams and best
    config. `results`: Tune's ResultGrid (any iterable of results with `num_errors`);
    `finished`: trials Tune's saved state holds as done. Returns the results as plain data
    (what `tune --json` prints): the rows, the best row, best_config.toml's path. A sweep that
    ended without a best trial raises SweepFailed, after the table, carrying these results."""
    interrupted = finished < s.expected_trials
    out = _report(s, results, finished, ranked=not interrupted)
    out["interrupted"], best = interrupted, out["best"]
    if interrupted:
        print(f"sweep {s.name} interrupted; rerun the same command to resume it", flush=True)
        return out
    write_hparams(s, out["rows"])
    if best is None:
        raise SweepFailed(f"sweep {s.name}: no trial completed all {s.max_t} outer iterations "
                          f"with {s.metric}; see the trial errors in {s.folder / 'tune'}", out)
    out["best_config"] = str(write_best_config(s, best))
    _print_best(s, best, out["best_config"])
    return out


def tune_failed(s: Sweep, error: Exception, results, finished: int) -> SweepFailed:
    """What to raise when Ray Tune itself failed (Tuner.fit raised; a trial's failure is in its
    row instead): the error in one line, carrying the rows of the trials Tune saved, whose
    table is printed first. `results`: the saved trials (as for `summarize`), None when Tune
    saved none. No file is written: the sweep did not end."""
    what = error_line(error)
    if results is None:
        return SweepFailed(f"sweep {s.name}: Ray Tune failed: {what}")
    out = _report(s, results, finished, ranked=False)
    return SweepFailed(f"sweep {s.name}: Ray Tune failed after {finished}/{s.expected_trials} "
                       f"trials finished: {what}; rerun the same command to resume it", out)


def _report(s: Sweep, results, finished: int, ranked: bool) -> dict:
    """Print the header line and the table (the best trial marked when `ranked`); returns the
    results as plain data, not interrupted, best_config not written (yet)."""
    rows = trial_rows(s, results)
    best = best_row(s, rows) if ranked else None
    print(f"\nsweep {s.name}: {finished}/{s.expected_trials} trials finished"
          + (f", {results.num_errors} failed" if results.num_errors else ""))
    print(format_table(s, rows, best), flush=True)
    return {"sweep": s.name, "folder": str(s.folder), "metric": s.metric, "mode": s.mode,
            "finished": finished, "expected": s.expected_trials, "failed": results.num_errors,
            "interrupted": False, "rows": rows, "best": best, "best_config": None}


def _print_best(s: Sweep, best: dict, best_config: str) -> None:
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
    print(f"best: {best['trial']} ({params}) {s.metric}={best['val']:.4f} "
          f"test/{s.metric.removeprefix('val/')}={_fmt(best['test'])}")
    print(f"best config: {best_config}  (python jobs/train.py --config {best_config})")
    print(f"TensorBoard: tensorboard --logdir {s.folder}", flush=True)
