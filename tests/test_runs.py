"""Run-level behaviour without Ray: resume by name, refusal of a changed config, TensorBoard."""

from __future__ import annotations

import json
import os
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
    # the data alone moved: the error says how to resume
    saved = tmp_path / "saved.toml"
    saved.write_text(config.load(DEBUG, ["data.root=/data/a"]).to_toml())
    with pytest.raises(ConfigError, match=r"data.root: '/data/a' -> '/data/b'\); use another "
                       r"log.name or the same config; if the data moved, resume at its old "
                       r"data.root \(a link from /data/a to the new folder does it\)$"):
        runner.folders._refuse_changed(config.load(DEBUG, ["data.root=/data/b"]), saved, "here")


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
    assert "resumed from checkpoint_000002 after outer iteration 2" in out
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


def _scalars(tb: Path) -> dict[str, list]:
    """Every scalar tag's events as TensorBoard shows them (a restart's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}, acc


class _Stopped(Exception):
    pass


def test_resumed_run_logs_each_step_once_and_its_wall_time_goes_on(tmp_path):
    """The first attempt logs steps 1-3 and stops after step 3, whose checkpoint it does not
    write; the run resumed from checkpoint 2 logs 3 and 4 again. TensorBoard keeps one value
    per step, the resumed attempt's, and time/wall_s counts on from the checkpoint's."""
    from dadh_dist import loop

    cfg = config.load(DEBUG, _overrides(tmp_path, "tb", "train.outer_iters=4",
                                        "train.inner_epochs=1", "train.checkpoint_every=2"))

    def report(metrics, staged, stop_at=None):
        if staged is not None:
            runner.folders.keep_checkpoint(tmp_path, staged)
        if metrics["t"] == stop_at:
            raise _Stopped

    with pytest.raises(_Stopped):
        loop.train(cfg, loop.WorkerEnv(report=lambda m, s: report(m, s, stop_at=3),
                                       run_dir=tmp_path))
    first = _scalars(tmp_path / "tb")[0]
    assert [e.step for e in first["loss/total"]] == [1, 2, 3]
    # event files sort by name (time in s, host, pid, a per-process count): a real restart
    # starts seconds later, this one within the same second; the first file is dated back
    for path in (tmp_path / "tb").iterdir():
        *head, stamp, rest = path.name.split(".", 4)
        path.rename(path.with_name(".".join([*head, f"{int(stamp) - 1:010d}", rest])))
    assert ckpt.latest_valid(tmp_path).name == "checkpoint_000002"
    final = loop.train(cfg, loop.WorkerEnv(report=report, run_dir=tmp_path,
                                           resume_from=tmp_path / "checkpoint_000002"))
    scalars, acc = _scalars(tmp_path / "tb")
    for tag, events in scalars.items():
        steps = [e.step for e in events]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [e.step for e in scalars["codes/flipped"]] == [1, 2, 3, 4]
    assert len(acc.Tensors("config/text_summary")) == 1
    wall = [e.value for e in scalars["time/wall_s"]]
    assert all(a < b for a, b in zip(wall, wall[1:])), wall
    state, _ = ckpt.load(tmp_path / "checkpoint_000004", codes=False)
    assert state["wall_s"] == final["wall_s"] == pytest.approx(wall[-1], rel=1e-6)
    assert final["wall_s"] > ckpt.load(tmp_path / "checkpoint_000002", codes=False)[0]["wall_s"]


def _without_wall_time(src: Path, dest: Path) -> Path:
    """A copy of checkpoint `src` as the code before the state kept its wall time wrote it."""
    import shutil

    state, manifest = ckpt.load(src, codes=False)
    del state["wall_s"]
    dest.mkdir()
    listed = []
    for start, stop, name in manifest["codes"]["blocks"]:
        shutil.copy2(src / name, dest / name)
        listed.append((start, stop, name, manifest["files"][name]))
    return ckpt.save(dest, state, (src / ckpt.CONFIG).read_text(), manifest["fingerprint"],
                     blocks=listed, shape=tuple(manifest["codes"]["shape"]))


def test_rerun_of_a_finished_run_keeps_its_training_wall_time(tmp_path):
    """The same command again resumes at the last iteration and finishes at once: its
    final_metrics.json keeps the training's wall time, and TensorBoard gets nothing new. A
    checkpoint written before the state kept a wall time still loads (the time counts from 0)."""
    from dadh_dist import loop

    cfg = config.load(DEBUG, _overrides(tmp_path, "w", "train.outer_iters=2"))
    first = runner.run_local(cfg)
    again = runner.run_local(cfg)
    assert again["resumed_at"] == 2 and again["map_all_fg"] == first["map_all_fg"]
    assert again["wall_s"] == first["wall_s"] > 0
    saved = json.loads((tmp_path / "w" / "final_metrics.json").read_text())
    assert saved["wall_s"] == first["wall_s"]
    scalars, acc = _scalars(tmp_path / "w" / "tb")
    assert [e.step for e in scalars["test/map_all_fg"]] == [2]
    assert [e.step for e in scalars["time/wall_s"]] == [1, 2]
    assert len(list((tmp_path / "w" / "tb").iterdir())) == 1

    old = _without_wall_time(tmp_path / "w" / "checkpoint_000002", tmp_path / "old")
    final = loop.train(cfg, loop.WorkerEnv(resume_from=old))
    assert final["wall_s"] == 0.0 and final["map_all_fg"] == first["map_all_fg"]


def test_new_config_before_the_first_checkpoint_clears_the_old_ones_outputs(tmp_path,
                                                                            monkeypatch):
    """A new config replacing the saved one (no checkpoint yet) takes the old config's
    TensorBoard events and final metrics with it, here and at a run URI; the same config (log.*
    aside) touches nothing, and a run with a checkpoint is refused with nothing deleted."""
    from dadh_dist import uris

    monkeypatch.setenv("DADH_MIRROR_DIR", str(tmp_path / "mirrors"))
    remote = f"file://{tmp_path / 'remote'}"
    for where in (tmp_path / "runs", remote):
        a = config.load(DEBUG, _overrides(where, "r"))
        folder, _ = runner.prepare_run(a)
        outputs = [folder / "tb" / "events.out.tfevents.1", folder / "final_metrics.json"]
        kept = [folder / ".fault_streams_1_0", folder / "eval" / "x" / "report.md"]
        for path in outputs + kept:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("old")
        run = runner.run_uri(a)
        if run:
            uris.write_bytes(uris.join(run, "tb", "events.out.tfevents.1"), b"old")
            uris.write_bytes(uris.join(run, "final_metrics.json"), b"old")
        runner.prepare_run(config.load(DEBUG, _overrides(where, "r", "log.tensorboard=false")))
        assert all(p.read_text() == "old" for p in outputs + kept)
        b = config.load(DEBUG, _overrides(where, "r", "objective.gamma=5"))
        assert runner.prepare_run(b)[0] == folder
        assert not any(p.exists() for p in outputs) and not (folder / "tb").exists()
        assert all(p.read_text() == "old" for p in kept)
        assert config.load(folder / "config.toml").objective.gamma == 5
        if run:
            assert uris.list_files(uris.join(run, "tb")) == []
            assert uris.read_bytes(uris.join(run, "final_metrics.json")) is None
            assert uris.read_bytes(uris.join(run, "config.toml")) == b.to_toml().encode()

    folder = tmp_path / "runs" / "r"
    (folder / "checkpoint_000001").mkdir()
    (folder / "tb").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        runner.prepare_run(config.load(DEBUG, _overrides(tmp_path / "runs", "r")))
    assert (folder / "tb").is_dir() and (folder / "checkpoint_000001").is_dir()


def test_sizes_beyond_the_database_and_cpus_beyond_the_machine_are_said(tmp_path, monkeypatch,
                                                                         capsys):
    """Ω, mAP@k and P@N beyond the database's 200 rows are taken over all of it under the
    config's metric names, which the run must say (console and final_metrics.json). More torch
    threads than CPUs only contend (64 on 2 cores did not finish): capped, and said."""
    from dadh_dist import loop
    from dadh_dist.run import local

    monkeypatch.setattr(local, "usable_cpus", lambda: 1)
    threads = []

    def train(cfg, env, _train=loop.train):
        threads.append(torch.get_num_threads())
        return _train(cfg, env)

    monkeypatch.setattr(loop, "train", train)
    cfg = config.load(DEBUG, _overrides(tmp_path, "big", "train.outer_iters=1",
                                        "train.inner_epochs=1", "data.database_limit=200",
                                        "train.batch_size=256", "eval.topk=5000",
                                        "scaling.cpus_per_worker=4", "eval.encoders=['fg']",
                                        "log.tensorboard=false"))
    final = runner.run_local(cfg)
    out = capsys.readouterr()
    assert threads == [1]
    assert "note: scaling.cpus_per_worker = 4 is more than the 1 CPU(s) this process may use: " \
        "torch runs 1 thread(s)" in out.err
    notes = [
        "train.num_samples = 512 is more than the 200 database images: Ω is the whole database "
        "every outer iteration",
        "train.batch_size = 256 is more than Ω's 200 images: each epoch is one mini-batch of 200",
        "eval.topk = 5000 is more than the 200 database codes: mAP@5000 is mAP@all",
        "eval.precision_at = 1000 is more than the 200 database codes: P@1000 is the precision "
        "over all 200"]
    assert final["notes"] == notes
    assert json.loads((tmp_path / "big" / "final_metrics.json").read_text())["notes"] == notes
    for line in notes:
        assert f"] note: {line}\n" in out.out
    assert final["map_at_5000_fg"] == final["map_all_fg"]
    assert local.worker_threads(config.load(DEBUG, ["scaling.cpus_per_worker=0.4"])) == 1
    assert loop.beyond_database(cfg, 5000) == []  # none when the database holds them all


def test_a_resume_does_not_read_the_pretrained_weights_the_checkpoint_replaces(tmp_path):
    """The weights file moved after the first checkpoint: a resume (here of the finished run,
    which reports its final state again) needs only the checkpoint."""
    import torchvision

    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = config.load(DEBUG, _overrides(
        tmp_path, "p", "train.outer_iters=1", "train.num_samples=128", "train.inner_epochs=1",
        "data.database_limit=300", "model.backbone=resnet18", "model.input_size=32",
        f"model.pretrained_path={json.dumps(str(weights))}", "log.tensorboard=false",
        "objective.two_streams=false", "objective.use_pair=false", 'eval.encoders=["f"]'))
    first = runner.run_local(cfg, progress=False)
    weights.rename(tmp_path / "moved.pt")
    again = runner.run_local(cfg, progress=False)
    assert again["resumed_at"] == 1 and again["map_all_f"] == first["map_all_f"]


def _hold_lock(folder: Path):
    """The run's lock, held as another driver holds it: through an open file of its own."""
    import fcntl

    fh = open(folder / runner.folders.LOCK, "a")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fh


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != runner.folders.LOCK}


def test_a_second_driver_of_a_running_run_is_refused_and_touches_nothing(tmp_path, monkeypatch):
    """While a process drives a run (holds its lock), a second driver of the same run, here
    with a new config that would replace the saved one and clear the outputs before the first
    checkpoint, is refused in one line, and the run folder (and URI) stays as it was. The lock
    goes with its holder, however it ended: the next driver takes it (local and remote runs)."""
    import subprocess
    import sys

    from dadh_dist import uris

    monkeypatch.setenv("DADH_MIRROR_DIR", str(tmp_path / "mirrors"))
    remote = f"file://{tmp_path / 'remote'}"
    for where in (tmp_path / "runs", remote):
        a = config.load(DEBUG, _overrides(where, "r"))
        b = config.load(DEBUG, _overrides(where, "r", "objective.gamma=5"))
        with runner.open_run(a) as (folder, resume):
            assert resume is None and (folder / runner.folders.LOCK).is_file()
            (folder / "tb").mkdir()
            (folder / "final_metrics.json").write_text("old")
            before = _files(folder)
            with pytest.raises(ConfigError, match=(
                    r"^log.name: run 'r' in .* is being trained by another process on this "
                    rf"machine \(pid {os.getpid()}\); wait for it to end or stop it, or use "
                    r"another log.name$")):
                runner.run_local(b)
            assert _files(folder) == before
            run = runner.run_uri(a)
            if run:
                assert uris.read_bytes(uris.join(run, "config.toml")) == a.to_toml().encode()
        # ended: the next driver takes it, and b's config replaces a's
        with runner.open_run(b) as (again, _):
            assert again == folder and config.load(folder / "config.toml").objective.gamma == 5
        # a holder killed while it held the lock leaves none behind
        holder = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
             "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
             str(folder / runner.folders.LOCK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        try:
            assert holder.stdout.readline() == "held\n"
            with pytest.raises(ConfigError, match=r"being trained by another process on this "
                                                  r"machine; wait"):
                runner.folders.run_lock(a).__enter__()
        finally:
            holder.kill()
            holder.wait()
        with runner.open_run(a) as (again, _):
            assert again == folder
    # a run folder that cannot be made is one line naming it (here a file stands in the way)
    (tmp_path / "file").write_text("")
    bad = config.load(DEBUG, _overrides(tmp_path / "file" / "runs", "r"))
    with pytest.raises(ConfigError, match=r"^log.run_dir: cannot write the run folder "
                                          r".*file/runs/r \(Not a directory\)$"):
        runner.run_local(bad)


def test_a_run_resumes_on_its_data_moved_to_another_root(tmp_path, capsys):
    """All that changed is data.root, and the files there are those the run recorded: it goes
    on from its checkpoint, and the run takes the new root. Other files at the new root are
    refused, naming them; nothing of the run is touched."""
    import shutil

    from dadh_dist.data import dataset_to_parquet, load_dataset
    from dadh_dist.run.folders import DATA_RECORD

    def cfg_at(root: Path):
        return config.load(DEBUG, _overrides(tmp_path / "runs", "m", "train.outer_iters=1",
                                             "data.source=parquet",
                                             f"data.root={json.dumps(str(root))}"))

    dataset_to_parquet(load_dataset(config.load(DEBUG).data), tmp_path / "a",
                       rows_per_shard=800)
    first = runner.run_local(cfg_at(tmp_path / "a"), progress=False)
    folder = tmp_path / "runs" / "m"
    recorded = json.loads((folder / DATA_RECORD).read_text())
    assert recorded["root"] == str(tmp_path / "a") and len(recorded["files"]) == 3
    (tmp_path / "a").rename(tmp_path / "b")
    capsys.readouterr()
    again = runner.run_local(cfg_at(tmp_path / "b"), progress=False)
    out = capsys.readouterr().out
    assert f"data.root moved from {tmp_path / 'a'} to {tmp_path / 'b'}" in out
    assert ("the run had already finished (checkpoint_000001, 1/1 outer iterations): nothing to "
            "train" in out)
    assert again["map_all_fg"] == first["map_all_fg"]  # the finished run, evaluated again
    assert config.load(folder / "config.toml").data.root == str(tmp_path / "b")
    assert json.loads((folder / DATA_RECORD).read_text())["root"] == str(tmp_path / "b")
    # the same shards but one of them rewritten: refused before anything is written
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    shard = sorted((tmp_path / "c").glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    def written():  # the lock's holder writes its pid into it
        return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != ".run.lock"}

    before = written()
    with pytest.raises(ConfigError, match=rf"data.root: .*; the files at the new data.root "
                                          rf"differ from those the run recorded \({shard.name}\)$"):
        runner.run_local(cfg_at(tmp_path / "c"), progress=False)
    assert written() == before


def test_files_changed_in_place_are_named_on_resume(tmp_path, capsys):
    """The same config over a data.root whose defining files changed since the run last
    started: it resumes (a fixed image is a reason to), saying which files changed."""
    from dadh_dist.data.identity import identity

    root = tmp_path / "lists"
    root.mkdir()
    for name in ("test.txt", "database.txt"):
        (root / name).write_text("img.png 1 0\n")
    cfg = config.load(DEBUG, _overrides(tmp_path, "l", "data.source=list",
                                        f"data.root={json.dumps(str(root))}"))
    saved = tmp_path / "saved.toml"
    saved.write_text(cfg.to_toml())
    recorded = identity(cfg.data)
    assert sorted(recorded) == ["database.txt", "test.txt"]
    runner.folders._refuse_changed(cfg, saved, "here", recorded, identity(cfg.data))
    assert capsys.readouterr().out == ""
    (root / "database.txt").write_text("img.png 0 1\n")
    runner.folders._refuse_changed(cfg, saved, "here", recorded, identity(cfg.data))
    assert capsys.readouterr().out == ("warning: data.root's files changed since the run last "
                                       "started (database.txt): resuming on them as they are "
                                       "now\n")


def test_rays_worker_prefix_is_uncoloured_into_a_file_unless_the_user_chose(monkeypatch):
    """Ray colours its `(RayTrainWorker pid=…)` prefixes: escape codes in a job's log file.
    Off where stdout is no terminal; a terminal's, and a user's own setting, are left alone."""
    import io

    from dadh_dist.run.session import plain_log_prefix

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    plain_log_prefix(Terminal())
    assert "RAY_COLOR_PREFIX" not in os.environ
    plain_log_prefix(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    plain_log_prefix(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


def test_data_identity_reads_what_the_loader_reads_and_is_cheap_on_shards(tmp_path,
                                                                          monkeypatch):
    """A raw IDX file beside its .gz is not the data (the loader reads the .gz); a shard is
    hashed by its first and last MiB, not whole; a file that cannot be read makes the identity
    unknown (the loaders then name it), never an error blamed on the run folder."""
    import dataclasses

    from dadh_dist.config import DataConfig
    from dadh_dist.data import identity as ident

    idx = tmp_path / "idx"
    idx.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"):
        (idx / name).write_bytes(b"x")
    cfg = dataclasses.replace(DataConfig(), source="fashion_mnist", root=str(idx))
    assert list(ident.identity(cfg)) == ["train-images-idx3-ubyte.gz"]
    shards = tmp_path / "pq"
    shards.mkdir()
    shard = shards / "part-00000.parquet"
    shard.write_bytes(bytes(3 * ident.SAMPLE_BYTES))
    cfg = dataclasses.replace(cfg, source="parquet", root=str(shards))
    before = ident.identity(cfg)
    data = bytearray(shard.read_bytes())
    data[ident.SAMPLE_BYTES + 5] = 1  # the middle: not read
    shard.write_bytes(bytes(data))
    assert ident.identity(cfg) == before
    data[-1] = 1  # the footer's end
    shard.write_bytes(bytes(data))
    assert ident.differing(before, ident.identity(cfg)) == ["part-00000.parquet"]

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ident, "_file_hash", unreadable)
    assert ident.identity(cfg) is None
