"""What the tests share about the repository: its paths and how to run one of its jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.toml"
"""The tiny config that learns in seconds (digits, 16 bits): every end-to-end test starts here."""


def job_args(name: str, *args) -> list[str]:
    """The command line of `python jobs/<name>.py ARGS...`."""
    return [sys.executable, str(ROOT / "jobs" / f"{name}.py"), *map(str, args)]


def job_env(**extra: str) -> dict:
    """This process's environment with `extra` on top, Python's warnings silenced (tests read
    stderr line by line)."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", **extra}


def job(name: str, *args, timeout: float = 300, env: dict | None = None,
        **kw) -> subprocess.CompletedProcess:
    """`python jobs/<name>.py ARGS...` as a user runs it, stdout and stderr captured as text;
    `env` holds extra variables."""
    return subprocess.run(job_args(name, *args), capture_output=True, text=True,
                          timeout=timeout, env=job_env(**(env or {})), **kw)
