"""Run-level behaviour without Ray: resume by name, refusal of a changed config, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _checkpoints import assert_same_state, flip_byte
from _nontrivial import assert_learned
from _repo import DEBUG, job

from dadh_dist import checkpoint as ckpt
from dadh_dist import config
from dadh_dist import run as runner
from dadh_dist.config import ConfigError


def _overrides(run_dir, name, *extra):
    return ["scaling.use_ray=false", f"log.run_dir={json.dumps(str(run_dir))}",
            f"log.name={name}", "train.outer_iters=3", *extra]


def _train_cli(run_dir, name, env_extra=None, *extra):
    return job("train", "--config", DEBUG, *_overrides(run_dir, name, *extra), env=env_extra)


def _final_B(folder: Path) -> torch.Tensor:
    state, manifest = ckpt.load(ckpt.latest_valid(folder))
    return state["B"], manifest["t"]


def test_stopped_run_resumes_by_name_and_matches_uninterrupted(tmp_path):
    straight = _train_cli(tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr
    # the worker dies at the start of outer iteration 2 (0-based), after checkpoint 2 was kept
    killed = _train_cli(tmp_path, "resumed", {"DADH_FAULT": "kill:streams:2:0"})
    assert killed.returncode == 17  # faults.KILL_EXIT_CODE
    assert _final_B(tmp_path / "resumed")[1] == 2
    assert not (tmp_path / "resumed" / "final_metrics.json").exists()
    again = _train_cli(tmp_path, "resumed", {"DADH_FAULT": "kill:streams:2:0"})
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    B1, t1 = _final_B(tmp_path / "straight")
    B2, t2 = _final_B(tmp_path / "resumed")
    assert t1 == t2 == 3
    assert torch.equal(B1, B2)
    a, b = (ckpt.load(ckpt.latest_valid(tmp_path / n))[0] for n in ("straight", "resumed"))
    assert {"f", "g", "opt_f", "opt_g", "sched_f", "sched_g"} <= a.keys()
    assert a["opt_g"]["state"], "stream g's optimiser holds no moments to compare"
    assert_same_state(a, b)
    m1 = json.loads((tmp_path / "straight" / "final_metrics.json").read_text())
    assert_learned(m1)
    m2 = json.loads((tmp_path / "resumed" / "final_metrics.json").read_text())
    for key in ("map_all_f", "map_all_g", "map_all_fg"):
        assert m1[key] == m2[key]


def test_changed_config_under_same_name_is_refused(tmp_path):
    cfg = config.load(DEBUG, _overrides(tmp_path, "r", "train.outer_iters=1"))
    changed = config.load(DEBUG, _overrides(tmp_path, "r", "train.outer_iters=1",
                                            "objective.gamma=5"))
    # a run that stopped before its first checkpoint (bad data) does not block its name
    runner.prepare_run(changed)
    folder, resume = runner.prepare_run(cfg)
    assert resume is None and config.load(folder / "config.toml").objective.gamma == \
        cfg.objective.gamma
    runner.run_local(cfg)
    with pytest.raises(ConfigError, match=r"log.name: run 'r' already exists.*objective.gamma"):
        runner.prepare_run(changed)
    proc = _train_cli(tmp_path, "r", None, "train.outer_iters=1", "objective.gamma=5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already exists" in proc.stderr


def test_resume_refuses_a_checkpoint_whose_B_does_not_fit_the_data(tmp_path):
    """The same config over data that changed (a list file grew): the checkpoint's B no longer
    has a row per database image; refused with the file named, nothing deleted."""
    import dataclasses

    from dadh_dist.data import load_dataset
    from dadh_dist.data.base import Split

    cfg = config.load(DEBUG, _overrides(tmp_path, "d", "train.outer_iters=1"))
    runner.run_local(cfg)
    data = load_dataset(cfg.data)
    db = data.database
    shrunk = dataclasses.replace(data, database=Split(db.images[1:], db.labels[1:], db.ids[1:]))
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_000001: its B is .* the data "
                                                   r"changed under the run"):
        runner.run_local(cfg, dataset=shrunk)
    assert ckpt.latest_valid(tmp_path / "d").name == "checkpoint_000001"


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config.load(DEBUG, _overrides(tmp_path, "tb"))
    final = runner.run_local(cfg)
    acc = EventAccumulator(str(Path(final["run_dir"]) / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/total", "loss/pair_f", "loss/quant_g", "loss/code_f", "codes/flipped",
                "codes/bit_balance", "codes/seconds", "codes/quant_error",
                "codes/quant_error_g", "lr/f", "lr/g",
                "perf/images_per_s", "val/map_all_fg", "test/map_all_fg"):
        assert tag in tags, tag
    steps = [e.step for e in acc.Scalars("codes/flipped")]
    assert steps == [1, 2, 3]
    last = acc.Scalars("test/map_all_fg")[-1].value
    assert last == pytest.approx(final["map_all_fg"], rel=1e-6)
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert acc.Tags()["images"], "precision-recall figure missing"


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    cfg = config.load(DEBUG, _overrides(tmp_path, "c"))
    runner.run_local(cfg)
    folder = tmp_path / "c"
    newest = folder / "checkpoint_000003"
    flip_byte(newest / "state.pt")
    warnings = []
    assert ckpt.latest_valid(folder, warn=warnings.append) == folder / "checkpoint_000002"
    assert "checkpoint_000003/state.pt: contents do not match" in warnings[0]
    (folder / "checkpoint_000002" / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing manifest"):
        ckpt.verify(folder / "checkpoint_000002")


@pytest.mark.parametrize("damage", ["truncated", "no_manifest"])
def test_resume_by_name_skips_a_damaged_newest_checkpoint(tmp_path, capsys, damage):
    """A truncated state file or a folder without its manifest (a copy cut short) is refused
    with the file named; the run resumed by name continues from the checkpoint before it and
    ends where an uninterrupted run ends."""
    cfg = config.load(DEBUG, _overrides(tmp_path, "c"))
    runner.run_local(cfg)
    folder = tmp_path / "c"
    newest = folder / "checkpoint_000003"
    reference, _ = ckpt.load(newest)
    if damage == "truncated":
        state = newest / ckpt.STATE
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        refused = f"{state}: contents do not match"
    else:
        (newest / ckpt.MANIFEST).unlink()
        refused = f"{newest / ckpt.MANIFEST}: missing manifest"
    warnings = []
    assert ckpt.latest_valid(folder, warn=warnings.append) == folder / "checkpoint_000002"
    assert len(warnings) == 1 and warnings[0].startswith(f"skipping checkpoint: {refused}")
    capsys.readouterr()
    final = runner.run_local(cfg)
    out, err = capsys.readouterr()
    assert refused in err
    assert "resumed from checkpoint_000002 at outer iteration 2" in out
    assert final["resumed_at"] == 2
    resumed, _ = ckpt.load(ckpt.latest_valid(folder))
    assert_same_state(resumed, reference)
    assert sorted(p.name for p in folder.glob("checkpoint_*")) == [
        "checkpoint_000002", "checkpoint_000003"]


def test_checkpoint_with_objects_beyond_tensors_is_refused(tmp_path):
    """Loading never unpickles arbitrary objects (a checkpoint from a shared bucket could run
    code); a state holding one is refused, naming the file."""
    import argparse

    ckpt.save(tmp_path / "c", {"t": 1, "B": torch.ones(3, 2), "x": argparse.Namespace(a=1)},
              "x = 1\n", "fp")
    with pytest.raises(ckpt.CheckpointError, match=r"c/state.pt: holds more than tensors"):
        ckpt.load(tmp_path / "c")
    ckpt.save(tmp_path / "d", {"t": 1, "B": torch.ones(3, 2), "geometry": (1, 8)}, "x = 1\n",
              "fp")
    assert ckpt.load(tmp_path / "d")[0]["geometry"] == (1, 8)


def test_resumed_tune_trial_reports_its_restored_iteration_first(tmp_path):
    """A sweep interrupted after a trial's checkpoint was written but before Tune took its
    report resumes past an iteration ASHA never saw: with report_restored the resumed run first
    reports that iteration's validation again (equal to the first report), then goes on; a
    plain resume starts with the next iteration."""
    from dadh_dist import loop

    cfg = config.load(DEBUG, ["scaling.use_ray=false", "train.outer_iters=2",
                              "train.inner_epochs=1", "train.eval_every=1"])

    def run(resume_from=None, **kw):
        reports = []

        def report(metrics, staged):
            reports.append(dict(metrics))
            if staged is not None:
                runner.folders.keep_checkpoint(tmp_path, staged)

        loop.train(cfg, loop.WorkerEnv(report=report, resume_from=resume_from, **kw))
        return reports

    first = run()
    assert [r["t"] for r in first] == [1, 2]
    restored = tmp_path / "checkpoint_000001"
    again = run(restored, report_restored=True)
    assert [r["t"] for r in again] == [1, 2]
    assert again[0]["val/map_all_fg"] == pytest.approx(first[0]["val/map_all_fg"], abs=1e-12)
    assert again[1]["val/map_all_fg"] == pytest.approx(first[1]["val/map_all_fg"], abs=1e-12)
    assert [r["t"] for r in run(restored)] == [2]
