"""Run a command with its stderr on a pseudo-terminal, as a user's shell would (progress bars)."""

from __future__ import annotations

import os
import pty
import subprocess
import threading


def stderr_on_terminal(args: list[str], timeout: float, env: dict | None = None):
    """(completed process, everything written to stderr) with stderr a pseudo-terminal."""
    primary, replica = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(primary, 4096)
            except OSError:  # the replica side closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=replica, text=True,
                          timeout=timeout, env=env)
    os.close(replica)
    reader.join(10)
    os.close(primary)
    return proc, b"".join(chunks).decode(errors="replace")
