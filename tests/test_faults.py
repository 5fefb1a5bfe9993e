"""Faults on a 2-process gloo group and on in-process runs: each must stop cleanly or recover."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from _checkpoints import assert_same_state, flip_byte, keep_merged
from _gloo import run_workers
from _nontrivial import assert_learned
from _repo import DEBUG, job
from torch.multiprocessing import ProcessExitedException

from dadh_dist import checkpoint as ckpt
from dadh_dist import config, loop
from dadh_dist import run as runner


def _cfg(extra=()):
    return config.load(DEBUG, ["scaling.use_ray=false", "train.outer_iters=3",
                               "train.num_samples=128", *extra])


def _faulty_worker(rank, world, out_dir, fault, extra=()):
    from dadh_dist.distributed import TorchCollectives

    os.environ["DADH_FAULT"] = fault
    cfg = _cfg(extra)
    cfg.scaling.num_workers = world
    out = Path(out_dir)
    kept, skipped = [], []

    def report(metrics, staged):
        skipped.append(metrics.get("train/skipped_batches"))
        folder = keep_merged(out, staged, metrics)
        if folder is not None:
            kept.append(folder.name)

    env = loop.WorkerEnv(collectives=TorchCollectives(), report=report,
                         run_dir=out if rank == 0 else None)
    try:
        loop.train(cfg, env)
        outcome = {"error": None}
    except Exception as e:  # the outcome is what the test checks
        outcome = {"error": type(e).__name__, "message": str(e)}
    outcome["kept"] = kept
    outcome["skipped"] = skipped
    (out / f"outcome_{rank}.json").write_text(json.dumps(outcome))


def _outcomes(tmp_path, fault, extra=()):
    run_workers(_faulty_worker, 2, str(tmp_path), fault, list(extra), timeout_s=30)
    return [json.loads((tmp_path / f"outcome_{r}.json").read_text()) for r in (0, 1)]


def test_non_finite_loss_on_one_worker_stops_all_with_context(tmp_path):
    # rank 1's outputs turn NaN at t = 1 (DADH_FAULT counts from 0): the message and the
    # progress line count outer iterations and mini-batches from 1
    out = _outcomes(tmp_path, "nan:1:1")
    for o in out:
        assert o["error"] == "NonFiniteLoss"
        assert "on worker(s) [1] at outer iteration 2, step 1 " in o["message"]
    assert "pair_f=nan" in out[1]["message"] and "nan" not in out[0]["message"]
    # the checkpoint of t = 0 (outer iteration 1) was kept; nothing non-finite was written after it
    assert out[0]["kept"] == ["checkpoint_000001"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_000001"]


def test_non_finite_loss_in_process_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    from dadh_dist import cli

    monkeypatch.setenv("DADH_FAULT", "nan:1:0")  # t = 1 (outer iteration 2), rank 0
    code = cli.train_main(["--config", str(DEBUG), "scaling.use_ray=false", "train.outer_iters=2",
                           "train.num_samples=128", f"log.run_dir={json.dumps(str(tmp_path))}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_RUN_FAILED and "Traceback" not in err
    assert err.startswith("error: ") and "outer iteration 2, step 1 " in err, err


def test_skip_policy_drops_the_batch_on_every_worker_counts_it_and_finishes(tmp_path):
    out = _outcomes(tmp_path, "nan:1:1", ["train.nonfinite=skip"])
    for o in out:
        assert o["error"] is None
        assert o["skipped"] == [0.0, 1.0, 0.0]  # per outer iteration, the same on both workers
    assert out[0]["kept"][-1] == "checkpoint_000003"
    state, _ = ckpt.load(tmp_path / "checkpoint_000003")
    assert all(torch.isfinite(p).all() for p in state["f"].values())


def test_skip_policy_still_stops_past_its_limit(tmp_path):
    out = _outcomes(tmp_path, "nan:1:1", ["train.nonfinite=skip", "train.max_skipped=0"])
    for o in out:
        assert o["error"] == "NonFiniteLoss"
        assert "at outer iteration 2, step 1 " in o["message"]


def test_flipped_bit_of_B_on_one_worker_is_caught_by_its_block_checksum(tmp_path):
    out = _outcomes(tmp_path, "flip:0:1")  # one bit of rank 1's block, after the code step
    for o in out:
        assert o["error"] == "ReplicaMismatch"
        assert "B's row block on worker(s) [1] changed since the code step" in o["message"]
    assert out[0]["kept"] == []


def test_flipped_bit_caught_at_the_next_outer_iteration_names_it_from_1(monkeypatch):
    """With no evaluation or checkpoint in between, the flip after t = 0's code step is caught
    as the next outer iteration opens: the second, counted from 1 as the progress line does."""
    from dadh_dist.distributed import ReplicaMismatch

    monkeypatch.setenv("DADH_FAULT", "flip:0:0")
    cfg = _cfg(["train.outer_iters=2", "train.inner_epochs=1", "train.num_samples=64",
                "train.eval_every=0", "train.checkpoint_every=2"])
    reports = []
    with pytest.raises(ReplicaMismatch, match=r"^B's row block on worker\(s\) \[0\] changed "
                                              r"since the code step wrote it \(before outer "
                                              r"iteration 2\); "):
        loop.train(cfg, loop.WorkerEnv(report=lambda m, f: reports.append(m), progress=False))
    assert [m["t"] for m in reports] == [1]  # the first iteration went through


def _dies_early(rank, world, out_dir, how):
    import torch.distributed as dist

    from dadh_dist.distributed import TorchCollectives

    c = TorchCollectives()
    outcome = Path(out_dir, "dead_peer.json")
    if rank == 1:
        # rank 0 has joined the group when this barrier returns: the loss comes in a collective,
        # not while rank 0 still connects
        dist.barrier()
        if how == "exit":
            os._exit(0)  # a peer that vanishes without a word
        # a peer that hangs: alive, never joins the collective, until rank 0 has its outcome
        deadline = time.time() + 20
        while not outcome.exists() and time.time() < deadline:
            time.sleep(0.1)
        os._exit(0)
    t0 = time.time()
    try:
        dist.barrier()  # rank 1's, which it may have left already
        c.all_gather_rows(torch.zeros(4, 2))
        c.all_reduce_sum(torch.zeros(1))
        result = "no error"
    except Exception as e:
        result = type(e).__name__
    outcome.write_text(json.dumps({"result": result, "seconds": time.time() - t0}))
    return False  # the group is broken; no teardown


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_collective_with_dead_peer_fails_within_bound(tmp_path, how):
    try:
        run_workers(_dies_early, 2, str(tmp_path), how, timeout_s=5)
    except ProcessExitedException:
        pass  # gloo may abort the surviving process at teardown; the outcome file is the test
    got = json.loads((tmp_path / "dead_peer.json").read_text())
    assert got["result"] != "no error"
    assert got["seconds"] < 15  # the collective timeout is 5 s, not 30 minutes


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    # a process of the same kind as the restarted ones (jobs/train.py): compared bit for bit
    tmp = tmp_path_factory.mktemp("straight")
    done = job("train", "--config", DEBUG, "scaling.use_ray=false", "train.outer_iters=3",
               f"log.run_dir={json.dumps(str(tmp))}", "log.name=s")
    assert done.returncode == 0, done.stderr
    final = json.loads((tmp / "s" / "final_metrics.json").read_text())
    assert_learned(final)
    state, _ = ckpt.load(ckpt.latest_valid(tmp / "s"))
    return final, state


@pytest.mark.parametrize("phase", ["codes", "checkpoint"])
def test_lost_process_restarts_from_last_checkpoint(tmp_path, straight, phase):
    args = ["--config", DEBUG, "scaling.use_ray=false", "train.outer_iters=3",
            f"log.run_dir={json.dumps(str(tmp_path))}", "log.name=k"]
    (tmp_path / "tmp").mkdir()
    env = {"DADH_FAULT": f"kill:{phase}:1:0", "TMPDIR": str(tmp_path / "tmp")}
    first = job("train", *args, env=env)
    assert first.returncode == 17, first.stderr
    # killed inside iteration 1: only checkpoint 1 exists (a staged checkpoint 2 never landed)
    assert ckpt.latest_valid(tmp_path / "k").name == "checkpoint_000001"
    if phase == "checkpoint":
        # ... and its staging folder stayed behind, named with the dead process's id: a later
        # worker on the node removes it once it is an hour old
        left = list((tmp_path / "tmp").glob("dadh_ckpt_*"))
        assert len(left) == 1 and left[0].name.split("_")[2].isdigit(), left
        assert ckpt.remove_stale_staging(tmp_path / "tmp") == []  # too recent
        later = time.time() + ckpt.STALE_AFTER_S + 1
        assert ckpt.remove_stale_staging(tmp_path / "tmp", now=later) == left
    second = job("train", *args, env=env)
    assert second.returncode == 0, second.stderr
    state, _ = ckpt.load(ckpt.latest_valid(tmp_path / "k"))
    ref_final, ref_state = straight
    # B, both streams, both optimisers (Adam's moments survive the restart exactly), schedules
    assert {"B", "f", "g", "opt_f", "opt_g"} <= state.keys() and state["opt_f"]["state"]
    assert_same_state(state, ref_state)
    final = json.loads((tmp_path / "k" / "final_metrics.json").read_text())
    assert final["map_all_fg"] == ref_final["map_all_fg"]


def _save(folder: Path, t: int) -> Path:
    """A small checkpoint whose B tells which one it is."""
    return ckpt.save(folder, {"t": t, "B": torch.full((4, 2), float(t))}, "x = 1\n", "fp")


def _B(folder: Path) -> float:
    return float(ckpt.load(folder)[0]["B"][0, 0])


def test_restart_resumes_from_newest_valid_checkpoint_when_rays_is_refused(tmp_path, capsys):
    """A restarted Ray worker group whose handed-back checkpoint fails verification resumes
    from the newest valid checkpoint of the run, not from where the run first started."""
    run = tmp_path / "run"  # Ray's names: checkpoint_<time>
    run.mkdir()
    assert runner.resume.restart_checkpoint(None, run, None) is None
    assert capsys.readouterr().out == ""  # a fresh run has nothing to warn about
    older = _save(run / "checkpoint_2025-01-01_00-00-01.000000", 1)
    newer = _save(run / "checkpoint_2025-01-01_00-00-02.000000", 2)
    assert runner.resume.restart_checkpoint(newer, run, None) == newer
    # Ray hands back none, or an older one (it registered the newer one too late): the newer
    assert runner.resume.restart_checkpoint(None, run, None) == newer
    assert runner.resume.restart_checkpoint(older, run, None) == newer
    assert "the run holds a newer one, checkpoint_2025-01-01_00-00-02" in capsys.readouterr().out
    flip_byte(newer / ckpt.STATE)
    assert runner.resume.restart_checkpoint(newer, run, None) == older
    assert f"warning: {newer / ckpt.STATE}: contents do not match" in capsys.readouterr().err
    # the copy Ray hands out may sit outside the run folder
    outside = tmp_path / "ray_copy"
    _save(outside, 2)
    (outside / ckpt.MANIFEST).unlink()
    assert runner.resume.restart_checkpoint(outside, run, None) == older
    flip_byte(older / ckpt.STATE)
    assert runner.resume.restart_checkpoint(newer, run, None) is None  # nothing valid: start over
    assert "warning: no valid checkpoint; resuming from the start" in capsys.readouterr().err

    # a remote run: a verified copy of the newest valid remote checkpoint, in the mirror
    from dadh_dist import storage, uris

    uri = f"file://{tmp_path / 'remote' / 'run'}"
    for t in (1, 2):
        local = _save(tmp_path / f"up{t}", t)
        if t == 2:
            flip_byte(local / ckpt.STATE)
        storage.upload_checkpoint(local, uris.join(uri, f"checkpoint_00000{t}"))
    mirror = tmp_path / "mirror"
    got = runner.resume.restart_checkpoint(tmp_path / "up2", mirror, uri)
    assert got == mirror / "checkpoint_000001" and _B(got) == 1


def _ray_snapshot(folder: Path, *names: str) -> None:
    """The part of Ray Train's checkpoint_manager_snapshot.json that names what it registered."""
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    (folder / runner.ray_train.RAY_SNAPSHOT).write_text(json.dumps(
        {"ray_version": "2.60.0", "checkpoint_results": results}))


def test_checkpoints_ray_never_registered_are_pruned_after_the_fit(tmp_path, monkeypatch,
                                                                   capsys):
    """Each attempt lost before its report reached the controller leaves one checkpoint Ray never
    registered, so never prunes. After the fit: the KEEP_CHECKPOINTS newest that verify, and what
    Ray registered (its next fit restores those names), stay; the rest goes, half-written ones
    included. With Ray's record unreadable nothing is removed."""
    from dadh_dist import storage, uris

    run = tmp_path / "runs" / "r"
    name = "checkpoint_2025-01-01_00-00-0{}.000000".format
    for t in range(1, 7):
        _save(run / name(t), t)
    flip_byte(run / name(6) / ckpt.STATE)  # newest, but does not verify
    (run / name(7)).mkdir()  # files of a killed attempt, no manifest
    (run / name(7) / ckpt.STATE).write_bytes(b"half")
    (run / "config.toml").write_text("x = 1\n")
    cfg = config.load(DEBUG, [f"log.run_dir={json.dumps(str(tmp_path / 'runs'))}", "log.name=r"])
    held = lambda: sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())  # noqa: E731
    (run / runner.ray_train.RAY_SNAPSHOT).write_text("{")
    runner.ray_train.prune_unregistered(cfg, run)
    assert held() == [name(t) for t in range(1, 8)]
    _ray_snapshot(run, name(2))  # registered by an attempt, then left behind by a restart
    runner.ray_train.prune_unregistered(cfg, run)
    assert held() == [name(t) for t in (2, 4, 5)]
    assert (run / "config.toml").is_file()
    assert runner.resume.restart_checkpoint(None, run, None) == run / name(5)

    # a remote run: the same, by the manifests' t
    uri = f"file://{tmp_path / 'remote' / 'r'}"
    for t in (1, 2, 3):
        storage.upload_checkpoint(_save(tmp_path / f"up{t}", t), uris.join(uri, name(t)))
    uris.write_bytes(uris.join(uri, name(4), ckpt.STATE), b"half")
    cfg = config.load(DEBUG, [f"log.run_dir={json.dumps('file://' + str(tmp_path / 'remote'))}",
                              "log.name=r"])
    runner.ray_train.prune_unregistered(cfg, tmp_path / "mirror")  # no snapshot: none registered
    assert [n for _, n in storage.checkpoints(uri)] == [name(3), name(2)]
    assert not (tmp_path / "remote" / "r" / name(4)).exists()
    # it runs after the fit: a store that fails is a warning, never what the run ends with
    def unreachable(*_):
        raise uris.StorageError("s3://b/r: read failed (no route)")

    monkeypatch.setattr(uris, "read_bytes", unreachable)
    runner.ray_train.prune_unregistered(cfg, tmp_path / "mirror")
    assert "were not pruned: s3://b/r: read failed" in capsys.readouterr().err


def test_ctrl_c_under_rays_fit_is_a_keyboard_interrupt_and_its_handler_goes(tmp_path):
    """Ray Train's fit installs a SIGINT handler that aborts the run and raises SystemExit (the
    CLI exited 1 and said nothing) and leaves it installed; the CLI's "interrupted" (exit 130)
    needs a KeyboardInterrupt, and a later Ctrl-C the handler that was there before."""
    import signal
    import sys

    class Trainer:
        def fit(self):
            signal.signal(signal.SIGINT, lambda *_: sys.exit(0))  # what Ray's handler ends with
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        runner.ray_train.fit(Trainer())
    assert signal.getsignal(signal.SIGINT) is before


class _Handed:
    """What ray.train.get_checkpoint returns: a checkpoint opened with as_directory()."""

    def __init__(self, folder: Path):
        self.folder = folder

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.folder))


def _agree(rank, world, run, handed_by_rank):
    from dadh_dist.distributed import TorchCollectives

    handed = handed_by_rank[rank]
    got, own = runner.resume.agreed_resume(
        TorchCollectives(), _Handed(Path(handed)) if handed else None, Path(run), None)
    (Path(run).parent / f"agreed_{rank}.json").write_text(json.dumps(
        [str(got) if got else None, _B(got) if got else None, own is not None]))
    if own is not None:
        import shutil

        shutil.rmtree(own.parent)


def test_restarted_group_agrees_on_the_newest_checkpoint(tmp_path):
    """Rank 0 decides: with Ray handing back an older checkpoint (rank 0) or none (rank 1) while
    the run folder holds a newer one, both workers resume from the newer one; with only Ray's
    copy newer (outside the run folder), each worker opens its own copy of it."""
    run = tmp_path / "run"
    _save(run / "checkpoint_2025-01-01_00-00-01.000000", 1)
    newer = _save(run / "checkpoint_2025-01-01_00-00-02.000000", 2)
    older_copy = _save(tmp_path / "ray_old", 1)

    def outcome():
        return [json.loads((tmp_path / f"agreed_{r}.json").read_text()) for r in (0, 1)]

    run_workers(_agree, 2, str(run), [str(older_copy), None], timeout_s=30)
    assert outcome() == [[str(newer), 2.0, False]] * 2
    ray_newest = [str(_save(tmp_path / f"ray_{r}", 3)) for r in (0, 1)]
    run_workers(_agree, 2, str(run), ray_newest, timeout_s=30)
    assert [o[1:] for o in outcome()] == [[3.0, True]] * 2
    assert [Path(o[0]).name for o in outcome()] == ["ray_0", "ray_1"]


def test_no_checkpoint_is_deleted_before_its_successor_verifies(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for t in (1, 2):
        runner.folders.keep_checkpoint(run, _save(tmp_path / f"s{t}", t))
    kept = ["checkpoint_000001", "checkpoint_000002"]
    bad = _save(tmp_path / "bad", 3)
    flip_byte(bad / ckpt.STATE)
    with pytest.raises(ckpt.CheckpointError, match="bad/state.pt: contents do not match"):
        runner.folders.keep_checkpoint(run, bad)
    assert sorted(p.name for p in run.iterdir()) == kept

    # the staged checkpoint verifies but its copy into the run folder does not
    copytree = runner.folders.shutil.copytree

    def truncating_copy(src, dst, **kw):
        copytree(src, dst, **kw)
        state = Path(dst) / ckpt.STATE
        state.write_bytes(state.read_bytes()[:100])

    monkeypatch.setattr(runner.folders.shutil, "copytree", truncating_copy)
    for t in (2, 3):  # checkpoint 2 written again by a restart, and a successor
        with pytest.raises(ckpt.CheckpointError, match="state.pt: contents do not match"):
            runner.folders.keep_checkpoint(run, _save(tmp_path / f"again{t}", t))
        assert sorted(p.name for p in run.iterdir()) == kept
        assert [_B(run / name) for name in kept] == [1, 2]
    monkeypatch.undo()

    again = ckpt.save(tmp_path / "new2", {"t": 2, "B": torch.full((4, 2), 20.0)}, "x = 1\n", "fp")
    assert runner.folders.keep_checkpoint(run, again) == run / "checkpoint_000002"
    assert _B(run / "checkpoint_000002") == 20  # replaced once the new copy verified
    runner.folders.keep_checkpoint(run, _save(tmp_path / "s3", 3))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]


def test_trainer_passes_collective_timeout_to_torch_config(tmp_path, monkeypatch):
    """Ray's TorchConfig sets the process group's timeout; without it a dead peer hangs a
    collective for Ray's default of 30 minutes. Built, never fitted: no Ray cluster starts."""
    import ray

    # build_trainer sets it; restored after
    monkeypatch.setenv(runner.ray_train.START_TIMEOUT_ENV, "0")
    # the controller's poll: shortened unless the user set it (conftest.py sets it for the suite)
    monkeypatch.delenv(runner.ray_train.POLL_ENV)
    cfg = config.load(DEBUG, ["scaling.collective_timeout_s=7",
                              f"log.run_dir={json.dumps(str(tmp_path))}"])
    trainer = runner.build_trainer(cfg, tmp_path / "r")
    assert os.environ[runner.ray_train.POLL_ENV] == runner.ray_train.POLL_S
    monkeypatch.setenv(runner.ray_train.POLL_ENV, "3")
    trainer = runner.build_trainer(cfg, tmp_path / "r")
    assert os.environ[runner.ray_train.POLL_ENV] == "3"
    assert trainer.backend_config.timeout_s == 7
    assert trainer.backend_config.backend == "gloo"
    # a Tune trial's workers report their restored iteration again (loop.WorkerEnv)
    assert trainer.train_loop_config["report_restored"] is False
    tuned = runner.build_trainer(cfg, tmp_path / "t", report_restored=True)
    assert tuned.train_loop_config["report_restored"] is True
    gpu = runner.build_trainer(config.load(DEBUG, ["scaling.use_gpu=true",
                                                   f"log.run_dir={json.dumps(str(tmp_path))}"]),
                               tmp_path / "g")
    assert gpu.backend_config.backend == "nccl"
    assert gpu.scaling_config.use_gpu and gpu.scaling_config.num_workers == 1
    assert not ray.is_initialized()


def test_stale_staging_folders_of_dead_processes_only_are_removed(tmp_path):
    dead = _reaped_pid()
    old = time.time() - ckpt.STALE_AFTER_S - 10
    made = {}
    for name, age in ((f"dadh_ckpt_{dead}_a", old), (f"dadh_resume_{dead}_b", old),
                      (f"dadh_ckpt_{dead}_recent", None), (f"dadh_ckpt_{os.getpid()}_live", old),
                      ("dadh_ckpt_nopid", old), (f"other_{dead}_x", old)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"x")
        if age is not None:
            os.utime(tmp_path / name, (age, age))
        made[name] = tmp_path / name
    removed = ckpt.remove_stale_staging(tmp_path)
    assert sorted(p.name for p in removed) == [f"dadh_ckpt_{dead}_a", f"dadh_resume_{dead}_b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for n in made if n not in {p.name for p in removed})
    assert ckpt.staging_prefix("ckpt") == f"dadh_ckpt_{os.getpid()}_"
    with pytest.raises(ValueError, match="staging kind"):
        ckpt.staging_prefix("tmp")


def _reaped_pid() -> int:
    """The id of a process that has exited and been reaped."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_skip_policy_past_its_limit_says_the_limit_was_spent(tmp_path, monkeypatch, capsys):
    """A stop under train.nonfinite = skip is not the stop policy's: the one line says that
    train.max_skipped mini-batches had already been dropped."""
    from dadh_dist import cli

    monkeypatch.setenv("DADH_FAULT", "nan:0:0")  # t = 0 (outer iteration 1), rank 0
    code = cli.train_main(["--config", str(DEBUG), "scaling.use_ray=false", "train.outer_iters=1",
                           "train.num_samples=64", "train.nonfinite=skip", "train.max_skipped=0",
                           "log.tensorboard=false", f"log.run_dir={json.dumps(str(tmp_path))}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_RUN_FAILED and len(err) == 1, err
    assert err[0].startswith("error: non-finite loss on worker(s) [0] at outer iteration 1, "
                             "step 1 ")
    assert err[0].endswith("; train.nonfinite = skip had already dropped train.max_skipped = 0 "
                           "mini-batch(es) of this outer iteration")


@pytest.mark.parametrize("fault", ["full_disk", "ctrl_c"])
def test_a_checkpoint_copy_cut_short_leaves_nothing_behind(tmp_path, monkeypatch, fault):
    """A full disk (or Ctrl-C) while a checkpoint is copied into the run folder: the half copy
    goes (it held the space the disk lacks), the checkpoints before it stay, and the disk's
    error is one line saying so (it was shutil's list of every file, the half copy kept)."""
    import errno
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    runner.folders.keep_checkpoint(run, _save(tmp_path / "s1", 1))
    copytree = shutil.copytree

    def cut_short(src, dst, **kw):
        def copy(s, d):
            if Path(s).name != ckpt.STATE:
                return shutil.copy2(s, d)
            Path(d).write_bytes(Path(s).read_bytes()[:50])
            if fault == "ctrl_c":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), d)

        return copytree(src, dst, copy_function=copy, **kw)

    monkeypatch.setattr(runner.folders.shutil, "copytree", cut_short)
    if fault == "ctrl_c":
        with pytest.raises(KeyboardInterrupt):
            runner.folders.keep_checkpoint(run, _save(tmp_path / "s2", 2))
    else:
        with pytest.raises(runner.folders.uris.StorageError, match=(
                rf"^{run}: checkpoint_000002 could not be written \(No space left on device\); "
                r"the run's earlier checkpoints are kept: rerun the same command to resume "
                r"once there is room$")):
            runner.folders.keep_checkpoint(run, _save(tmp_path / "s2", 2))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_000001"]
    assert ckpt.latest_valid(run) == run / "checkpoint_000001"


def test_an_error_every_restart_repeats_stops_the_ray_run_at_once(tmp_path, monkeypatch):
    """Bad data or config, or a non-finite loss, in a worker: Ray Train restarted the group
    scaling.max_failures times, each start reloading the data to fail the same way, then said
    "run stopped after ... restart(s)", exit 1 even for bad input. Now Ray's controller stops
    the run at the first (one line; the input's fault a ConfigError, exit 2), and any other
    error (a lost worker) restarts it as before. Ray's side as its 2.60 controller runs it: the
    callback gets the workers' errors unwrapped, and the failure policy never retries the
    ControllerError it raises. Built and decided in this process: no Ray cluster starts."""
    import pickle

    import ray
    import ray.cloudpickle
    from ray.train import ControllerError, FailureConfig, WorkerGroupError
    from ray.train.v2._internal.callbacks.user_callback import UserCallbackHandler
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2._internal.execution.worker_group.poll import (
        WorkerGroupPollStatus,
        WorkerStatus,
    )

    from dadh_dist.config import ConfigError
    from dadh_dist.data import DataError

    cfg = config.load(DEBUG, [f"log.run_dir={json.dumps(str(tmp_path))}", "log.name=r",
                              "scaling.max_failures=3"])
    trainer = runner.build_trainer(cfg, tmp_path / "r")
    (stop,) = [c for c in trainer.run_config.callbacks if type(c).__name__ == "StopAtOnce"]
    stop = ray.cloudpickle.loads(ray.cloudpickle.dumps(stop))  # as the controller gets it
    handler = UserCallbackHandler([stop], train_run_context=None)
    policy = DefaultFailurePolicy(FailureConfig(max_failures=3))

    def poll(errors: dict) -> WorkerGroupPollStatus:  # as the workers' threads hand them over
        return WorkerGroupPollStatus({rank: WorkerStatus(
            running=False, error=UserExceptionWithTraceback(e, "Traceback ...")
        ) for rank, e in errors.items()})

    handler.after_worker_group_poll_status(poll({1: RuntimeError("connection reset")}))
    assert policy.make_decision(WorkerGroupError("", {1: DataError("x")})) == \
        FailureDecision.RETRY  # what Ray does with any worker's error
    monkeypatch.setattr(runner.ray_train, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(runner.ray_train, "check_fits", lambda *a: None)
    for error, user in ((DataError("list.txt:3: image a.png is unreadable"), True),
                        (ConfigError("objective.bits: must be >= 1, got 0"), True),
                        (loop.NonFiniteLoss("loss_f is nan at outer iteration 1"), False)):
        with pytest.raises(ControllerError) as raised:
            handler.after_worker_group_poll_status(poll({0: RuntimeError("peer gone"),
                                                         1: error}))
        assert policy.make_decision(raised.value) == FailureDecision.RAISE
        failed = pickle.loads(pickle.dumps(raised.value))  # as the driver gets it
        line = (f"worker 1: {type(error).__name__}: {error}; not restarted (a restart fails "
                "the same way)")
        assert failed.controller_failure.user is user and str(failed.controller_failure) == line
        assert runner.ray_train.error_line(failed) == line  # a Tune trial's row

        def fit(trainer, failed=failed):
            raise failed

        monkeypatch.setattr(runner.ray_train, "fit", fit)
        with pytest.raises(ConfigError if user else runner.RunFailed) as stopped:
            runner.run_ray(cfg)
        assert str(stopped.value) == f"run stopped: {line}; no checkpoint was written"
    assert not ray.is_initialized()


def test_a_ray_run_and_a_tune_trial_hold_their_runs_lock(tmp_path, monkeypatch):
    """run_ray is refused while another process drives the run, before Ray starts; a Tune
    trial waits for the lock a little (an interrupted attempt of it that Tune is still
    stopping), then runs, or is refused past the wait."""
    import fcntl
    import threading

    import ray
    import ray.tune.integration.ray_train
    from ray import tune

    from dadh_dist.config import ConfigError
    from dadh_dist.sweep import runner as sweeps

    def hold(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / runner.folders.LOCK, "a")
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fh

    cfg = config.load(DEBUG, [f"log.run_dir={json.dumps(str(tmp_path))}", "log.name=r"])
    with hold(tmp_path / "r"):
        with pytest.raises(ConfigError, match=r"^log.name: run 'r' in .* is being trained by "
                                              "another process on this machine"):
            runner.run_ray(cfg)
    assert not ray.is_initialized() and not (tmp_path / "r" / "config.toml").exists()

    class Context:
        def get_trial_id(self):
            return "x"

    fitted = []

    class Trainer:
        def fit(self):
            fitted.append(time.monotonic())

    monkeypatch.setattr(tune, "get_context", Context)  # a trial of Tune, without Tune
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", object)
    monkeypatch.setattr(runner, "build_trainer", lambda *a, **k: Trainer())
    sweep = {"base": cfg.to_dict(), "folder": str(tmp_path / "sweep"), "cpus_per_worker": 1.0}
    trial = tmp_path / "sweep" / "trial_x"
    held = hold(trial)
    threading.Timer(0.5, held.close).start()  # the earlier attempt's process ends
    start = time.monotonic()
    sweeps.trial_main({}, sweep)
    assert len(fitted) == 1 and fitted[0] - start >= 0.5
    assert (trial / "config.toml").is_file()
    monkeypatch.setattr(runner.folders, "TRIAL_LOCK_WAIT_S", 0.3)
    with hold(trial), pytest.raises(ConfigError, match="run 'trial_x' in .* is being trained"):
        sweeps.trial_main({}, sweep)
    assert len(fitted) == 1
