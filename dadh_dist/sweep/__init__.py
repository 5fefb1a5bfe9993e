"""Ray Tune sweeps over any dotted config key (docs/design.md §4).

    from dadh_dist import sweep
    s = sweep.load_sweep("configs/sweep_debug.toml", ["train.outer_iters=5"])
    out = sweep.run_sweep(s)        # out["best_config"]: runnable with jobs/train.py --config

Modules: `spec` (the sweep file, its parsing and checks; no Ray), `resources` (what each trial
is given), `record` (sweep.json: a rerun must be the same sweep), `rungs` (ASHA's
records kept across a resume; imports Ray), `runner` (the trial function
and the Tuner: where Ray runs), `results` (rows, best trial, table, files).

Layout of `<log.run_dir>/<sweep name>/`:
  sweep.json          what the sweep is (a rerun with a different sweep is refused) + resources
  tune/               Tune's experiment state; a rerun restores it and finishes the sweep
  asha_rungs.json     ASHA's scores at its rungs, which Tune's restore would forget (`rungs`)
  trial_<id>/         each trial's run folder (config.toml, checkpoints, tb/, final_metrics.json)
  hparams/            TensorBoard hparams: every trial's parameters and validation mAP
  best_config.toml    the best trial's resolved config, runnable with jobs/train.py --config
"""

from __future__ import annotations

from dadh_dist.sweep.record import check_identity, save_record
from dadh_dist.sweep.resources import Resources, plan_resources
from dadh_dist.sweep.results import (
    SweepFailed,
    best_row,
    format_table,
    summarize,
    trial_rows,
    write_best_config,
    write_hparams,
)
from dadh_dist.sweep.runner import run_sweep, trial_main
from dadh_dist.sweep.spec import Dist, Sweep, load_sweep, trial_config

__all__ = ["Dist", "Resources", "Sweep", "SweepFailed", "best_row", "check_identity",
           "format_table", "load_sweep", "plan_resources", "run_sweep", "save_record",
           "summarize", "trial_config", "trial_main", "trial_rows", "write_best_config",
           "write_hparams"]
