"""`ray job submit` of jobs/train.py to a local head on 127.0.0.1 (its own module, so that no
in-process Ray from another test module is alive while the head runs)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from _ray_nodes import ray_bin, ray_env, start_head
from _repo import ROOT

pytestmark = pytest.mark.slow  # starts a Ray cluster



def test_ray_job_submit_on_local_head(tmp_path):
    # the head runs in a session of its own and is torn down by it: never `ray stop`, which
    # would stop every Ray on the machine
    env = ray_env()
    run_dir = tmp_path / "runs"
    head, _ = start_head(2, env)
    try:
        head.wait_started()
        for _ in range(12):  # the head's job agent can take a while to come up on a busy box
            proc = subprocess.run(
                [ray_bin(), "job", "submit", "--address", head.dashboard_url,
                 "--working-dir", str(ROOT), "--", "python", "jobs/train.py", "--config",
                 "configs/debug_cpu.toml", f"log.run_dir={json.dumps(str(run_dir))}",
                 "log.name=submitted", "train.outer_iters=2"],
                capture_output=True, text=True, timeout=400, env=env, cwd=ROOT,
            )
            out = proc.stdout + proc.stderr
            if "No available agent" not in out:
                break
            time.sleep(5)
        assert proc.returncode == 0, out[-3000:]
        assert "succeeded" in out
        assert out.count("iter 2/2") == 1  # the progress lines reach `ray job logs`, once
        assert "Reporting training result" not in out  # Ray's per-report INFO line is off
        metrics = json.loads((run_dir / "submitted" / "final_metrics.json").read_text())
        assert 0.0 < metrics["map_all_fg"] <= 1.0
    finally:
        head.kill()
