"""The retrieval-quality table: methods × code lengths × seeds, each a normal training run.

Every cell is `python -m dadh_dist train --config <config> <method overrides> train.seed=<s>`
(the trainer of `jobs/train.py` and `dadh-train`) run in-process (no Ray, one worker) as a
subprocess, so a row of the table is reproduced by exactly the command printed next to it.
Runs that already wrote `final_metrics.json` under the same name are read back instead of
re-run, so a long table can be built over several sessions; a finished run whose saved config
differs from the planned one is reported as an error, not read back (and an unfinished one is
refused by the trainer itself).

`python jobs/quality.py --config configs/fashion_mnist_{bits}.toml --bits 12,24,32,48` prints
the Markdown table and writes it, with every run's numbers, next to the runs.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dadh_dist import config as config_mod
from dadh_dist.config import ENCODERS
from dadh_dist.run.local import worker_threads

# Each method is a set of overrides of the same code (docs/design.md §2: ADSH and the ablations are
# configurations, not forks).
METHODS: dict[str, tuple[str, ...]] = {
    "dadh": (),
    "adsh": ("objective.two_streams=false", "objective.use_pair=false", 'eval.encoders=["f"]'),
    "dadh-no-code": ("objective.use_code=false",),
    "dadh-no-pair": ("objective.use_pair=false",),
}
TRAIN = ["-m", "dadh_dist", "train"]
"""The trainer, as the installed package runs it (no repository layout assumed)."""


@dataclass(frozen=True)
class Cell:
    method: str
    bits: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_{self.bits}b_s{self.seed}"


@dataclass
class Plan:
    config: str
    """Config path; `{bits}` is replaced by the code length."""
    out: Path
    overrides: list[str] = field(default_factory=list)
    """Extra overrides for every run (the shared budget)."""
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Extra overrides for one method only (e.g. ADSH at the same wall time)."""
    threads: int | None = None
    """torch threads per run: `scaling.cpus_per_worker`, which sets them in the in-process
    trainer (None: the config's). An override in `overrides` wins."""

    def config_path(self, cell: Cell) -> str:
        return self.config.format(bits=cell.bits)

    def cell_overrides(self, cell: Cell) -> list[str]:
        """Every override of one cell's run, in the order the trainer applies them (the code
        length too: a config without `{bits}` in its name, e.g. the grids', still varies it)."""
        if cell.method not in METHODS:
            raise ValueError(f"method {cell.method!r}: known methods are {', '.join(METHODS)}")
        threads = [] if self.threads is None else [f"scaling.cpus_per_worker={self.threads}"]
        return [
            "scaling.use_ray=false", *threads, f"objective.bits={cell.bits}",
            f"train.seed={cell.seed}", f"log.run_dir={self.out}", f"log.name={cell.name}",
            *METHODS[cell.method],
            *self.overrides,
            *self.method_overrides.get(cell.method, []),
        ]

    def command(self, cell: Cell) -> list[str]:
        """The command line that reproduces the cell (as recorded in rows.json)."""
        return ["python", *TRAIN, "--config", self.config_path(cell),
                *self.cell_overrides(cell)]


def metrics_path(plan: Plan, cell: Cell) -> Path:
    return plan.out / cell.name / "final_metrics.json"


def run_cell(plan: Plan, cell: Cell, train: bool = True) -> dict:
    """Run one cell (or read it back when it already finished); returns its row. With
    `train=False` an unfinished cell is only reported as missing."""
    cmd = plan.command(cell)
    done = metrics_path(plan, cell)
    row = {"method": cell.method, "bits": cell.bits, "seed": cell.seed,
           "command": shlex.join(cmd)}
    if not done.is_file() and not train:
        row["error"] = "not run yet"
        return row
    if not done.is_file():
        plan.out.mkdir(parents=True, exist_ok=True)
        log = plan.out / f"{cell.name}.log"
        # the run's own thread count (its config's, as the trainer sets it) for every
        # OpenMP/MKL pool, torch's included, that reads the environment
        threads = str(worker_threads(config_mod.load(plan.config_path(cell),
                                                      plan.cell_overrides(cell))))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        t0 = time.time()
        with open(log, "w") as fh:
            rc = subprocess.call([sys.executable, *TRAIN, "--config",
                                  plan.config_path(cell), *plan.cell_overrides(cell)], stdout=fh,
                                 stderr=subprocess.STDOUT, env=env)
        row["process_wall_s"] = time.time() - t0
        if rc != 0 or not done.is_file():
            tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            row["error"] = f"exit {rc}: {tail[0]} (log: {log})"
            return row
    else:
        changed = _changed_config(plan, cell)
        if changed:
            row["error"] = (f"{plan.out / cell.name} finished with another config ({changed}); "
                            "use another --out")
            return row
    row["metrics"] = json.loads(done.read_text())
    return row


def _changed_config(plan: Plan, cell: Cell) -> str:
    """'' when the finished cell's saved config is the one planned now; else what differs."""
    planned = config_mod.load(plan.config_path(cell), plan.cell_overrides(cell))
    path = plan.out / cell.name / "config.toml"
    if not path.is_file():
        return "its config.toml is missing"
    saved = config_mod.load(path)
    if saved.fingerprint() == planned.fingerprint():
        return ""
    return ", ".join(saved.differences(planned)[:3]) or "scaling"


def run_plan(plan: Plan, cells: list[Cell], parallel: int = 1, progress=print,
             train: bool = True) -> list[dict]:
    """Run every cell, `parallel` at a time (each on `plan.threads` threads)."""
    def one(cell: Cell) -> dict:
        row = run_cell(plan, cell, train)
        status = row.get("error") or _summary(row["metrics"])
        progress(f"{cell.name}: {status}")
        return row

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        rows = list(pool.map(one, cells))
    return rows


def _summary(m: dict) -> str:
    keys = sorted(k for k in m if k.startswith("map_"))
    return ", ".join(f"{k}={m[k]:.4f}" for k in keys) + f", wall {m.get('wall_s', 0):.0f}s"


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def map_key(metrics: dict) -> str:
    """mAP@k when the run reported one (multi-label protocols), else mAP@all."""
    topk = [k for k in metrics if k.startswith("map_at_")]
    return topk[0].rsplit("_", 1)[0] if topk else "map_all"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (method, bits), mean ± sample std over seeds per encoder."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if "metrics" in row:
            groups.setdefault((row["method"], row["bits"]), []).append(row["metrics"])
    if not groups:
        return "(no finished runs)\n"
    some = next(iter(groups.values()))[0]
    key = map_key(some)
    p_key = next((k.rsplit("_", 1)[0] for k in some if k.startswith("p_at_")), "p_at_1000")
    head = (f"| method | bits | seeds | {key} f | {key} g | {key} f+g | {p_key} (best) "
            f"| wall s |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    order = {m: i for i, m in enumerate(METHODS)}
    for (method, bits), ms in sorted(groups.items(), key=lambda kv: (kv[0][1],
                                                                      order[kv[0][0]])):
        cells = [_mean_spread([m[f"{key}_{e}"] for m in ms if f"{key}_{e}" in m])
                 for e in ENCODERS]
        best = max((e for e in ENCODERS if f"{key}_{e}" in ms[0]),
                   key=lambda e: statistics.mean(m[f"{key}_{e}"] for m in ms))
        p = _mean_spread([m[f"{p_key}_{best}"] for m in ms])
        wall = statistics.mean(m.get("wall_s", 0.0) for m in ms)
        lines.append(f"| {method} | {bits} | {len(ms)} | {' | '.join(cells)} | {p} ({best}) "
                     f"| {wall:.0f} |")
    return head + "\n".join(lines) + "\n"


def write(plan: Plan, rows: list[dict]) -> Path:
    """rows.json (every run, its command and numbers) and table.md under the plan's folder."""
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "rows.json").write_text(json.dumps(rows, indent=1, sort_keys=True))
    path = plan.out / "table.md"
    path.write_text(table(rows))
    return path
