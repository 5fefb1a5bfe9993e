"""Lost node (docs/design.md §3): a two-node Ray cluster on this machine, one training worker on
each node, and the second node killed whole (raylet, agents, worker) at a known outer iteration.

- With an elastic range (scaling.min_workers=1, num_workers=2) the run goes on with the worker
  left, from its last checkpoint, and finishes: the same algorithm, B's rows split over 1 worker.
- With a fixed size (2 workers) it stops within a bound, with one clear line, never hangs.

After them, `ray job submit` runs jobs/train.py on the head as a user would.

One head for the module and a fresh second node per test, 1 CPU each: with 1 CPU per worker the
two workers of a group land one per node. The first test shows the resize on gloo without Ray:
a checkpoint written by 2 workers, resumed by 1, ends exactly where a 1-worker run ends.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _checkpoints import keep_merged
from _gloo import run_workers
from _nontrivial import assert_learned, assert_same_run
from _ray_nodes import (
    kill_session,
    listening_beyond_loopback,
    ray_bin,
    ray_env,
    start_head,
    start_worker_node,
    wait_for_nodes,
)
from _repo import DEBUG, ROOT

from dadh_dist import checkpoint as ckpt
from dadh_dist import config, loop, storage
from dadh_dist import run as runner

pytestmark = pytest.mark.slow



def _cfg(run_dir: Path, name: str, *extra: str) -> config.Config:
    return config.load(DEBUG, [f"log.run_dir={json.dumps(str(run_dir))}", f"log.name={name}",
                               "train.outer_iters=2", "scaling.use_ray=false",
                               "log.tensorboard=false", *extra])


class _Stop(Exception):
    """Both ranks leave the run together after the iteration the test stops at."""


def _two_workers_until(rank, world, run_dir, stop_after):
    """The run on a 2-process gloo group, stopped after `stop_after` outer iterations."""
    from dadh_dist.distributed import TorchCollectives

    folder = Path(run_dir) / "w2"

    def report(metrics, staged):
        keep_merged(folder, staged, metrics)
        if metrics["t"] >= stop_after:
            raise _Stop

    cfg = _cfg(Path(run_dir), "w2")
    # stream-parallel (f on rank 0, g on rank 1): each stream's sums are one process's, so the
    # resumed run can equal the one-worker run bit for bit (plain DDP's cannot: _nontrivial.py)
    cfg.scaling.num_workers, cfg.scaling.stream_parallel = world, True
    with pytest.raises(_Stop):
        loop.train(cfg, loop.WorkerEnv(
            collectives=TorchCollectives(), report=report, run_dir=folder if rank == 0 else None))


def test_checkpoint_of_two_workers_resumed_by_one_equals_one_worker_run(tmp_path):
    straight = runner.run_local(_cfg(tmp_path, "w1"))
    assert_learned(straight)
    run_workers(_two_workers_until, 2, str(tmp_path), 1, timeout_s=60)
    first = ckpt.latest_valid(tmp_path / "w2")
    state, _ = ckpt.load(first)
    assert (state["t"], state["workers"]) == (1, 2)
    # the same run (name and config) goes on in one process: resume from the 2-worker checkpoint
    resumed = runner.run_local(_cfg(tmp_path, "w2"))
    assert (resumed["resumed_at"], resumed["workers"]) == (1, 1)
    B_straight = ckpt.load(ckpt.latest_valid(tmp_path / "w1"))[0]["B"]
    B_resumed = ckpt.load(ckpt.latest_valid(tmp_path / "w2"))[0]["B"]
    assert_same_run(B_resumed, B_straight, resumed, straight)
    assert torch.equal(B_resumed, B_straight)


# ---------------------------------------------------------------------------------------------
# A real two-node cluster


@pytest.fixture(scope="module")
def head_node():
    """The head (1 CPU). Its GCS declares a silent node dead after 3 missed 1 s health checks
    instead of Ray's default of about 15 s, to keep the tests short."""
    env = ray_env(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    node, address = start_head(1, env)
    node.address = address
    try:
        node.wait_started()
        yield node
    finally:
        node.kill()


@pytest.fixture(scope="module")
def head(head_node) -> str:
    """The head's GCS address."""
    return head_node.address


@pytest.fixture
def second_node(head_node):
    env = ray_env()
    node = start_worker_node(head_node.address, 1, env)
    try:
        node.wait_started()
        wait_for_nodes(head_node.address, 2, env, free_cpus=2)  # both idle: a run starts on both
        # both nodes on 127.0.0.1 only (_ray_nodes: nodes and drivers in Ray's single-machine mode)
        assert listening_beyond_loopback(head_node.sid) + listening_beyond_loopback(node.sid) == []
        yield node
    finally:
        node.kill()


def _train(address: str, run_dir: Path, name: str, fault: str, *overrides: str,
           timeout_s: float, env: dict | None = None) -> tuple[int, str, float]:
    """jobs/train.py as a driver of the cluster; (exit code, output, time it ended). The output,
    each line stamped with the seconds since launch, is kept in <run_dir>/<name>.log."""
    args = [sys.executable, "jobs/train.py", "--config", str(DEBUG),
            f"log.run_dir={json.dumps(str(run_dir))}", f"log.name={name}",
            "log.tensorboard=false", "train.eval_every=0", "scaling.num_workers=2",
            "scaling.cpus_per_worker=1", "scaling.collective_timeout_s=60", *overrides]
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=ROOT, env=ray_env(RAY_ADDRESS=address, DADH_FAULT=fault,
                                                       **(env or {})),
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    stamped: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            stamped.append(f"{time.time() - t0:6.1f}s | {line}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        proc.wait()
    ended = time.time()
    reader.join(timeout=10)
    out = "".join(lines)
    (run_dir / f"{name}.log").write_text("".join(stamped))
    if ended - t0 >= timeout_s:
        pytest.fail(f"the run hung: no end after {timeout_s} s\n{out[-4000:]}")
    return proc.returncode, out, ended


KILL_AT = 2  # outer iteration whose start the second node does not survive


# Ray Train's own controller poll (the suite shortens it, conftest.py): a checkpoint reported just
# before a loss may then still be unregistered, which the resume rule must get right
DEFAULT_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0"}


def test_elastic_run_loses_a_node_and_finishes_on_the_other(head, second_node, tmp_path):
    code, out, _ = _train(
        head, tmp_path, "elastic", f"node:{KILL_AT}:{second_node.sid}",
        f"train.outer_iters={KILL_AT + 1}",
        "scaling.min_workers=1", "scaling.max_failures=2", "scaling.start_timeout_s=15",
        timeout_s=240, env=DEFAULT_POLL)
    assert code == 0, out[-6000:]
    assert (tmp_path / "elastic" / f".fault_node_{KILL_AT}_{second_node.sid}").exists(), \
        "the second node was never killed\n" + out[-6000:]
    assert second_node.proc.poll() is not None, "the second node outlived the fault"
    final = json.loads((tmp_path / "elastic" / "final_metrics.json").read_text())
    assert final["workers"] == 1
    # checkpoint KILL_AT was on storage before the kill (report returns after the upload); the
    # restart resumes from it whether or not Ray's controller had registered it
    assert final["resumed_at"] == KILL_AT
    assert "; 2 worker(s)" in out  # the first attempt ran on both nodes
    assert "resumed from checkpoint_" in out, out[-6000:]
    assert (f" after outer iteration {final['resumed_at']} (written by 2 worker(s)), now 1 "
            "worker(s)" in out)
    assert f"iter {KILL_AT + 1}/{KILL_AT + 1}" in out
    state, _ = ckpt.load(ckpt.latest_valid(tmp_path / "elastic"))
    assert (state["t"], state["workers"]) == (KILL_AT + 1, 1)
    B = state["B"]
    assert B.shape == (final["database"], 16)
    assert set(B.unique().tolist()) == {-1, 1}
    assert_learned(final)
    # after the shrink the run goes on as one process does from the same checkpoint: its last
    # outer iteration, redone in-process from checkpoint KILL_AT (which the shrunk run resumed
    # too), gives the same B and metrics (the
    # whole run cannot be compared with one process's bit for bit: iterations 1-2 summed the
    # gradient over two workers, tests/_nontrivial.py; the shrink's re-split of a two-worker
    # checkpoint is test_checkpoint_of_two_workers_resumed_by_one_equals_one_worker_run's)
    last = dict(storage.checkpoints(str(tmp_path / "elastic")))[KILL_AT]
    shutil.copytree(tmp_path / "elastic" / last, tmp_path / "tail" / f"checkpoint_{KILL_AT:06d}")
    tail = runner.run_local(_cfg(tmp_path, "tail", f"train.outer_iters={KILL_AT + 1}",
                                 "train.eval_every=0"))
    assert (tail["resumed_at"], tail["workers"]) == (KILL_AT, 1)
    assert torch.equal(B, ckpt.load(ckpt.latest_valid(tmp_path / "tail"))[0]["B"])
    for key in ("map_all_f", "map_all_g", "map_all_fg"):
        assert tail[key] == final[key], key


def test_fixed_size_run_fails_within_a_bound(head, second_node, tmp_path):
    max_failures, start_timeout_s = 1, 5
    code, out, ended = _train(
        head, tmp_path, "fixed", f"node:1:{second_node.sid}", "train.outer_iters=3",
        f"scaling.max_failures={max_failures}", f"scaling.start_timeout_s={start_timeout_s}",
        timeout_s=180)
    marker = tmp_path / "fixed" / f".fault_node_1_{second_node.sid}"
    assert marker.exists(), "the second node was never killed\n" + out[-4000:]
    assert code == 1, out[-6000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert errors, out[-6000:]
    assert errors[-1].startswith(
        f"error: run stopped: Ray Train could not (re)start 2 worker(s) within "
        f"scaling.start_timeout_s={start_timeout_s} s, {max_failures + 1} time(s) (a lost node?)"
        "; set scaling.min_workers to go on with fewer workers; last checkpoint "), errors[-1]
    # The restarts wait (max_failures + 1) x start_timeout_s = 10 s for the lost node, detection and
    # teardown take a few more (13 s in all, measured). Ray alone would wait for the node forever.
    assert ended - marker.stat().st_mtime < (max_failures + 1) * start_timeout_s + 30


def test_ray_job_submit_to_the_head(head_node, tmp_path):
    """`ray job submit --working-dir .` of jobs/train.py, as a user submits to a cluster (the
    head alone: its 1 CPU holds the run's one worker).

    Last in the module: the first Ray Train run on a cluster creates its AutoscalingCoordinator,
    a detached actor that an elastic run asks how many workers fit, and that refreshes its view
    of the nodes every 20 s. Created here, before the second node joined, it would tell the
    elastic test's run that one worker fits, and that run would never reach the second node."""
    env = ray_env()
    run_dir = tmp_path / "runs"
    for _ in range(12):  # the head's job agent can take a while to come up on a busy box
        proc = subprocess.run(
            [ray_bin(), "job", "submit", "--address", head_node.dashboard_url,
             "--working-dir", str(ROOT), "--", "python", "jobs/train.py", "--config",
             "configs/debug_cpu.toml", f"log.run_dir={json.dumps(str(run_dir))}",
             "log.name=submitted", "train.outer_iters=1"],
            capture_output=True, text=True, timeout=400, env=env, cwd=ROOT,
        )
        out = proc.stdout + proc.stderr
        if "No available agent" not in out:
            break
        time.sleep(5)
    assert proc.returncode == 0, out[-3000:]
    assert "succeeded" in out
    assert out.count("iter 1/1") == 1  # the progress lines reach `ray job logs`, once
    assert "Reporting training result" not in out  # Ray's per-report INFO line is off
    metrics = json.loads((run_dir / "submitted" / "final_metrics.json").read_text())
    assert 0.0 < metrics["map_all_fg"] <= 1.0
