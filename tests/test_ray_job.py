"""`ray job submit` of jobs/train.py to a local head on 127.0.0.1 (its own module, so that no
in-process Ray from another test module is alive while the head runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a Ray cluster

ROOT = Path(__file__).resolve().parents[1]


def test_ray_job_submit_on_local_head(tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    if not Path(ray_bin).exists():
        ray_bin = shutil.which("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    run_dir = tmp_path / "runs"
    try:
        subprocess.run(
            [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
            check=True, capture_output=True, text=True, timeout=120, env=env,
        )
        for _ in range(12):  # the head's job agent can take a while to come up on a busy box
            proc = subprocess.run(
                [ray_bin, "job", "submit", "--address", "http://127.0.0.1:8265",
                 "--working-dir", str(ROOT), "--", "python", "jobs/train.py", "--config",
                 "configs/debug_cpu.toml", f"log.run_dir={json.dumps(str(run_dir))}",
                 "log.name=submitted"],
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
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)
        time.sleep(1)
