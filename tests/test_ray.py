"""Real Ray Train runs (kept to a handful: each costs ~15 s). Ray stays on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import _s3
import pytest
import torch
from _nontrivial import assert_learned, assert_same_run
from _repo import DEBUG

from dadh_dist import checkpoint as ckpt
from dadh_dist import config, storage, uris
from dadh_dist import run as runner
from dadh_dist.run.session import ensure_ray

pytestmark = pytest.mark.slow  # starts a Ray cluster



def _cfg(run_dir, name, *extra):
    return config.load(DEBUG, [f"log.run_dir={json.dumps(str(run_dir))}", f"log.name={name}",
                               "train.outer_iters=3", "scaling.collective_timeout_s=60", *extra])


def _B(folder: Path) -> torch.Tensor:
    state, _ = ckpt.load(ckpt.latest_valid(folder))
    return state["B"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # fake S3 credentials for the remote-storage test: workers inherit the environment Ray
    # starts with, as they would inherit a node's real credentials
    with _s3.credentials():
        # as jobs/train.py starts it: on loopback, each worker pinned to this cluster (other Ray
        # instances run on this machine at the same time, see conftest.py)
        ensure_ray(num_cpus=2, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted in-process run (1 worker): the result both Ray runs must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    final = runner.run_local(_cfg(tmp, "ref", "scaling.use_ray=false"))
    assert_learned(final)
    return final, _B(tmp / "ref")


# rank 1 dies in outer iteration 3's mini-batch steps, then rank 0 dies between checkpoint 3's
# files and its manifest: one fault per attempt (each fires once). A kill inside the code step
# restarts the same way (test_faults.py kills a process there)
FAULTS = ("streams:2:1", "checkpoint:2:0")
# Ray Train's controller polls at its default interval (2 s, longer than a debug iteration; the
# suite shortens it, conftest.py): a restart must still resume from the newest checkpoint on
# storage, registered or not
DEFAULT_POLL = "2.0"


def test_ray_worker_killed_mid_run_restarts_then_stops_and_resumes_by_name(
        tmp_path, ray_local, reference, monkeypatch):
    """Stream-parallel under Ray Train (f on worker 0, g on worker 1, gloo), one restart allowed.
    Rank 1 dies in outer iteration 3's mini-batch steps: Ray restarts the group from the newest
    checkpoint. Rank 0 then dies between checkpoint 3's files and its manifest: past
    max_failures, the run stops with one line. The same command again resumes from the newest
    valid checkpoint and ends as the straight run of one process that trains both streams.
    (A plain-DDP Ray run: test_lost_node.py's elastic run.)"""
    monkeypatch.setenv("DADH_FAULT", ",".join(f"kill:{f}" for f in FAULTS))
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", DEFAULT_POLL)
    cfg = _cfg(tmp_path, "ft", "scaling.num_workers=2", "scaling.max_failures=1",
               "scaling.stream_parallel=true")
    with pytest.raises(runner.RunFailed, match="run stopped"):
        runner.run_ray(cfg)
    for fault in FAULTS:
        marker = ".fault_" + fault.replace(":", "_")
        assert (tmp_path / "ft" / marker).exists(), f"the fault {fault} never fired"
    assert not (tmp_path / "ft" / "final_metrics.json").exists()
    final = runner.run_ray(cfg)
    # resumed, not started over (which would give the same B: the loop is deterministic), and
    # from the newest valid checkpoint: 2, whether or not Ray's controller had registered it
    # before the kill; checkpoint 3 never got its manifest
    assert final["resumed_at"] == 2 and final["workers"] == 2
    ref_final, ref_B = reference
    assert_same_run(_B(tmp_path / "ft"), ref_B, final, ref_final)
    state, _ = ckpt.load(ckpt.latest_valid(tmp_path / "ft"))
    assert state["opt_f"]["state"] and state["opt_g"]["state"]  # rank 0 saved g's too
    # what Ray never registered (the killed attempts' newest, half-written 3) is pruned: left
    # are the two newest and what Ray's record still lists (its next fit restores those names)
    run = tmp_path / "ft"
    kept = {p.name for p in run.glob("checkpoint_*") if p.is_dir()}
    listed = {r["checkpoint_dir_name"] for r in json.loads(
        (run / runner.ray_train.RAY_SNAPSHOT).read_text())["checkpoint_results"]}
    newest = sorted(kept, key=lambda n: ckpt.verify(run / n)["t"])[-2:]  # all verify
    assert kept == listed | set(newest), (sorted(kept), sorted(listed))


def test_ray_run_stored_on_s3(tmp_path, ray_local, reference, monkeypatch):
    """Two Ray workers (stream-parallel, so the float sums are one process's) with log.run_dir
    an s3:// URI: Ray Train stores the checkpoints through the URI's filesystem, rank 0
    publishes TensorBoard and metrics, and the result is the one local process's."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    monkeypatch.setenv("DADH_MIRROR_DIR", str(tmp_path / "mirrors"))
    with _s3.bucket() as uri:
        final = runner.run_ray(_cfg(uri("runs"), "s3run", "scaling.num_workers=2",
                                         "scaling.stream_parallel=true"))
        run = uri("runs/s3run")
        assert final["run_dir"] == run and final["workers"] == 2
        ref_final, ref_B = reference
        (t, name), *_ = storage.checkpoints(run)
        assert t == 3
        got = storage.fetch_checkpoint(uris.join(run, name), tmp_path / name)
        assert_same_run(ckpt.load(got)[0]["B"], ref_B, final, ref_final)
        files = [f for f, _ in uris.list_files(run)]
        assert "config.toml" in files and "final_metrics.json" in files
        assert any(f.startswith("tb/events.out.tfevents") for f in files)
