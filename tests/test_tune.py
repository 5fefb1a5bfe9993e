"""Ray Tune sweeps: the sweep file's checks, resources, the resume record and the results
(table, best config, hparams) and the restores Tune does on resume (ASHA's rungs, Optuna's
state) without Ray; then one real sweep of two trials on digits, interrupted and resumed
(127.0.0.1, 2 CPUs, one trial at a time; each trial is a full Ray Train run of about 20 s, most
of it starting its actors)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _ray_nodes import listening_beyond_loopback
from _repo import DEBUG, ROOT, job_args

from dadh_dist import cli, config, sweep
from dadh_dist import run as runner
from dadh_dist.config import ConfigError
from dadh_dist.run.session import ensure_ray

GOOD = f"""
base = {json.dumps(str(DEBUG))}
num_samples = 2
[overrides]
"train.outer_iters" = 3
[space."objective.gamma"]
kind = "loguniform"
low = 10
high = 1000
"""


def _write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# The sweep file (no Ray)


def test_shipped_sweep_files_parse():
    debug = sweep.load_sweep(ROOT / "configs" / "sweep_debug.toml")
    assert debug.base_path == DEBUG
    assert debug.base.data.source == "digits" and debug.base.train.outer_iters == 3
    assert set(debug.space) == {"objective.gamma", "objective.eta", "optim.lr_f", "optim.lr_g"}
    assert debug.expected_trials == 4 and debug.max_t == 3 and debug.scheduler == "asha"
    fashion = sweep.load_sweep(ROOT / "configs" / "sweep_fashion_mnist.toml")
    assert fashion.base.data.source == "fashion_mnist" and fashion.search == "optuna"
    assert fashion.metric.startswith("val/")


def test_sweep_file_forms_and_command_line_overrides(tmp_path):
    nested = _write(tmp_path, f"""
base = {json.dumps(str(DEBUG))}
name = "nested"
[overrides.train]
outer_iters = 4
[space.optim.lr_f]
kind = "choice"
values = [1e-3, 3e-3]
[space.objective.gamma]
kind = "grid"
values = [50, 100, 200]
""")
    s = sweep.load_sweep(nested, ["log.run_dir=/tmp/elsewhere", "--train.inner_epochs=2"],
                             num_samples=5)
    assert s.name == "nested" and s.folder == Path("/tmp/elsewhere/nested")
    assert s.base.train.outer_iters == 4 and s.base.train.inner_epochs == 2
    assert s.space["optim.lr_f"].kind == "choice" and s.space["objective.gamma"].values[2] == 200
    assert s.expected_trials == 15  # 5 samples x 3 grid points
    # the base is found next to the sweep file too
    (tmp_path / "base.toml").write_text(DEBUG.read_text())
    s2 = sweep.load_sweep(_write(tmp_path, GOOD.replace(json.dumps(str(DEBUG)),
                                                            '"base.toml"'), "rel.toml"))
    assert s2.base_path == (tmp_path / "base.toml").resolve() and s2.name == "rel"


def test_trial_config_goes_through_the_cli_override_code(tmp_path):
    s = sweep.load_sweep(_write(tmp_path, GOOD))
    cfg = sweep.trial_config(s.base, {"objective.gamma": 321.0, "optim.lr_f": 2e-3},
                                 tmp_path / "sw", "trial_x", 0.5)
    assert (cfg.objective.gamma, cfg.optim.lr_f, cfg.scaling.cpus_per_worker) == (321.0, 2e-3, 0.5)
    assert runner.run_folder(cfg) == (tmp_path / "sw" / "trial_x").resolve()
    with pytest.raises(ConfigError, match="optim.lr_f: expected float"):
        sweep.trial_config(s.base, {"optim.lr_f": "fast"}, tmp_path, "t")


def _text(top: str = "", overrides: str = "", tables: str = "") -> str:
    head, _, rest = GOOD.partition("[overrides]")
    return f"{head}{top}\n[overrides]\n{overrides}{rest}{tables}\n"


BAD = [  # (where the snippet goes, snippet, the error's expected text)
    ("top", "num_sample = 4", "num_sample: unknown key (did you mean num_samples?)"),
    ("top", 'max_concurrent_trials = "4"', "max_concurrent_trials: expected int, got '4'"),
    ("top", 'metric = "test/map_all_fg"', "not a validation metric"),
    ("top", 'metric = "val/map_all_h"', "metric: 'val/map_all_h' is not reported"),
    ("top", 'scheduler = "hyperband"', "scheduler: 'hyperband' is not one of asha, none"),
    ("top", "trial_cpus = 0", "trial_cpus: must be > 0"),
    ("tables", "[asha]\ngrace = 1", "asha.grace: unknown key"),
    ("tables", "[asha]\ngrace_period = 9", "asha.grace_period: 9 exceeds train.outer_iters (3)"),
    ("overrides", '"train.outer_iter" = 3', "overrides: train.outer_iter: unknown key"),
    ("overrides", '"train.eval_every" = 2', "train.eval_every = 2"),
    ("tables", '[space."objective.gama"]\nkind = "uniform"\nlow = 1\nhigh = 2',
     "space.objective.gama: objective.gama: unknown key (did you mean gamma?)"),
    ("tables", '[space."objective.eta"]\nkind = "normal"\nlow = 1\nhigh = 2',
     "space.objective.eta.kind: 'normal' is not one of"),
    ("tables", '[space."objective.eta"]\nkind = "loguniform"\nlow = 0\nhigh = 2',
     "space.objective.eta.low: loguniform needs low > 0"),
    ("tables", '[space."objective.eta"]\nkind = "uniform"\nlow = 2\nhigh = 1',
     "space.objective.eta.high: must be > low"),
    ("tables", '[space."objective.eta"]\nkind = "uniform"\nlow = 1\nhigh = 2\nvalues = [1]',
     "space.objective.eta.values: not used by kind = 'uniform'"),
    ("tables", '[space."objective.eta"]\nkind = "choice"\nvalues = ["big"]',
     "space.objective.eta: objective.eta: expected float, got 'big'"),
    ("tables", '[space."objective.eta"]\nkind = "choice"\nvalues = [-1.0]',
     "space.objective.eta: objective.eta: must be >= 0"),
    ("tables", '[space."train.inner_epochs"]\nkind = "uniform"\nlow = 1\nhigh = 3',
     "space.train.inner_epochs: uniform draws real numbers but train.inner_epochs is a int"),
    ("tables", '[space."log.name"]\nkind = "choice"\nvalues = ["a"]',
     "space.log.name: log.* is set by the sweep"),
    ("tables", '[space."objective.eta"]\nknd = "choice"',
     "space.objective.eta.knd: unknown key (did you mean kind?)"),
    ("top", 'search = "optuna"',
     "space.objective.gamma: grid needs search = \"random\""),
    ("top", "include_base = 1", "include_base: expected bool, got 1"),
    ("top", "include_base = true",
     "include_base: the base value of objective.gamma (2000.0) lies outside space.objective.gamma"),
]


@pytest.mark.parametrize("where,snippet,message", BAD, ids=[m for _, _, m in BAD])
def test_sweep_file_errors_name_the_key(tmp_path, where, snippet, message):
    # the debug config's own gamma (200) lies inside the space's 10..1000: move it outside
    outside = snippet == "include_base = true"
    extra = {"overrides": '"objective.gamma" = 2000.0\n'} if outside else {}
    text = _text(**{where: snippet}, **extra)
    if "optuna" in snippet:
        text = text.replace('kind = "loguniform"\nlow = 10\nhigh = 1000', "kind = \"grid\"\n"
                            "values = [10.0, 100.0]")
    with pytest.raises(ConfigError) as err:
        sweep.load_sweep(_write(tmp_path, text))
    msg = str(err.value)
    assert msg.startswith("sweep.toml: ") and message in msg and "\n" not in msg


def _precision_space(values: str, metric: str = "val/p_at_1000_fg", extra: str = "") -> str:
    return _text(top=f"metric = {json.dumps(metric)}",
                 tables=f'[space."eval.precision_at"]\nkind = "grid"\nvalues = {values}\n{extra}')


def test_every_trial_the_space_can_make_must_report_the_metric(tmp_path):
    # a trial with precision_at = 100 reports val/p_at_100_*: Tune would stop the whole sweep
    # at its first report; refused before Ray starts, naming the value
    with pytest.raises(ConfigError) as err:
        sweep.load_sweep(_write(tmp_path, _precision_space("[1000, 100]")))
    assert str(err.value) == (
        "sweep.toml: metric: 'val/p_at_1000_fg' is not reported by the trials with "
        "eval.precision_at = 100 (they report val/map_all_f, val/p_at_100_f, val/map_all_g, "
        "val/p_at_100_g, val/map_all_fg, val/p_at_100_fg); give a metric every trial reports, "
        "or change the space")
    # combinations: every choice of encoders with every precision_at
    encoders = '[space."eval.encoders"]\nkind = "choice"\nvalues = [["f", "fg"], ["f"]]\n'
    with pytest.raises(ConfigError, match=r"with eval.encoders = \['f'\] \(they report "
                                          r"val/map_all_f, val/p_at_1000_f\)"):
        sweep.load_sweep(_write(tmp_path, _precision_space("[1000]", extra=encoders)))
    with pytest.raises(ConfigError, match=r"'val/map_at_50_fg' is not reported by the trials "
                                          r"with eval.topk = 0 \(they report val/map_all_f,"):
        sweep.load_sweep(_write(tmp_path, _text(
            top='metric = "val/map_at_50_fg"',
            tables='[space."eval.topk"]\nkind = "choice"\nvalues = [50, 0]\n')))
    # what counts is the trials, not the base (1000 here): every trial reports p_at_500
    s = sweep.load_sweep(_write(tmp_path, _precision_space("[500]", "val/p_at_500_fg")))
    assert s.base.eval.precision_at == 1000 and s.expected_trials == 2
    # the base's metric still decides when the space leaves the eval keys alone
    with pytest.raises(ConfigError, match="'val/p_at_500_fg' is not reported by the base config"):
        sweep.load_sweep(_write(tmp_path, _text(top='metric = "val/p_at_500_fg"')))


def test_command_line_mistakes_name_the_argument_not_the_file(tmp_path, capsys):
    path = str(_write(tmp_path, GOOD))
    (tmp_path / "in").mkdir()
    for argv, message in [
        (["--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
        (["--num-samples=-3"], "--num-samples: must be >= 1, got -3"),
        (["--name", "a/b"], "--name: 'a/b' must be a plain folder name"),
        (["train.outer_iter=3"], "train.outer_iter: unknown key (did you mean outer_iters?)"),
        # what no trial would see: refused, with what to use instead
        (["log.name=x"], "log.name: not used by a sweep (each trial's run is trial_<id> in the "
                         "sweep folder; name the sweep with --name or the sweep file's name key)"),
        (["scaling.use_ray=false"], "scaling.use_ray: not used by a sweep (every trial of a "
                                    "sweep is a Ray Train run; drop it)"),
        (["objective.gamma=5"], "objective.gamma: swept by space.objective.gamma, so no trial "
                                "would take this value; change space.objective.gamma, or remove "
                                "it from the space to fix the key"),
    ]:
        assert cli.tune_main(["--config", path, *argv]) == cli.EXIT_USER_ERROR, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, (argv, err)
    # the same in the sweep file's [overrides]: the file is named
    for key, value in [("log.name", '"x"'), ("objective.gamma", "5.0")]:
        with pytest.raises(ConfigError, match=f"^sweep.toml: overrides: {key}: (not used|swept)"):
            sweep.load_sweep(_write(tmp_path / "in", _text(overrides=f'"{key}" = {value}\n')))
    # honoured: where the sweep folder goes, and (include_base) the first trial's swept value
    s = sweep.load_sweep(path, ["log.run_dir=/tmp/elsewhere", "log.tensorboard=false"])
    assert s.folder == Path("/tmp/elsewhere/sweep") and not s.base.log.tensorboard
    first = sweep.load_sweep(_write(tmp_path / "in", _text(top="include_base = true")),
                             ["objective.gamma=50.0"])
    assert first.base_point() == {"objective.gamma": 50.0}


def test_include_base_puts_the_base_values_first(tmp_path):
    text = _text(top="include_base = true", overrides='"objective.gamma" = 200.0',
                 tables='[space."optim.lr_f"]\nkind = "choice"\nvalues = [1e-3, 3e-3]')
    s = sweep.load_sweep(_write(tmp_path, text))
    assert s.include_base and s.base_point() == {"objective.gamma": 200.0, "optim.lr_f": 1e-3}
    assert s.identity()["include_base"] is True
    assert "include_base" not in sweep.load_sweep(_write(tmp_path, GOOD)).identity()
    rows = [{"trial": "trial_a", "params": {"objective.gamma": 200.0, "optim.lr_f": 1e-3},
             "error": None, "iters": 3, "val": 0.5, "val_best": 0.5, "test": None, "time_s": 1.0},
            {"trial": "trial_b", "params": {"objective.gamma": 90.0, "optim.lr_f": 3e-3},
             "error": None, "iters": 3, "val": 0.6, "val_best": 0.6, "test": 0.55, "time_s": 1.0}]
    table = sweep.format_table(s, rows, rows[1]).splitlines()
    assert table[2].startswith("trial_a (base) ") and table[3].startswith("trial_b * ")
    grid = text.replace('kind = "choice"', 'kind = "grid"')
    with pytest.raises(ConfigError, match="include_base: space.optim.lr_f is a grid"):
        sweep.load_sweep(_write(tmp_path, grid))


def test_missing_base_and_empty_space(tmp_path):
    with pytest.raises(ConfigError, match="base: missing"):
        sweep.load_sweep(_write(tmp_path, "num_samples = 2\n"))
    with pytest.raises(ConfigError, match="base: config file 'nope.toml' not found"):
        sweep.load_sweep(_write(tmp_path, 'base = "nope.toml"\n'))
    with pytest.raises(ConfigError, match="space: empty"):
        sweep.load_sweep(_write(tmp_path, f"base = {json.dumps(str(DEBUG))}\n"))


@pytest.mark.parametrize("cluster,overrides,expected", [
    # 2 CPUs, 1 worker x 1 CPU: one trial at a time, the config's CPUs kept
    ({"CPU": 2.0}, [], (1.0, 1)),
    # 2 workers x 1 CPU + the trial function do not fit on 2 CPUs: workers shrink to 0.9
    ({"CPU": 2.0}, ["scaling.num_workers=2", "train.batch_size=32"], (0.9, 1)),
    # 16 CPUs: 1.2 CPU per trial, 13 trials at once
    ({"CPU": 16.0}, [], (1.0, 13)),
    # 16 CPUs and one GPU per worker: the single GPU allows one trial
    ({"CPU": 16.0, "GPU": 1.0}, ["scaling.use_gpu=true"], (1.0, 1)),
])
def test_plan_resources(tmp_path, cluster, overrides, expected):
    s = sweep.load_sweep(_write(tmp_path, GOOD), overrides)
    res = sweep.plan_resources(s, cluster)
    assert (res.cpus_per_worker, res.concurrency) == expected
    assert res.trial_cpus + s.base.scaling.num_workers * res.cpus_per_worker <= cluster["CPU"]


def test_plan_resources_refuses_what_cannot_run(tmp_path):
    s = sweep.load_sweep(_write(tmp_path, GOOD), ["scaling.use_gpu=true"])
    with pytest.raises(ConfigError, match="scaling.use_gpu: each trial needs 1 GPU"):
        sweep.plan_resources(s, {"CPU": 4.0})
    capped = sweep.load_sweep(_write(tmp_path, "max_concurrent_trials = 2\n" + GOOD))
    assert sweep.plan_resources(capped, {"CPU": 16.0}).concurrency == 2


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    bad = _write(tmp_path, GOOD.replace("num_samples = 2", "num_samples = -1"))
    out = subprocess.run(job_args("tune", "--config", bad),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "error: sweep.toml: num_samples: must be >= 1, got -1"
    helped = subprocess.run(job_args("tune", "--help"),
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--num-samples" in helped.stdout


def test_base_file_without_ray_is_refused(tmp_path):
    # every trial is a Ray Train run: a base that turns Ray off would be ignored, silently
    local = DEBUG.read_text().replace("[scaling]\n", "[scaling]\nuse_ray = false\n")
    (tmp_path / "local.toml").write_text(local)
    path = _write(tmp_path, GOOD.replace(json.dumps(str(DEBUG)), '"local.toml"'))
    with pytest.raises(ConfigError) as err:
        sweep.load_sweep(path)
    assert str(err.value) == (
        f"sweep.toml: base: {tmp_path / 'local.toml'} sets scaling.use_ray = false, but every "
        "trial of a sweep is a Ray Train run (on a local Ray if none is running); drop the key "
        "there, or sweep another base")
    # named first, not hidden behind a check that use_ray = false brings (num_workers = 1)
    with pytest.raises(ConfigError, match=r"^sweep.toml: base: .*local.toml sets scaling.use_ray"):
        sweep.load_sweep(path, ["scaling.num_workers=2"])
    (tmp_path / "local.toml").write_text(local.replace("use_ray = false", "use_ray = true"))
    assert sweep.load_sweep(path).base.scaling.use_ray


def test_base_is_found_under_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.toml").write_text(DEBUG.read_text())
    (tmp_path / "sweeps").mkdir()
    path = _write(tmp_path / "sweeps", GOOD.replace(json.dumps(str(DEBUG)), '"configs/mine.toml"'))
    monkeypatch.chdir(tmp_path)
    s = sweep.load_sweep(path, {"train.inner_epochs": 2})  # parsed overrides, as the CLI gives
    assert s.base_path == (tmp_path / "configs" / "mine.toml").resolve()
    assert s.base.train.inner_epochs == 2
    monkeypatch.chdir(tmp_path / "sweeps")
    with pytest.raises(ConfigError, match=r"base: config file 'configs/mine.toml' not found next "
                                          r"to .*sweep.toml or in the working directory"):
        sweep.load_sweep(path)


def test_sweep_record_keeps_resources_and_refuses_a_changed_sweep(tmp_path):
    # what a rerun reads before it resumes (no Ray): the same sweep gets its first resources
    path = _write(tmp_path, GOOD)
    where = [f"log.run_dir={json.dumps(str(tmp_path / 'runs'))}"]
    s = sweep.load_sweep(path, where)
    assert sweep.check_identity(s) is None
    res = sweep.plan_resources(s, {"CPU": 16.0})
    sweep.save_record(s, res)
    record = sweep.check_identity(sweep.load_sweep(path, where))
    assert sweep.record.saved_resources(record) == res
    # per-worker CPUs are not part of what the sweep is, but a resumed sweep's trials keep
    # theirs: a different ask would be lost, so it is refused (the same ask resumes)
    other = sweep.load_sweep(path, where + ["scaling.cpus_per_worker=0.5"])
    assert other.identity() == s.identity()
    with pytest.raises(ConfigError) as err:
        sweep.check_identity(other)
    assert str(err.value) == (
        "scaling.cpus_per_worker: 0.5 would not reach the trials of sweep 'sweep', which resume "
        "with the 1 CPU per worker they started with (asked 1); use 1 to resume it, or another "
        "name for a new sweep")
    assert sweep.check_identity(sweep.load_sweep(path, where + ["scaling.cpus_per_worker=1"]))
    with pytest.raises(ConfigError, match=r"name: sweep 'sweep' already exists in .*runs with a "
                                          r"different sweep \(objective.bits\); use another"):
        sweep.check_identity(sweep.load_sweep(path, where + ["objective.bits=8"]))
    with pytest.raises(ConfigError, match=r"different sweep \(num_samples\)"):
        sweep.check_identity(sweep.load_sweep(path, where, num_samples=3))


class _Grid(list):
    """What summarize reads of Tune's ResultGrid: its results and the failed count."""

    @property
    def num_errors(self) -> int:
        return sum(r.error is not None for r in self)


def _result(s, trial: str, gamma: float, vals: list[float], test=None, error=None):
    """A Tune Result as the results module reads it: one report per outer iteration."""
    import pandas as pd

    reported = bool(vals)
    return SimpleNamespace(
        path=str(s.folder / "tune" / trial), config={"objective.gamma": gamma}, error=error,
        metrics_dataframe=pd.DataFrame({s.metric: vals}) if reported else None,
        metrics={"t": len(vals), "test/map_all_fg": test, "time_total_s": 2.0}
        if reported else None)


def test_results_rows_best_trial_and_files(tmp_path):
    s = sweep.load_sweep(_write(tmp_path, GOOD), ["data.root=mydata",
                         f"log.run_dir={json.dumps(str(tmp_path / 'runs'))}"], num_samples=5)
    assert s.max_t == 3 and s.metric == "val/map_all_fg"
    grid = _Grid([
        _result(s, "trial_e", 30.0, [0.2, 0.3, 0.4], test=0.35),
        _result(s, "trial_a", 100.0, [0.3, 0.65, 0.6], test=0.58),  # best at its last iteration
        _result(s, "trial_b", 500.0, [0.7, 0.9]),  # stopped by ASHA: not the best, however high
        _result(s, "trial_c", 20.0, [0.95, 0.96, 0.97], error=RuntimeError("late")),
        _result(s, "trial_d", 40.0, [], error=RuntimeError("before its first report")),
    ])
    rows = sweep.trial_rows(s, grid)
    assert [r["trial"] for r in rows] == ["trial_a", "trial_b", "trial_c", "trial_d", "trial_e"]
    a, b, _, d, e = rows
    assert (a["iters"], a["val"], a["val_best"], a["test"]) == (3, 0.6, 0.65, 0.58)
    assert (b["iters"], b["val"], b["error"]) == (2, 0.9, None)
    assert (d["iters"], d["val"], d["val_best"]) == (0, None, None)
    assert d["error"] == ("RuntimeError: before its first report "
                          f"(trial folder: {s.folder / 'tune' / 'trial_d'})")
    assert sweep.best_row(s, rows) is a
    lowest = dataclasses.replace(s, mode="min")
    assert sweep.best_row(lowest, sweep.trial_rows(lowest, grid))["trial"] == "trial_e"
    table = sweep.format_table(s, rows, a).splitlines()
    assert table[0].split()[-2:] == ["s", "error"]  # after "time s": there since trials failed
    assert table[2].startswith("trial_a * ") and "0.58" in table[2] and table[2].endswith("2")
    assert table[4].startswith("trial_c (error) ") and table[4].endswith(rows[2]["error"])
    assert table[5].removesuffix(d["error"]).split()[-1] == "-"  # trial_d reported no time
    assert "error" not in sweep.format_table(s, [a, b], a)

    # interrupted (4 of 5 trials done): no best, no files, a rerun finishes the sweep
    out = sweep.summarize(s, grid, finished=4)
    assert out["interrupted"] and out["best"] is None and out["best_config"] is None
    assert not s.folder.exists()

    # finished: the best trial's config (as a trial ran it) becomes a fresh run of the base's
    trial = sweep.trial_config(s.base.with_absolute_paths(), a["params"], s.folder,
                               "trial_a", 0.5)
    (s.folder / "trial_a").mkdir(parents=True)
    (s.folder / "trial_a" / "config.toml").write_text(trial.to_toml())
    out = sweep.summarize(s, grid, finished=5)
    assert out["best"]["trial"] == "trial_a" and not out["interrupted"]
    # what tune --json prints: plain data, the counts the table's header line gives
    assert json.loads(json.dumps(out)) == out
    assert (out["sweep"], out["metric"], out["mode"]) == ("sweep", "val/map_all_fg", "max")
    assert (out["finished"], out["expected"], out["failed"]) == (5, 5, 2)
    assert out["rows"] == rows and out["best_config"] == str(s.folder / "best_config.toml")
    text = Path(out["best_config"]).read_text()
    assert text.startswith("# Best trial of sweep 'sweep' (trial_a): objective.gamma = 100\n"
                           "# val/map_all_fg = 0.6000 after 3 outer iterations.\n")
    best = config.load(out["best_config"])
    assert (best.objective.gamma, best.log.name) == (100.0, "")
    assert (best.log.run_dir, best.data.root, best.scaling.cpus_per_worker) == (
        s.base.log.run_dir, "mydata", 1.0)
    as_written = trial.with_overrides({"data.root": "mydata", "scaling.cpus_per_worker": 1.0})
    assert best.fingerprint() == as_written.fingerprint()
    # one hparams session per trial that reported the metric, the failed ones' included
    sessions = sorted(p.parent.name for p in (s.folder / "hparams").glob("*/events.out.*"))
    assert sessions == ["trial_a", "trial_b", "trial_c", "trial_e"]

    # no trial ran every outer iteration: the sweep failed, and says where to look
    stopped = _Grid([_result(s, "trial_b", 500.0, [0.7, 0.9])])
    with pytest.raises(sweep.SweepFailed, match=r"no trial completed all 3 outer iterations"):
        sweep.summarize(dataclasses.replace(s, num_samples=1), stopped, finished=1)


def _raised(error: BaseException) -> tuple[BaseException, str]:
    """`error` as raised, and its traceback's text."""
    import traceback

    try:
        raise error
    except BaseException as e:
        return e, traceback.format_exc()


def test_a_failed_trials_row_says_why_in_one_line(tmp_path):
    """Result.error as Ray 2.60 gives it, built without a cluster: what the trial function
    raised, wrapped in a RayTaskError and read back from Tune's error.pkl (or its error.txt
    when the pickle cannot be read)."""
    from ray import cloudpickle
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    def from_trial(cause: BaseException):  # what the trial's actor raised, through error.pkl
        cause, text = _raised(cause)
        wrapped = RayTaskError("ImplicitFunc.train", text, cause, proctitle="ray::ImplicitFunc",
                               pid=1, ip="127.0.0.1").as_instanceof_cause()
        return cloudpickle.loads(cloudpickle.dumps(wrapped)), str(wrapped)

    nan, nan_text = _raised(ValueError("loss is nan at t=2\n(worker 1's terms: ...)"))
    workers, workers_text = from_trial(WorkerGroupError(
        f"[Rank 0,1 Error Snippet]:\n{nan_text}", {1: nan, 0: MemoryError()}))
    assert type(workers).__name__ == "RayTaskError(WorkerGroupError)"
    assert sweep.results.error_line(workers) == "worker 0: MemoryError"
    # as Train returns a worker's exception: wrapped with its traceback for a message
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    traced = WorkerGroupError("snippet", {0: UserExceptionWithTraceback(nan, nan_text)})
    assert sweep.results.error_line(traced) == "worker 0: ValueError: loss is nan at t=2"
    startup, _ = from_trial(ControllerError(TimeoutError("workers did not start in 30 s")))
    assert sweep.results.error_line(startup) == "TimeoutError: workers did not start in 30 s"
    config_error, _ = from_trial(ConfigError("optim.lr_f: expected float, got 'fast'"))
    assert sweep.results.error_line(config_error) == (
        "ConfigError: optim.lr_f: expected float, got 'fast'")
    # error.txt: Tune's heading, then the RayTaskError's text, the worker's exception last
    as_text = f"Failure # 1 (occurred at 2026-12-04_10-00-00)\n{workers_text}\n"
    assert sweep.results.error_line(as_text) == "ValueError: loss is nan at t=2"
    assert sweep.results.error_line("worker lost\n") == "worker lost"

    s = sweep.load_sweep(_write(tmp_path, GOOD), [f"log.run_dir={json.dumps(str(tmp_path))}"])
    grid = _Grid([_result(s, "trial_a", 100.0, [0.3], error=workers),
                  _result(s, "trial_b", 20.0, [], error=config_error),
                  _result(s, "trial_c", 30.0, [0.5, 0.6, 0.7])])
    (s.folder / "tune" / "trial_a").mkdir(parents=True)
    (s.folder / "tune" / "trial_a" / "error.txt").write_text(as_text)
    a, b, c = sweep.trial_rows(s, grid)
    assert a["error"] == (f"worker 0: MemoryError (traceback: "
                          f"{s.folder / 'tune' / 'trial_a' / 'error.txt'})")
    assert b["error"] == ("ConfigError: optim.lr_f: expected float, got 'fast' "
                          f"(trial folder: {s.folder / 'tune' / 'trial_b'})")
    assert c["error"] is None and sweep.best_row(s, [a, b, c]) is c
    table = sweep.format_table(s, [a, b, c], c).splitlines()
    assert table[2].endswith(a["error"]) and table[3].endswith(b["error"])
    assert table[4].startswith("trial_c * ") and table[4].endswith("2")  # its time: no error


def test_tune_json_prints_the_results_alone_on_stdout(tmp_path, monkeypatch, capfd):
    path = _write(tmp_path, GOOD)
    argv = ["--config", str(path), f"log.run_dir={json.dumps(str(tmp_path / 'runs'))}", "--json"]

    def interrupted(s):  # what run_sweep returns after a Ctrl-C during the second trial
        print("Tune's progress table")
        os.write(1, b"a worker's log line, forwarded by Ray\n")
        return sweep.summarize(s, _Grid([_result(s, "trial_a", 100.0, [0.3, 0.6, 0.65])]),
                               finished=1)

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert cli.tune_main(argv) == 130
    captured = capfd.readouterr()
    payload = json.loads(captured.out)  # one object and nothing else
    assert payload["interrupted"] and payload["exit_code"] == 130
    assert payload["error"] == ("sweep sweep interrupted after 1/2 trials; rerun the same "
                                "command to resume it")
    assert [(r["trial"], r["params"], r["iters"], r["val"], r["val_best"])
            for r in payload["rows"]] == [("trial_a", {"objective.gamma": 100.0}, 3, 0.65, 0.65)]
    assert payload["best"] is None and payload["best_config"] is None
    assert payload["folder"] == str(tmp_path / "runs" / "sweep")
    assert "Tune's progress table\na worker's log line, forwarded by Ray\n" in captured.err
    assert "trial_a" in captured.err  # the summary table, as without --json

    def failed(s):  # what run_sweep raises when every trial failed: summarize's SweepFailed
        print("Tune's progress table")
        return sweep.summarize(s, _Grid([
            _result(s, "trial_a", 100.0, [0.3], error=RuntimeError("worker died")),
            _result(s, "trial_b", 20.0, [], error=RuntimeError("before its first report"))]),
            finished=2)

    monkeypatch.setattr(sweep, "run_sweep", failed)
    message = ("sweep sweep: no trial completed all 3 outer iterations with val/map_all_fg; "
               f"see the trial errors in {tmp_path / 'runs' / 'sweep' / 'tune'}")
    assert cli.tune_main(argv) == cli.EXIT_RUN_FAILED
    captured = capfd.readouterr()
    payload = json.loads(captured.out)  # the rows of what ran too, not the error alone
    assert (payload["error"], payload["exit_code"]) == (message, 1)
    tune_dir = tmp_path / "runs" / "sweep" / "tune"
    assert [(r["trial"], r["iters"], r["val"], r["error"]) for r in payload["rows"]] == [
        ("trial_a", 1, 0.3, f"RuntimeError: worker died (trial folder: {tune_dir / 'trial_a'})"),
        ("trial_b", 0, None,
         f"RuntimeError: before its first report (trial folder: {tune_dir / 'trial_b'})")]
    assert (payload["folder"], payload["finished"], payload["failed"]) == (
        str(tmp_path / "runs" / "sweep"), 2, 2)
    assert payload["best"] is None and payload["best_config"] is None
    assert not payload["interrupted"] and "Tune's progress table" in captured.err
    # without --json: the table of what ran, then the one-line error
    assert cli.tune_main(argv[:-1]) == cli.EXIT_RUN_FAILED
    captured = capfd.readouterr()
    assert captured.err == f"error: {message}\n"
    lines = captured.out.splitlines()
    assert "sweep sweep: 2/2 trials finished, 2 failed" in lines
    assert [line.split()[:2] for line in lines if line.startswith("trial_")] == [
        ["trial_a", "(error)"], ["trial_b", "(error)"]]

    def no_results(s):  # a SweepFailed that carries no results: the error alone
        raise sweep.SweepFailed("sweep sweep: no trial ran")

    monkeypatch.setattr(sweep, "run_sweep", no_results)
    assert cli.tune_main(argv) == cli.EXIT_RUN_FAILED
    assert json.loads(capfd.readouterr().out) == {"error": "sweep sweep: no trial ran",
                                                  "exit_code": 1}


def test_tune_failing_itself_is_one_line_keeping_the_rows_so_far(tmp_path, monkeypatch,
                                                                   capfd):
    """Tuner.fit raising (Tune's own failure, not a trial's) gives `error: <one line>`, exit 1,
    after the table of the trials Tune saved; --json prints them with the error. Replayed
    in this process: run_sweep with Ray's parts replaced."""
    from ray.tune.error import TuneError

    from dadh_dist.sweep import runner as sweep_runner

    path = _write(tmp_path, GOOD)
    argv = ["--config", str(path), f"log.run_dir={json.dumps(str(tmp_path / 'runs'))}"]
    s = sweep.load_sweep(path, argv[2:])
    raised: list[BaseException] = []

    class Tuner:
        def fit(self):
            raise raised[-1]

    for name, fake in [("ensure_ray", lambda **kw: None), ("_trainable", lambda s, res: None),
                       ("_resources", lambda s, record: sweep.Resources(0.2, 1.0, 1, 0)),
                       ("_new_or_restored_tuner", lambda s, trainable, res: Tuner()),
                       ("_live_placement_groups", set),
                       ("_remove_placement_groups", lambda ids: None)]:
        monkeypatch.setattr(sweep_runner, name, fake)
    # read back from Tune's saved state, a trial that has not reported has no config: its
    # values come from its run folder's config.toml (none yet for one that has not started)
    running, pending = _result(s, "trial_b", 0.0, []), _result(s, "trial_c", 0.0, [])
    running.config = pending.config = None
    (s.folder / "trial_b").mkdir(parents=True)
    (s.folder / "trial_b" / "config.toml").write_text(sweep.trial_config(
        s.base, {"objective.gamma": 42.0}, s.folder, "trial_b", 1.0).to_toml())
    saved = (_Grid([_result(s, "trial_a", 100.0, [0.3, 0.6, 0.65]), running, pending]), 1)
    read_saved = sweep_runner._results_so_far
    monkeypatch.setattr(sweep_runner, "_results_so_far", lambda s: saved)
    raised.append(TuneError("The Ray Tune run failed.\nPlease inspect the previous error "
                            "messages for a cause."))
    message = ("sweep sweep: Ray Tune failed after 1/2 trials finished: TuneError: The Ray Tune "
               "run failed.; rerun the same command to resume it")
    assert cli.tune_main(argv) == cli.EXIT_RUN_FAILED
    captured = capfd.readouterr()
    assert captured.err == f"error: {message}\n"  # no traceback
    assert "sweep sweep: 1/2 trials finished" in captured.out
    assert [line.split()[:2] for line in captured.out.splitlines()
            if line.startswith("trial_")] == [["trial_a", "100"], ["trial_b", "42"],
                                              ["trial_c", "-"]]
    assert not (s.folder / "best_config.toml").exists()

    assert cli.tune_main([*argv, "--json"]) == cli.EXIT_RUN_FAILED
    payload = json.loads(capfd.readouterr().out)
    assert (payload["error"], payload["exit_code"], payload["interrupted"]) == (message, 1, False)
    assert [(r["trial"], r["params"], r["val"], r["error"]) for r in payload["rows"]] == [
        ("trial_a", {"objective.gamma": 100.0}, 0.65, None),
        ("trial_b", {"objective.gamma": 42.0}, None, None),
        ("trial_c", {"objective.gamma": None}, None, None)]
    assert (payload["finished"], payload["expected"], payload["best"]) == (1, 2, None)

    # Tune saved no state (the real reader, on a folder without one): the error alone
    monkeypatch.setattr(sweep_runner, "_results_so_far", read_saved)
    raised.append(ValueError("searcher broke"))
    assert cli.tune_main([*argv, "--json"]) == cli.EXIT_RUN_FAILED
    assert json.loads(capfd.readouterr().out) == {
        "error": "sweep sweep: Ray Tune failed: ValueError: searcher broke", "exit_code": 1}
    # ours (a bad rung log read by the scheduler): the user mistake it is, exit 2
    raised.append(ConfigError("asha_rungs.json: not a rung record of ASHA"))
    assert cli.tune_main(argv) == cli.EXIT_USER_ERROR
    assert capfd.readouterr().err == "error: asha_rungs.json: not a rung record of ASHA\n"


def test_asha_rungs_survive_the_restore_that_tune_does_from_tuner_pkl(tmp_path):
    """Tune restores a sweep's scheduler from the pickle written when the sweep started
    (tuner.pkl). Replayed here without a cluster: the first run records trials a (0.9) and b
    (0.8, stopped) at the rung t = 2; a trial added after the restore and scoring 0.5 there
    must be stopped as the uninterrupted sweep would stop it. Ray's own ASHA, restored the same
    way, lets it go on: that is the loss the rung log repairs."""
    import pickle

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from dadh_dist.sweep import rungs

    log = tmp_path / rungs.FILE
    kw = dict(time_attr="t", metric="val", mode="max", max_t=3, grace_period=2,
              reduction_factor=2, stop_last_trials=False)
    a, b, c = (SimpleNamespace(trial_id=i) for i in "abc")

    def first_run(scheduler) -> bytes:
        started = pickle.dumps(scheduler)  # what tuner.pkl holds: no records yet
        for t in (a, b):
            scheduler.on_trial_add(None, t)
        assert scheduler.on_trial_result(None, a, {"t": 2, "val": 0.9}) == TrialScheduler.CONTINUE
        assert scheduler.on_trial_result(None, b, {"t": 2, "val": 0.8}) == TrialScheduler.STOP
        return started  # ... then Ctrl-C, with a still running

    def after_restore(started: bytes) -> tuple[str, str]:
        restored = pickle.loads(started)
        for t in (a, c):
            restored.on_trial_add(None, t)
        # then a resumes past the rung it was recorded at: not judged there again
        return (restored.on_trial_result(None, c, {"t": 2, "val": 0.5}),
                restored.on_trial_result(None, a, {"t": 3, "val": 0.6}))

    assert after_restore(first_run(rungs.ResumableASHA(log, **kw))) == (
        TrialScheduler.STOP, TrialScheduler.CONTINUE)
    assert rungs.read(log)[0][-1] == (2.0, {"a": 0.9, "b": 0.8, "c": 0.5})
    plain = ASHAScheduler(**kw)
    assert after_restore(first_run(plain)) == (TrialScheduler.CONTINUE, TrialScheduler.CONTINUE)

    log.write_text('{"brackets": [[[2.0, {"a": "high"}]]]}')
    with pytest.raises(ConfigError, match=f"{rungs.FILE}: not a rung record of ASHA"):
        rungs.read(log)


def test_optuna_search_restored_from_its_saved_state_goes_on_where_it_stopped(tmp_path):
    """What Tune does on resume, without a cluster: the search made from tuner.pkl (no trials
    yet) reads the state Tune saved beside it. It must neither draw the base config's values
    again (include_base) nor repeat a draw: it suggests what the uninterrupted search would."""
    pytest.importorskip("optuna")
    from dadh_dist.sweep import runner as sweep_runner

    text = (ROOT / "configs" / "sweep_debug.toml").read_text()
    for line in ('search = "random"', "include_base = false", 'base = "debug_cpu.toml"'):
        assert line in text
    s = sweep.load_sweep(_write(tmp_path, text.replace('search = "random"', 'search = "optuna"')
                                .replace("include_base = false", "include_base = true")
                                .replace("high = 1000\n", "high = 5000\n")
                                .replace('base = "debug_cpu.toml"',
                                         f"base = {json.dumps(str(DEBUG))}")))

    def new_search():
        search, _ = sweep_runner._search(s, sweep.Resources(0.2, 1.0, 1, 0))
        assert type(search).__name__ == "OptunaSearch"
        search.set_search_properties(s.metric, s.mode, {k: d.to_tune() for k, d in s.space.items()})
        return search

    running = new_search()
    assert running.suggest("a") == s.base_point()
    running.on_trial_complete("a", {s.metric: 0.5, "t": 3})
    second = running.suggest("b")
    assert second != s.base_point()
    (tmp_path / "saved").mkdir()  # Tune's experiment folder, which exists by then
    running.save_to_dir(str(tmp_path / "saved"))
    restored = new_search()
    restored.restore_from_dir(str(tmp_path / "saved"))
    assert restored.suggest("c") == running.suggest("c") not in (s.base_point(), second)
    assert new_search().suggest("c") == s.base_point()  # what a search without its state does


def test_a_trial_stopped_by_its_data_names_check_data_of_the_trials_config(tmp_path):
    from dadh_dist.data.problems import CHECK_HINT
    from dadh_dist.sweep import results

    r = SimpleNamespace(path=str(tmp_path / "tune" / "trial_a"),
                        error=ConfigError(f"worker 0: a.txt:3: bad (and 2 more problems; "
                                          f"{CHECK_HINT}); not restarted"))
    saved = tmp_path / "trial_a" / "config.toml"
    assert "check-data --config ...`" in results._trial_error(r, saved)  # not started: no file
    saved.parent.mkdir()
    saved.write_text("")
    assert results._trial_error(r, saved) == (
        f"ConfigError: worker 0: a.txt:3: bad (and 2 more problems; `python -m dadh_dist "
        f"check-data --config {saved}` lists them all); not restarted "
        f"(trial folder: {r.path})")


# ---------------------------------------------------------------------------------------------
# Real sweeps


@pytest.fixture(scope="module")
def ray_tune():
    import ray

    assert not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    # on 127.0.0.1, with the dashboard
    ctx = ensure_ray(num_cpus=2, log_to_driver=False, need_dashboard=True)
    assert ctx.dashboard_url.startswith("127.0.0.1:")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_started_here_listens_on_loopback_only(ray_tune):
    """What `ensure_ray` starts (GCS, raylet, agents, dashboard, workers) listens on 127.0.0.1."""
    import ray

    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert listening_beyond_loopback(os.getpid()) == []


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file() and "checkpoint" not in p.as_posix()}


# the random search's seed that draws lr_f = 1e-7 for the trial after the base config's
WEAK_SECOND_SEED = 0


@pytest.mark.slow
def test_interrupted_sweep_resumes_stops_the_weak_trial_and_its_best_config_trains(
        tmp_path, ray_tune):
    """One sweep of two trials, one at a time: the base config's own values first
    (include_base), then lr_f = 1e-7, which leaves stream f untrained. Ctrl-C when the second
    trial starts; the same sweep again resumes it without redoing the first, and ASHA, restored,
    stops the weak trial at its rung (t = 2) against the first trial's score from before the
    interruption. The best config then retrains in-process to the best trial's numbers."""
    runs = tmp_path / "runs"
    sweep_file = _write(tmp_path, f"""
base = {json.dumps(str(DEBUG))}
num_samples = 2
metric = "val/map_all_f"
include_base = true
seed = {WEAK_SECOND_SEED}
[overrides]
"train.outer_iters" = 3
"train.inner_epochs" = 3
"log.run_dir" = {json.dumps(str(runs))}
[asha]
grace_period = 2
[space."optim.lr_f"]
kind = "choice"
values = [1e-3, 1e-7]
[space."objective.gamma"]
kind = "loguniform"
low = 150
high = 400
""", "stops.toml")
    s = sweep.load_sweep(sweep_file)
    assert s.base_point() == {"optim.lr_f": 1e-3, "objective.gamma": 200.0}
    seen: dict = {}

    def interrupt_when_second_trial_starts():
        # one trial at a time: a second run folder means the first trial has finished and the
        # second has started. Trial names are random: ordered by when their config was written
        def started(p: Path) -> float:
            c = p / "config.toml"
            return c.stat().st_mtime if c.is_file() else float("inf")

        deadline = time.time() + 600
        while time.time() < deadline:
            trials = sorted((p for p in s.folder.glob("trial_*") if p.is_dir()), key=started)
            if len(trials) >= 2:
                seen["done"] = {p.name: _snapshot(p) for p in trials[:1]}
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: Tune saves its state and returns
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=interrupt_when_second_trial_starts, daemon=True)
    watcher.start()
    first = sweep.run_sweep(s)
    watcher.join(timeout=5)
    assert "done" in seen, "the sweep never reached its second trial"
    assert first["interrupted"] and first["best_config"] is None
    assert not (s.folder / "best_config.toml").exists()
    # what a sweep whose Tuner.fit raised shows: the trials read back from Tune's saved state
    from dadh_dist.sweep import runner as sweep_runner

    saved, done = sweep_runner._results_so_far(s)
    assert done == first["finished"] and len(saved) == 2
    assert [(r["trial"], r["params"]) for r in sweep.trial_rows(s, saved)] == [
        (r["trial"], r["params"]) for r in first["rows"]]
    (base_trial,) = seen["done"]
    first_rows = {r["trial"]: r for r in first["rows"]}
    assert first_rows[base_trial]["params"] == s.base_point()

    out = sweep.run_sweep(sweep.load_sweep(sweep_file))
    rows, best = out["rows"], out["best"]
    assert not out["interrupted"] and len(rows) == 2
    assert sorted(p.name for p in s.folder.glob("trial_*")) == [r["trial"] for r in rows]
    # a rerun trial would rewrite its config.toml and open a new TensorBoard file
    assert _snapshot(s.folder / base_trial) == seen["done"][base_trial], "trial 1 was run again"
    assert [r["params"] for r in rows].count(s.base_point()) == 1  # not drawn again on resume
    (weak,) = [r for r in rows if r["trial"] != base_trial]
    assert weak["params"]["optim.lr_f"] == 1e-7, (
        f"seed {WEAK_SECOND_SEED} no longer draws lr_f = 1e-7 for the second trial: pick another")
    assert weak["iters"] == 2, "ASHA did not stop the untrained trial at its rung"
    assert best["trial"] == base_trial and best["iters"] == 3
    assert best["val"] == first_rows[base_trial]["val"]
    # ASHA's rung log holds both scores at t = 2: the first trial's from before the
    # interruption (a restore that forgot it would have rewritten the log without it)
    from dadh_dist.sweep import rungs

    (bracket,) = rungs.read(s.folder / rungs.FILE)
    assert {m: {f"trial_{i}" for i in rec} for m, rec in bracket} == {
        2.0: {base_trial, weak["trial"]}}
    for r in rows:  # every trial is a run with its own folder and TensorBoard events
        assert list((s.folder / r["trial"] / "tb").glob("events.out.tfevents.*")), r["trial"]
    assert len(list((s.folder / "hparams").glob("trial_*/events.out.tfevents.*"))) == 2

    best_path = Path(out["best_config"])
    assert best_path == s.folder / "best_config.toml"
    saved_cfg = config.load(best_path)
    assert saved_cfg.log.name == "" and saved_cfg.log.run_dir == str(runs)
    trial_cfg = config.load(s.folder / base_trial / "config.toml")
    assert saved_cfg.fingerprint() == trial_cfg.fingerprint()
    # the file is what jobs/train.py reads; retraining it in-process reproduces the trial
    # (with the trial worker's thread count: float sums in the backward pass depend on it)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(saved_cfg.scaling.cpus_per_worker)))
    try:
        final = runner.run_local(config.load(best_path, ["scaling.use_ray=false"]))
    finally:
        torch.set_num_threads(threads)
    assert Path(final["run_dir"]).parent == runs
    assert final["map_all_f"] == pytest.approx(best["test"], abs=1e-9)
    # a changed sweep under the same name is refused instead of mixing two sweeps
    with pytest.raises(ConfigError, match="already exists .* different sweep"):
        sweep.run_sweep(sweep.load_sweep(sweep_file, ["objective.bits=8"]))


def test_a_damaged_saved_sweep_is_one_line_naming_its_folder(tmp_path):
    """Tune's saved state cut short or edited: Tuner.restore raised whatever it met
    (a ValueError from a damaged tuner.pkl) as a traceback."""
    from dadh_dist.checkpoint import CheckpointError
    from dadh_dist.sweep import runner as sweep_runner

    path = _write(tmp_path, GOOD)
    s = sweep.load_sweep(path, [f"log.run_dir={json.dumps(str(tmp_path / 'runs'))}"])
    (s.folder / "tune").mkdir(parents=True)
    (s.folder / "tune" / "tuner.pkl").write_text("garbage\n")
    with pytest.raises(CheckpointError, match=rf"^sweep {s.name}: {s.folder / 'tune'} cannot be "
                       r"resumed \(ValueError: .*\); move it away to start the sweep afresh$"):
        sweep_runner._new_or_restored_tuner(s, lambda c: None, None)
