"""Per-worker database reads from Parquet (`data.per_worker.load_block`) against the whole load
every worker did before (`data.load_dataset`): memory and seconds per worker at W = 1, 2, 4,
and the cost of gathering Ω's images from their owners (`blocks.gather_owned`) (issue 18;
docs/scaling.md §4).

    python bench/per_worker_data.py [--n 400k] [--workers 1,2,4] [--m 2000,12000] [--reps 5]
                                    [--json PATH]
    python bench/per_worker_data.py --quick     # smoke run: n = 20k, W = 1, 2, m = 500

The shards are synthetic: 1,000 query rows, 1,000 validation rows, then n database rows, in
shards of 100,000 rows and row groups of 10,000, with the columns and schema of
`data.parquet.SCHEMA`. Row i's image is one of 1,000 distinct 28×28 grayscale PNGs (blob
i mod 1,000: seeded noise under a bar whose place depends on the class), its class is the
blob's number mod 10 (one-hot of 10 classes), its id is i. The PNGs are encoded once and
cycled, so writing the shards takes seconds.

Every measurement runs in fresh interpreters (torch.set_num_threads(1)):

* whole: one process runs `load_dataset` (reads and decodes every image of every shard). It
  checks the database against the generator (ids, labels, pixels), then computes the reference
  checksums the workers are judged by: blake2b of (labels, ids, images) for every worker's rows
  [start, stop) at each W, and of database.images[Ω] for every Ω the gather draws.
* block, W: W processes joined by a gloo group on 127.0.0.1 each run `load_block`. The
  concatenation of the blocks must tile [0, n) and each block's checksum must equal the
  whole load's over the same rows; the bench fails otherwise.
* gather (W = 2, in the same processes, after the load is measured): `blocks.open_block` over
  the blocks, then per m one untimed and --reps timed `gather_owned` calls of Ω =
  `loop.sample_omega(0, t, n, m)`, each starting after a barrier; the time of a repetition is
  the slowest rank's, and the median is reported. Every gathered (m, 1, 28, 28) array, on
  every rank, must have the checksum of the whole load's database.images[Ω].

Peak memory is VmHWM above the RSS after a warm-up: the imports, the gloo group, and a read and
decode of one row group (pyarrow's code and thread pools, ~100 MiB, the same for any n). Where
the kernel allows it the high-water mark is reset there (/proc/self/clear_refs, as
bench/block_labels.py does); the JSON records whether it was.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _env
import numpy as np
from _common import free_port, memory_mib, run_child, table
from scale import parse_size

CLASSES = 10
SIDE = 28
OTHERS = 1_000  # query rows, then as many validation rows, before the database
DISTINCT = 1_000  # distinct PNGs, cycled over the rows
SHARD_ROWS = 100_000
GROUP_ROWS = 10_000
SEED = 0


# ------------------------------------------------------------------------------ synthetic shards


def raw_images() -> np.ndarray:
    """The DISTINCT source images, (DISTINCT, 1, SIDE, SIDE) uint8: seeded noise in [0, 64) and
    a bright horizontal bar at a row that depends on the class (blob j's class is j mod 10)."""
    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 64, (DISTINCT, 1, SIDE, SIDE), dtype=np.uint8)
    for j in range(DISTINCT):
        top = 2 + 2 * (j % CLASSES)
        images[j, 0, top:top + 3, 4:24] = 200 + j % 50
    return images


def classes_of(rows: np.ndarray) -> np.ndarray:
    return ((rows % DISTINCT) % CLASSES).astype(np.uint8)


def one_hot(cls: np.ndarray) -> np.ndarray:
    out = np.zeros((cls.shape[0], CLASSES), np.uint8)
    out[np.arange(cls.shape[0]), cls] = 1
    return out


def write_shards(folder: Path, n: int) -> int:
    """The synthetic shards (see the module docstring); returns their bytes on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from dadh_dist.data.parquet import SCHEMA

    blobs = []
    for img in raw_images():
        buf = io.BytesIO()
        Image.fromarray(img[0]).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    blobs = np.array(blobs, dtype=object)
    total = 2 * OTHERS + n
    for shard, lo in enumerate(range(0, total, SHARD_ROWS)):
        rows = np.arange(lo, min(total, lo + SHARD_ROWS), dtype=np.int64)
        split = np.where(rows < OTHERS, "query",
                         np.where(rows < 2 * OTHERS, "validation", "database"))
        labels = one_hot(classes_of(rows))
        t = pa.Table.from_arrays([
            pa.array(blobs[rows % DISTINCT], pa.binary()),
            pa.ListArray.from_arrays(
                pa.array(np.arange(0, CLASSES * len(rows) + 1, CLASSES, dtype=np.int32)),
                pa.array(labels.ravel(), pa.uint8())),
            pa.array(split, pa.string()),
            pa.array(rows, pa.int64()),
        ], schema=SCHEMA)
        pq.write_table(t, folder / f"part-{shard:05d}.parquet", row_group_size=GROUP_ROWS)
    return sum(p.stat().st_size for p in folder.iterdir())


# ------------------------------------------------------------------------------ children


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a))
    return h.hexdigest()


def warm_up(folder: Path) -> tuple[float, bool]:
    """Read and decode one row group, then reset the high-water mark where the kernel allows;
    returns (RSS after the warm-up in MiB, whether VmHWM was reset)."""
    import pyarrow.parquet as pq

    from dadh_dist.data.images import decode

    group = pq.ParquetFile(sorted(folder.glob("*.parquet"))[0]).read_row_group(0)
    for blob in group.column("image").to_pylist()[:100]:
        decode(blob)
    del group
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
        reset = True
    except OSError:
        reset = False
    return memory_mib()[0], reset


def data_config(folder: str):
    from dadh_dist import config

    return config.load(None, {"data.source": "parquet", "data.root": folder}).data


def whole_child(spec: dict) -> dict:
    import torch

    from dadh_dist import loop
    from dadh_dist.data import load_dataset
    from dadh_dist.distributed import even_split

    torch.set_num_threads(1)
    folder, n = Path(spec["folder"]), spec["n"]
    base, reset = warm_up(folder)
    t0 = time.perf_counter()
    db = load_dataset(data_config(spec["folder"])).database
    seconds = time.perf_counter() - t0
    peak = memory_mib()[1] - base  # before the checks below make their own copies
    # the whole load against the generator, a chunk at a time
    ids = np.arange(2 * OTHERS, 2 * OTHERS + n, dtype=np.int64)
    raw = raw_images()
    correct = len(db) == n and np.array_equal(db.ids, ids)
    for lo in range(0, n, 50_000):
        if not correct:
            break
        part = ids[lo:lo + 50_000]
        correct = (np.array_equal(db.labels[lo:lo + 50_000], one_hot(classes_of(part)))
                   and np.array_equal(db.images[lo:lo + 50_000], raw[part % DISTINCT]))
    blocks = {}
    for W in spec["workers"]:
        for r in range(W):
            s = even_split(n, W, r)
            blocks[f"{W}/{r}"] = digest(db.labels[s], db.ids[s], db.images[s])
    omegas = {f"{m}/{t}": digest(db.images[loop.sample_omega(SEED, t, n, m).numpy()])
              for m in spec["m"] for t in range(spec["reps"] + 1)}
    return {"rows": len(db), "images_bytes": db.images.nbytes, "seconds": seconds,
            "peak_mib": peak, "base_mib": base, "hwm_reset": reset, "correct": bool(correct),
            "blocks": blocks, "omegas": omegas}


def block_child(spec: dict) -> dict:
    import torch
    import torch.distributed as dist

    from dadh_dist import blocks, loop
    from dadh_dist.data.per_worker import load_block
    from dadh_dist.distributed import TorchCollectives, init_process_group_for_test

    torch.set_num_threads(1)
    rank, world = spec["rank"], spec["world"]
    init_process_group_for_test(rank, world, spec["port"], spec["timeout_s"])
    c = TorchCollectives()
    base, reset = warm_up(Path(spec["folder"]))
    c.barrier()
    t0 = time.perf_counter()
    data, rows, total = load_block(data_config(spec["folder"]), c)
    seconds = time.perf_counter() - t0
    peak = memory_mib()[1] - base
    db = data.database
    out = {"rank": rank, "world": world, "n": total, "start": rows.start, "stop": rows.stop,
           "rows": len(db), "images_bytes": db.images.nbytes, "seconds": seconds,
           "peak_mib": peak, "base_mib": base, "hwm_reset": reset,
           "digest": digest(db.labels, db.ids, db.images), "gather": {}}
    if spec["gather"]:
        block = blocks.open_block(c, torch.zeros(len(db), 64, dtype=torch.int8), rows, total,
                                  torch.from_numpy(db.labels))
        for m in spec["m"]:
            times, digests = [], []
            for t in range(spec["reps"] + 1):  # t = 0: untimed warm-up
                omega = loop.sample_omega(SEED, t, total, m)
                c.barrier()
                t1 = time.perf_counter()
                got = blocks.gather_owned(c, block, db.images, omega)
                times.append(time.perf_counter() - t1)
                digests.append(digest(got.numpy()))
            owner = np.searchsorted(np.asarray(block.bounds[1:]), omega.numpy(), side="right")
            out["gather"][str(m)] = {"seconds": times[1:], "digests": digests,
                                     "bytes": got.numpy().nbytes,
                                     "share_rows": np.bincount(owner, minlength=world).tolist()}
    dist.barrier()  # leave together (a rank tearing down early can abort the others)
    dist.destroy_process_group()
    return out


# ------------------------------------------------------------------------------ parent



def run_group(spec: dict, world: int, timeout_s: int) -> list[dict]:
    """The W ranks of one configuration, each a fresh interpreter; their results in rank order."""
    spec = {**spec, "mode": "block", "world": world, "port": free_port(), "timeout_s": timeout_s}
    procs = [subprocess.Popen([sys.executable, __file__, "--child",
                               json.dumps({**spec, "rank": r})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    results, failed = [], []
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"W={world}: rank {r} ran past {timeout_s} s") from None
        if p.returncode:
            failed.append(f"rank {r} (exit {p.returncode}):\n{err[-3000:]}")
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    if failed:
        raise RuntimeError(f"W={world}: " + "\n".join(failed))
    return results


def check_blocks(W: int, ranks: list[dict], whole: dict, n: int) -> None:
    """The blocks tile [0, n) in rank order and each matches the whole load's rows."""
    bounds = [(r["start"], r["stop"]) for r in ranks]
    if bounds[0][0] != 0 or bounds[-1][1] != n or any(
            a[1] != b[0] for a, b in zip(bounds, bounds[1:])) or any(r["n"] != n for r in ranks):
        raise SystemExit(f"FAIL: W={W}: blocks {bounds} do not tile the database [0, {n})")
    for r in ranks:
        if r["digest"] != whole["blocks"][f"{W}/{r['rank']}"]:
            raise SystemExit(f"FAIL: W={W} rank {r['rank']}: rows [{r['start']}, {r['stop']}) "
                             "differ from the whole load's")


def check_gather(ranks: list[dict], whole: dict, m: int) -> None:
    for r in ranks:
        for t, d in enumerate(r["gather"][str(m)]["digests"]):
            if d != whole["omegas"][f"{m}/{t}"]:
                raise SystemExit(f"FAIL: rank {r['rank']}: gathered images of Ω (m = {m}, "
                                 f"t = {t}) differ from the whole load's database.images[Ω]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="400k", help="database rows (k, M suffixes)")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--m", default="2000,12000", help="|Ω| values for the gather (W = 2)")
    parser.add_argument("--reps", type=int, default=5, help="timed gathers per m")
    parser.add_argument("--timeout-s", type=int, default=600, help="per configuration")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: --n 20k --workers 1,2 --m 500 --reps 1 (~40 s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps((whole_child if spec["mode"] == "whole" else block_child)(spec)))
        return
    if args.quick:
        args.n, args.workers, args.m, args.reps = "20k", "1,2", "500", 1
    n, workers = parse_size(args.n), [int(w) for w in args.workers.split(",")]
    ms = [int(m) for m in args.m.split(",")]
    load0, started, wall0 = _env.load_average(), time.strftime("%Y-%m-%d %H:%M:%S"), time.time()
    with tempfile.TemporaryDirectory(prefix="per_worker_data_") as tmp:
        t0 = time.perf_counter()
        disk = write_shards(Path(tmp), n)
        write_s = time.perf_counter() - t0
        spec = {"folder": tmp, "n": n, "workers": workers, "m": ms, "reps": args.reps}
        whole = run_child(__file__, {**spec, "mode": "whole"}, args.timeout_s)
        if not whole["correct"]:
            raise SystemExit("FAIL: the whole load's database is not the generator's rows")
        runs = {W: run_group({**spec, "gather": W == 2}, W, args.timeout_s) for W in workers}
    for W, ranks in runs.items():
        check_blocks(W, ranks, whole, n)
    if 2 in runs:
        for m in ms:
            check_gather(runs[2], whole, m)

    mib = 2.0**20
    print(f"# Per-worker database reads from Parquet: n = {n:,} database rows of {SIDE}×{SIDE} "
          f"grayscale PNG, shards of {SHARD_ROWS:,} rows, row groups of {GROUP_ROWS:,} "
          f"({disk / mib:.0f} MiB on disk, written in {write_s:.1f} s)\n")
    body = [["load_dataset (whole, today)", 1, f"{whole['rows']:,}", whole["images_bytes"] / mib,
             whole["base_mib"], whole["peak_mib"], whole["seconds"], "-", whole["correct"]]]
    peaks = {}
    for W, ranks in runs.items():
        peaks[W] = max(r["peak_mib"] for r in ranks)
        body.append([f"load_block, W = {W}", W, f"{max(r['rows'] for r in ranks):,}",
                     max(r["images_bytes"] for r in ranks) / mib,
                     max(r["base_mib"] for r in ranks), peaks[W],
                     max(r["seconds"] for r in ranks), "-" if 1 not in peaks else
                     peaks[W] / peaks[1], True])
    print(table(["read", "processes", "rows / worker", "database images MiB / worker",
                 "RSS after warm-up MiB", "peak above warm-up MiB / worker", "s",
                 "peak / W = 1 peak", "rows = whole load's"], body))
    ratios = {W: peaks[W] / peaks[1] for W in peaks if 1 in peaks and W != 1}
    print()
    for W, got in ratios.items():
        print(f"- per-worker peak above warm-up, W = {W} / W = 1: {got:.3f} (1/W = {1 / W:.3f})")
    if 1 in peaks:
        print(f"- load_block at W = 1 / load_dataset: {peaks[1] / whole['peak_mib']:.3f} of the "
              "peak memory")

    gathers = {}
    if 2 in runs:
        print(f"\n## Ω's images from their owners (blocks.gather_owned), W = 2, {args.reps} "
              "repetitions after one untimed\n")
        gbody = []
        for m in ms:
            per_rank = [r["gather"][str(m)] for r in runs[2]]
            slowest = [max(ts) for ts in zip(*(g["seconds"] for g in per_rank))]
            share = per_rank[0]["share_rows"]
            gathers[m] = {"median_s": statistics.median(slowest), "min_s": min(slowest),
                          "max_s": max(slowest), "bytes": per_rank[0]["bytes"],
                          "share_rows": share}
            gbody.append([f"{m:,}", gathers[m]["median_s"] * 1e3, gathers[m]["min_s"] * 1e3,
                          gathers[m]["max_s"] * 1e3, f"{per_rank[0]['bytes']:,}",
                          f"{m * SIDE * SIDE:,}", " / ".join(f"{s:,}" for s in share),
                          f"{2 * max(share) * SIDE * SIDE:,}", True])
        print(table(["m", "median ms", "min ms", "max ms", "gathered bytes", "m × 784",
                     "rows sent by rank 0 / 1", "all-gather bytes incl. padding",
                     "= database.images[Ω]"], gbody))
    print(f"\n- VmHWM reset after the warm-up: {whole['hwm_reset']}")
    print(f"- started {started}, took {time.time() - wall0:.0f} s")
    _env.print_environment(load0)
    if args.json:
        args.json.write_text(json.dumps({
            "n": n, "disk_bytes": disk, "write_s": write_s,
            "whole": {k: v for k, v in whole.items() if k not in ("blocks", "omegas")},
            "runs": {W: [{k: v for k, v in r.items() if k != "digest"} for r in ranks]
                     for W, ranks in runs.items()},
            "peak_ratio": ratios, "gather": gathers, "environment": _env.environment()},
            indent=1))


if __name__ == "__main__":
    main()
