"""Running a sweep on Ray Tune (docs/design.md §4): the trial function, the Tuner, resume.

Three levels are kept apart, as in Ray's Train+Tune examples: `loop.train` runs on each worker,
`run.build_trainer` builds one run's `TorchTrainer`, and this module runs the sweep. Each trial
is a function that resolves its config with the CLI's override code (`trial_config`), then
builds and fits a `TorchTrainer` whose `TuneReportCallback` forwards rank 0's reports to Tune
(Ray >= 2.50, Train V2: `Tuner(TorchTrainer)` no longer works).
"""

from __future__ import annotations

from dadh_dist import config as config_mod
from dadh_dist import run
from dadh_dist.checkpoint import CheckpointError
from dadh_dist.config import ConfigError
from dadh_dist.run.local import data_here
from dadh_dist.run.ray_train import error_line
from dadh_dist.run.session import ensure_ray
from dadh_dist.sweep.record import check_identity, save_record, saved_resources
from dadh_dist.sweep.resources import Resources, plan_resources
from dadh_dist.sweep.results import summarize, tune_failed
from dadh_dist.sweep.spec import Sweep, trial_config


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_main(params: dict, sweep: dict) -> None:
    """Tune's trial function: one full (distributed) training run in `<sweep>/trial_<id>`."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base = config_mod.from_dict(sweep["base"])
    trial = f"trial_{tune.get_context().get_trial_id()}"
    cfg = trial_config(base, params, sweep["folder"], trial, sweep["cpus_per_worker"])
    # An interrupted trial reopens its run folder and resumes from its last checkpoint. That
    # checkpoint's report may never have reached Tune (Ctrl-C after the upload, before Tune
    # took the result): the trial reports it again, or ASHA would skip the trial's rung there.
    # The trial drives its run: it holds the run's lock, waiting a little for the process of an
    # interrupted attempt that Tune is still stopping.
    with run.open_run(cfg, wait_s=run.folders.TRIAL_LOCK_WAIT_S) as (folder, _):
        try:
            run.build_trainer(cfg, folder, callbacks=[TuneReportCallback()],
                              report_restored=True).fit()
        finally:
            run.prune_unregistered(cfg, folder)


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


def _search(s: Sweep, res: Resources):
    """The search algorithm and the Tuner's own concurrency limit (None: the search's)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    points = [s.base_point()] if s.include_base else None
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=s.seed, points_to_evaluate=points), res.concurrency
    # a SearchAlgorithm, not a Searcher: TuneConfig.max_concurrent_trials would be ignored
    return BasicVariantGenerator(random_state=s.seed, points_to_evaluate=points,
                                 max_concurrent=res.concurrency), None


def _scheduler(s: Sweep):
    from ray.tune.schedulers import FIFOScheduler

    from dadh_dist.sweep.rungs import FILE, ResumableASHA

    if s.scheduler != "asha":
        return FIFOScheduler()
    # time_attr t = the loop's outer iteration, which survives a trial's resume;
    # stop_last_trials=False lets a trial that reaches max_t finish and write its results.
    # Its rungs are logged in the sweep folder: Tune's restore forgets them (rungs.py).
    return ResumableASHA(s.folder / FILE, time_attr="t", max_t=s.max_t,
                         grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                         stop_last_trials=False)


def _make_tuner(s: Sweep, trainable, res: Resources):
    from ray import tune

    search, limit = _search(s, res)
    return tune.Tuner(
        trainable,
        param_space={k: d.to_tune() for k, d in s.space.items()},
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode, num_samples=s.num_samples, search_alg=search,
            scheduler=_scheduler(s), max_concurrent_trials=limit,
            trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(s.folder)),
    )


def _trainable(s: Sweep, res: Resources):
    from ray import tune

    payload = {"base": s.base.with_absolute_paths().to_dict(), "folder": str(s.folder),
               "cpus_per_worker": res.cpus_per_worker}
    return tune.with_resources(tune.with_parameters(trial_main, sweep=payload),
                               {"CPU": res.trial_cpus})


def _announce(s: Sweep, res: Resources) -> None:
    gpus = f" + {res.gpus_per_trial} GPU" if res.gpus_per_trial else ""
    print(f"sweep {s.name}: {s.expected_trials} trials, {res.concurrency} at a time, "
          f"{s.base.scaling.num_workers} worker(s) x {res.cpus_per_worker:g} CPU per trial{gpus}; "
          f"folder {s.folder}", flush=True)


def _resources(s: Sweep, record: dict | None) -> Resources:
    """A rerun's trials get the first run's resources (a trial's config must not change on
    resume); a new sweep's are planned from the cluster and recorded."""
    import ray

    if record is not None:
        return saved_resources(record)
    res = plan_resources(s, ray.cluster_resources())
    save_record(s, res)
    return res


def _new_or_restored_tuner(s: Sweep, trainable, res: Resources):
    from ray import tune

    from dadh_dist.sweep import rungs

    exp = s.folder / "tune"
    log = s.folder / rungs.FILE
    if tune.Tuner.can_restore(exp):
        recorded = sum(len(rec) for b in rungs.read(log) for _, rec in b)  # a bad file: one line
        print(f"sweep {s.name}: resuming the interrupted sweep in {exp}"
              + (f" (ASHA: {recorded} rung score(s) from before)" if recorded else ""),
              flush=True)
        try:
            return tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True)
        except Exception as e:  # Tune's saved state damaged (a file cut short, edited by hand)
            raise CheckpointError(f"sweep {s.name}: {exp} cannot be resumed ({error_line(e)}); "
                                  "move it away to start the sweep afresh") from None
    log.unlink(missing_ok=True)  # a new sweep's trials are compared with its own trials only
    return _make_tuner(s, trainable, res)


def run_sweep(s: Sweep) -> dict:
    """Run (or resume) the sweep; prints Tune's table and a summary, writes best_config.toml."""
    record = check_identity(s)
    data_here(s.base)  # the check, not once per trial after Ray has started
    ensure_ray(need_dashboard=True)
    res = _resources(s, record)
    _announce(s, res)
    tuner = _new_or_restored_tuner(s, _trainable(s, res), res)
    before = _live_placement_groups()
    try:
        results = tuner.fit()
    except ConfigError:
        raise  # ours (the rung log, rungs.py): a mistake the message says how to fix
    except Exception as e:  # Tune itself failed; a trial's failure is in its row instead
        raise tune_failed(s, e, *_results_so_far(s)) from e
    finally:
        _remove_placement_groups(_live_placement_groups() - before)
    # After Ctrl-C Tune marks the trials it stopped as terminated in memory; the state it saved
    # (what a rerun restores) still has them pending or running.
    return summarize(s, results, _finished(_saved_state(s)))


def _saved_state(s: Sweep):
    from ray import tune

    return tune.ExperimentAnalysis(str(s.folder / "tune"))


def _finished(analysis) -> int:
    """Trials that Tune's saved state holds as done: a rerun does not run them again."""
    return sum(t.status in ("TERMINATED", "ERROR") for t in analysis.trials)


def _results_so_far(s: Sweep) -> tuple:
    """The trials of the saved state as Tuner.fit returns them (a ResultGrid: the Tuner has
    none once fit raised) and how many finished; (None, 0) when no state can be read."""
    from ray import tune

    try:
        analysis = _saved_state(s)
        return tune.ResultGrid(analysis), _finished(analysis)
    except Exception:  # Tune's own error is the one to report, not this one
        return None, 0
