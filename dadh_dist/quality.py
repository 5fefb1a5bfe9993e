"""The retrieval-quality table: methods × code lengths × seeds, each a normal training run.

Every cell is `python -m dadh_dist train --config <config> <method overrides> train.seed=<s>`
(the trainer of `jobs/train.py` and `dadh-train`) run in-process (no Ray, one worker) as a
subprocess, so a row of the table is reproduced by exactly the command printed next to it.
Runs that already wrote `final_metrics.json` under the same name are read back instead of
re-run, so a long table can be built over several sessions, and the table covers every cell
finished under the same folder with the same budget; a finished run whose saved config differs
from the planned one (its thread count aside) is refused, not read back (and an unfinished one
is refused by the trainer itself), and so is a config file that sets what a method sets
(METHOD_KEYS) otherwise than the method runs it.

`python jobs/quality.py --config configs/fashion_mnist_{bits}.toml --bits 12,24,32,48` prints
the Markdown table and writes it, with every run's numbers, next to the runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dadh_dist import config as config_mod
from dadh_dist.config import ENCODERS, ConfigError
from dadh_dist.run.local import worker_threads

# Each method is a set of overrides of the same code (docs/design.md §2: ADSH and the ablations are
# configurations, not forks).
METHODS: dict[str, tuple[str, ...]] = {
    "dadh": (),
    "adsh": ("objective.two_streams=false", "objective.use_pair=false", 'eval.encoders=["f"]'),
    "dadh-no-code": ("objective.use_code=false",),
    "dadh-no-pair": ("objective.use_pair=false",),
}
METHOD_KEYS = frozenset(o.split("=", 1)[0] for method in METHODS.values() for o in method)
"""The keys that make a method what it is: picked with --methods, never overridden."""
CELL_KEYS = {
    "train.seed": "--seeds",
    "objective.bits": "--bits",
    "log.run_dir": "--out",
    "log.name": "--out (each cell's folder is named after the cell)",
    "scaling.cpus_per_worker": "--threads",
    "scaling.use_ray": "nothing: every cell runs in-process, without Ray",
}
"""The keys every cell sets itself (Plan.cell_overrides), with what sets them instead."""
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
    threads: float | None = None
    """torch threads per run: `scaling.cpus_per_worker`, which sets them in the in-process
    trainer (None: the config's)."""

    def __post_init__(self):
        # a later override would replace what a cell sets, and every cell would be the same run
        for where, overrides in (("", self.overrides),
                                 *((f"{m}:", o) for m, o in self.method_overrides.items())):
            for key in config_mod.parse_overrides(overrides):
                if key in CELL_KEYS:
                    raise ConfigError(f"{where}{key}: each cell sets its own; use "
                                      f"{CELL_KEYS[key]}")
                if key in METHOD_KEYS:
                    raise ConfigError(f"{where}{key}: the methods set it (see quality.METHODS); "
                                      "pick them with --methods")

    def config_path(self, cell: Cell) -> str:
        # not str.format: a path may hold other braces
        return self.config.replace("{bits}", str(cell.bits))

    def cell_overrides(self, cell: Cell) -> list[str]:
        """Every override of one cell's run, in the order the trainer applies them (the code
        length too: a config without `{bits}` in its name, e.g. the grids', still varies it)."""
        if cell.method not in METHODS:
            raise ValueError(f"method {cell.method!r}: known methods are {', '.join(METHODS)}")
        threads = [] if self.threads is None else [f"scaling.cpus_per_worker={self.threads:g}"]
        return [
            "scaling.use_ray=false", *threads, f"objective.bits={cell.bits}",
            f"train.seed={cell.seed}", f"log.run_dir={self.out}", f"log.name={cell.name}",
            *METHODS[cell.method],
            *self.overrides,
            *self.method_overrides.get(cell.method, []),
        ]

    def load(self, cell: Cell) -> config_mod.Config:
        """The cell's config, as its run resolves it. A ConfigError when the file sets one of
        METHOD_KEYS that changes what is trained (eval.encoders aside) to another value than the
        cell's method runs (its own, or the default for a key it does not set): the row would
        be another method under this one's name."""
        path = self.config_path(cell)
        cfg = config_mod.load(path, self.cell_overrides(cell))
        ran, expected = cfg.flat(), config_mod.load(overrides=METHODS[cell.method]).flat()
        # what is trained, not what is reported: a file may evaluate fewer encoders
        for key in sorted(k for k in METHOD_KEYS if not k.startswith("eval.")):
            if ran[key] != expected[key]:
                found, runs = (config_mod.override_args({key: v[key]})[0] for v in (ran, expected))
                raise ConfigError(f"{path} sets {found}, which the methods set ({cell.method} "
                                  f"runs {runs}; see quality.METHODS): remove it from the file "
                                  "and pick the methods with --methods")
        return cfg

    def command(self, cell: Cell) -> list[str]:
        """The command line that reproduces the cell (as recorded in rows.json)."""
        return ["python", *TRAIN, "--config", self.config_path(cell),
                *self.cell_overrides(cell)]


def metrics_path(plan: Plan, cell: Cell) -> Path:
    return plan.out / cell.name / "final_metrics.json"


CELL_NAME = re.compile(r"(?P<method>.+)_(?P<bits>\d+)b_s(?P<seed>-?\d+)")
"""A cell's folder name (Cell.name)."""
NOT_RUN = "not run yet"


def run_cell(plan: Plan, cell: Cell, train: bool = True) -> dict:
    """Run one cell (or read it back when it already finished); returns its row. With
    `train=False` an unfinished cell is only reported as missing."""
    cmd = plan.command(cell)
    done = metrics_path(plan, cell)
    row = {"method": cell.method, "bits": cell.bits, "seed": cell.seed,
           "command": shlex.join(cmd)}
    if not done.is_file() and not train:
        row["error"] = NOT_RUN
        return row
    if not done.is_file():
        plan.out.mkdir(parents=True, exist_ok=True)
        log = plan.out / f"{cell.name}.log"
        # the run's own thread count (its config's, as the trainer sets it) for every
        # OpenMP/MKL pool, torch's included, that reads the environment
        threads = str(worker_threads(plan.load(cell)))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        t0 = time.time()
        # appended: an earlier try's output may be what says why it failed
        with open(log, "ab") as fh:
            fh.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {row['command']}\n".encode())
            fh.flush()
            start = fh.tell()
            rc = subprocess.call([sys.executable, *cmd[1:]], stdout=fh,
                                 stderr=subprocess.STDOUT, env=env)
        row["process_wall_s"] = time.time() - t0
        if rc != 0 or not done.is_file():
            output = log.read_bytes()[start:].decode(errors="replace")
            tail = output.strip().splitlines()[-1:] or ["(no output)"]
            row["error"] = f"exit {rc}: {tail[0]} (log: {log})"
            return row
    else:
        changed, saved = _changed_config(plan, cell)
        if changed:
            row["error"] = _another_config(plan, cell, changed)
            return row
        # the command it ran with: its own thread count, which this plan's need not be
        ran = dataclasses.replace(plan, threads=saved.scaling.cpus_per_worker)
        row["command"] = shlex.join(ran.command(cell))
    try:
        metrics = json.loads(done.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        why = str(e)
    else:
        why = _not_metrics(metrics)
    if why:
        row["error"] = f"{done}: not a finished run's metrics ({why}); delete it to rerun the cell"
        return row
    row["metrics"] = metrics
    return row


def _not_metrics(metrics) -> str:
    """Why a final_metrics.json's content is no finished run's metrics ('' when it is): the
    progress line and the table do arithmetic on its mAP, P@N and wall time."""
    if not isinstance(metrics, dict):
        return f"a JSON {type(metrics).__name__}, not an object"
    for key, value in metrics.items():
        if (key.startswith(("map_", "p_at_")) or key == "wall_s") and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key}: {json.dumps(value)}, not a number"
    return ""


def _changed_config(plan: Plan, cell: Cell) -> tuple[str, config_mod.Config | None]:
    """('', its saved config) when the finished cell ran the config planned now, its thread
    count aside; else (what differs, None). Threads change the order of float sums, not the
    method: a finished cell is finished whatever --parallel or --threads say now."""
    path = plan.out / cell.name / "config.toml"
    if not path.is_file():
        return "its config.toml is missing", None
    saved = config_mod.load(path)
    planned = plan.load(cell).with_overrides(
        {"scaling.cpus_per_worker": saved.scaling.cpus_per_worker})
    if saved.fingerprint() == planned.fingerprint():
        return "", saved
    return ", ".join(saved.differences(planned)[:3]) or "scaling", None


def _another_config(plan: Plan, cell: Cell, changed: str) -> str:
    return (f"{plan.out / cell.name} finished with another config ({changed}); use another "
            "--out, or the overrides it ran with (its config.toml)")


def check_reuse(plan: Plan, cells: list[Cell]) -> None:
    """A ConfigError, before anything runs, when a cell's config file sets what its method
    sets (Plan.load), or when a cell already finished under the plan's folder with another
    config: the rest trained there would mix two experiments."""
    for cell in cells:
        plan.load(cell)
        if metrics_path(plan, cell).is_file():
            changed, _ = _changed_config(plan, cell)
            if changed:
                raise ConfigError(_another_config(plan, cell, changed))


def finished_cells(out: Path) -> list[Cell]:
    """The cells under `out` that wrote their final metrics, found by their folders' names."""
    found = (CELL_NAME.fullmatch(p.parent.name) for p in out.glob("*/final_metrics.json"))
    return sorted((Cell(m["method"], int(m["bits"]), int(m["seed"])) for m in found
                   if m and m["method"] in METHODS), key=_order)


def _order(cell: Cell) -> tuple:
    return cell.bits, list(METHODS).index(cell.method), cell.seed


def with_finished(plan: Plan, rows: list[dict]) -> list[dict]:
    """`rows` and, after them, a row for every other cell finished under the plan's folder with
    the config this plan gives it (an earlier invocation's other methods, bits or seeds), so
    that the table covers them all."""
    asked = {Cell(r["method"], r["bits"], r["seed"]) for r in rows}
    extra = []
    for cell in finished_cells(plan.out):
        if cell in asked:
            continue
        try:
            row = run_cell(plan, cell, train=False)
        except ConfigError:  # another experiment's cell, e.g. no config file for its bits
            continue
        if "metrics" in row:
            extra.append(row)
    return [*rows, *extra]


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
    """Markdown: one line per (method, bits), mean ± sample std over seeds per encoder; one
    table per metric protocol (cells that report mAP@k and cells that report mAP@all apart)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if "metrics" in row:
            groups.setdefault((row["method"], row["bits"]), []).append(row["metrics"])
    if not groups:
        return "(no finished runs)\n"
    tables: dict[tuple[str, str], list[str]] = {}
    order = {m: i for i, m in enumerate(METHODS)}
    for (method, bits), ms in sorted(groups.items(), key=lambda kv: (kv[0][1],
                                                                      order[kv[0][0]])):
        key = map_key(ms[0])
        p_key = next((k.rsplit("_", 1)[0] for k in ms[0] if k.startswith("p_at_")), "p_at_1000")
        means = {e: statistics.mean(v) for e in ENCODERS
                 if (v := [m[f"{key}_{e}"] for m in ms if f"{key}_{e}" in m])}
        cells = [_mean_spread([m[f"{key}_{e}"] for m in ms if f"{key}_{e}" in m])
                 for e in ENCODERS]
        best = max(means, key=means.get, default="—")
        p = _mean_spread([m[f"{p_key}_{best}"] for m in ms if f"{p_key}_{best}" in m])
        wall = statistics.mean(m.get("wall_s", 0.0) for m in ms)
        tables.setdefault((key, p_key), []).append(
            f"| {method} | {bits} | {len(ms)} | {' | '.join(cells)} | {p} ({best}) "
            f"| {wall:.0f} |")
    return "\n".join(
        f"| method | bits | seeds | {key} f | {key} g | {key} f+g | {p_key} (best) "
        f"| wall s |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
        for (key, p_key), lines in tables.items())


def write(plan: Plan, rows: list[dict]) -> Path | None:
    """rows.json (every run, its command and numbers) and table.md under the plan's folder;
    None, with both left as they were, when no row finished: a table is never replaced by an
    empty one."""
    if not any("metrics" in row for row in rows):
        return None
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "rows.json").write_text(json.dumps(rows, indent=1, sort_keys=True))
    path = plan.out / "table.md"
    path.write_text(table(rows))
    return path
