"""`jobs/train.py` as a user runs it, in one process (scaling.use_ray=false): what it prints and
what final_metrics.json holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.toml"


def test_train_script_prints_its_run_folder_and_writes_final_metrics(tmp_path):
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(DEBUG),
         "scaling.use_ray=false", f"log.run_dir={json.dumps(str(tmp_path))}", "--name", "cli",
         "objective.bits=12", "--batch-size", "16"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "cli"
    lines = proc.stdout.splitlines()
    assert f"run folder: {run}" in lines
    T = tomllib.loads(DEBUG.read_text())["train"]["outer_iters"]
    progress = [line.split("] ", 1)[1] for line in lines if "] iter " in line]
    # one line per outer iteration
    assert [line.split()[1] for line in progress] == [f"{t}/{T}" for t in range(1, T + 1)]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["bits"] == 12 and final["outer_iters"] == T and final["workers"] == 1
    assert 0 < final["wall_s"] < elapsed
    assert final["database"] + final["queries"] + 100 == 1797  # digits: 100 validation images
    shown = dict(item.split("=") for item in lines[-1].removeprefix("final metrics: ").split(", "))
    assert float(shown["map_all_fg"]) == round(final["map_all_fg"], 4)
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["objective"]["bits"] == 12 and saved["scaling"]["use_ray"] is False
    # --name and --batch-size are log.name and train.batch_size
    assert saved["log"]["name"] == "cli" and saved["train"]["batch_size"] == 16
