"""Rank-0 side effects of a run: console progress, TensorBoard events, final metrics
(docs/design.md §8).

Every other rank gets a `Monitor(enabled=False)` whose methods do nothing, so the loop calls
them unconditionally.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

from dadh_dist.checkpoint import write_atomic


def say(line: str) -> None:
    """One line on stdout, flushed. Not print(): Ray Train patches print in its workers to also
    log the line, which reaches the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Monitor:
    def __init__(self, run_dir: Path | None, enabled: bool, tensorboard: bool, config_toml: str,
                 resumed_at: int = 0):
        """`resumed_at`: the outer iteration this attempt starts at (0: from scratch). An
        earlier attempt may have logged steps past it before it stopped: the writer opens with
        a purge marker, by which TensorBoard hides the earlier events of every step this attempt
        logs again (from step resumed_at + 1; from scratch, all of them, the config text too),
        so each step keeps one value, the attempt's that went on."""
        self.enabled = enabled and run_dir is not None
        self.run_dir = run_dir
        self.writer = None
        self.start = time.time()
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"),
                                        purge_step=resumed_at + 1 if resumed_at else 0)
            if not resumed_at:  # the first attempt's config text stays (a resume has the same)
                self.writer.add_text("config", "```\n" + config_toml + "\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def pr_curve(self, step: int, tag: str, precision, recall) -> None:
        """A precision–recall figure over Hamming radii."""
        if self.writer is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(recall, precision, marker=".")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{tag} (Hamming radius 0..k)")
        ax.grid(alpha=0.3)
        self.writer.add_figure(f"pr/{tag}", fig, step)
        plt.close(fig)
        self.writer.flush()

    def progress(self, line: str) -> None:
        if self.enabled:
            elapsed = time.time() - self.start
            say(f"[{elapsed:7.1f}s] {line}")

    def write_json(self, name: str, payload: dict) -> Path | None:
        if not self.enabled:
            return None
        path = self.run_dir / name
        write_atomic(path, json.dumps(payload, indent=1, sort_keys=True).encode())
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def progress_bar(total: int, what: str, enabled: bool = True, stream=None, unit: str = "img",
                 leave: bool = True):
    """A tqdm bar on stderr (count, rate, ETA); off when `enabled` is false or the stream is not
    a terminal, so logs and pipes get no carriage-return noise."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    on = enabled and hasattr(stream, "isatty") and stream.isatty()
    size: dict = {"dynamic_ncols": True}
    try:  # a terminal that reports no size (a bare pty) would get no bar at all
        if on and os.get_terminal_size(stream.fileno()).columns == 0:
            size = {"ncols": 80, "nrows": 24}
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    return tqdm(total=total, desc=what, unit=unit, file=stream, disable=not on,
                mininterval=0.25, leave=leave, **size)
