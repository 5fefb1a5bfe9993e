"""One worker's block of database labels read from Parquet shards (`data.parquet_index`), against
reading every label: memory and seconds per worker at W = 1, 2, 4 (issue 18; docs/scaling.md §4).

    python bench/block_labels.py [--n 16M] [--workers 1,2,4] [--json PATH]
    python bench/block_labels.py --quick     # smoke run: n = 200k, W = 1, 2

The shards are synthetic and have no image column: 10,000 query and validation rows, then n
database rows, in shards of 1M rows and row groups of 128Ki rows. Columns: labels (list<uint8>,
one-hot of 10 classes, row i's class `scale.classes_of(i)`), split and id. They are written
once into a temporary folder. Each worker then runs in a fresh interpreter and reads only its
rows (`distributed.even_split`). It builds the index from the footers, reads its rows' labels,
and checks them against the classes it computes itself. The peak is the worker's VmHWM above
its RSS after a warm-up read of one row group (which loads pyarrow's code and thread pools, the
same ~100 MiB for any n), with the high-water mark reset there. The baseline, in the same run,
reads the labels and split columns of every shard whole (`pyarrow.parquet.read_table`) and keeps
the database rows' labels: what every worker does today, though `load_parquet` also reads and
decodes the images. Exit status 1 when some worker's labels are not the generator's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _env
import numpy as np
from _common import exit_status, memory_mib, run_child, table
from scale import CLASSES, classes_of, one_hot, parse_size

OTHERS = 10_000  # query and validation rows before the database
SHARD_ROWS = 1_000_000
GROUP_ROWS = 1 << 17


def write_shards(folder: Path, n: int) -> int:
    """The synthetic shards; returns their bytes on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = OTHERS + n
    for shard, lo in enumerate(range(0, total, SHARD_ROWS)):
        hi = min(total, lo + SHARD_ROWS)
        rows = np.arange(lo, hi, dtype=np.int64)
        db = rows - OTHERS  # database row number (negative: a query or validation row)
        labels = one_hot(classes_of(np.maximum(db, 0)))
        split = np.where(db < 0, np.where(rows % 2 == 0, "query", "validation"), "database")
        table_ = pa.table({
            "labels": pa.ListArray.from_arrays(
                pa.array(np.arange(0, CLASSES * len(rows) + 1, CLASSES, dtype=np.int32)),
                pa.array(labels.ravel(), pa.uint8())),
            "split": pa.array(split, pa.string()),
            "id": pa.array(rows, pa.int64()),
        })
        pq.write_table(table_, folder / f"part-{shard:05d}.parquet", row_group_size=GROUP_ROWS)
    return sum(p.stat().st_size for p in folder.iterdir())


def child(spec: dict) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dadh_dist.data.parquet_index import SplitIndex
    from dadh_dist.distributed import even_split

    folder, n = Path(spec["folder"]), spec["n"]
    # warm up both readers on one row group, then measure from here: the code pages and the
    # thread pools pyarrow loads on a first read (~100 MiB) are the same for any n
    first = sorted(folder.glob("*.parquet"))[0]
    pq.ParquetFile(first).read_row_group(0, columns=["labels", "split"])
    SplitIndex.open(folder).labels(0, 1)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
    base = memory_mib()[0]
    t0 = time.perf_counter()
    if spec["mode"] == "whole":
        parts = []
        for path in sorted(folder.glob("*.parquet")):
            t = pq.read_table(path, columns=["labels", "split"])
            t = t.filter(pc.equal(t.column("split"), "database"))
            col = t.column("labels").combine_chunks()
            parts.append(col.flatten().to_numpy().reshape(-1, CLASSES))
        labels = np.concatenate(parts)
        rows, open_s, scanned = slice(0, n), 0.0, None
    else:
        index = SplitIndex.open(folder)
        open_s = time.perf_counter() - t0
        rows = even_split(index.n, spec["world"], spec["rank"])
        labels = index.labels(rows.start, rows.stop)
        scanned = index.scanned
    seconds = time.perf_counter() - t0
    peak = memory_mib()[1] - base  # before the check below makes its own copies
    want = one_hot(classes_of(np.arange(rows.start, rows.stop, dtype=np.int64)))
    print(json.dumps({"rows": rows.stop - rows.start, "labels_bytes": labels.nbytes,
                      "correct": bool(np.array_equal(labels, want)), "open_s": open_s,
                      "seconds": seconds, "peak_mib": peak, "scanned": scanned}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="16M", help="database rows (k, M suffixes)")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: --n 200k --workers 1,2 (~20 s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.n, args.workers = "200k", "1,2"
    n, workers = parse_size(args.n), [int(w) for w in args.workers.split(",")]
    load0, started, wall0 = _env.load_average(), time.strftime("%Y-%m-%d %H:%M:%S"), time.time()
    with tempfile.TemporaryDirectory(prefix="block_labels_") as tmp:
        t0 = time.perf_counter()
        disk = write_shards(Path(tmp), n)
        write_s = time.perf_counter() - t0
        whole = run_child(__file__, {"mode": "whole", "folder": tmp, "n": n})
        runs = {W: [run_child(__file__, {"mode": "block", "folder": tmp, "n": n, "world": W,
                                         "rank": r}) for r in range(W)] for W in workers}
    mib = 2.0**20
    print(f"# One worker's database labels from Parquet: n = {n:,}, {CLASSES} classes, "
          f"shards of {SHARD_ROWS:,} rows, row groups of {GROUP_ROWS:,} "
          f"({disk / mib:.0f} MiB on disk, written in {write_s:.1f} s)\n")
    body = [["every label (today)", "-", f"{whole['rows']:,}", whole["labels_bytes"] / mib,
             whole["peak_mib"], whole["seconds"], "-", whole["correct"]]]
    for W, ranks in runs.items():
        worst = max(ranks, key=lambda r: r["peak_mib"])
        body.append([f"block, W = {W}", worst["scanned"], f"{max(r['rows'] for r in ranks):,}",
                     max(r["labels_bytes"] for r in ranks) / mib, worst["peak_mib"],
                     max(r["seconds"] for r in ranks), max(r["open_s"] for r in ranks),
                     all(r["correct"] for r in ranks)])
    print(table(["read", "row groups scanned for split", "rows / worker", "labels MiB / worker",
                 "peak above warm-up MiB", "s", "index from footers s", "labels correct"], body))
    checks = {}
    if 1 in runs and max(workers) > 1:
        W = max(workers)
        got = max(r["peak_mib"] for r in runs[W]) / max(r["peak_mib"] for r in runs[1])
        checks = {"W": W, "peak_ratio": got}
        print(f"\n- peak above the warm-up, W = {W} / W = 1: {got:.3f} (1/W = {1 / W:.3f})")
    print(f"- block read at W = 1 / every label read: "
          f"{max(r['peak_mib'] for r in runs[min(workers)]) / whole['peak_mib']:.3f} of the "
          "memory")
    print(f"\n- started {started}, took {time.time() - wall0:.0f} s")
    _env.print_environment(load0)
    if args.json:
        args.json.write_text(json.dumps({"n": n, "whole": whole, "runs": runs, "checks": checks,
                                         "environment": _env.environment()}, indent=1))
    return exit_status([("every label (today) = the generator's", whole["correct"])]
                       + [(f"W = {W}: every worker's labels = the generator's",
                           all(r["correct"] for r in ranks)) for W, ranks in runs.items()])


if __name__ == "__main__":
    sys.exit(main())
