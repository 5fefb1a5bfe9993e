"""B sharded by rows: W workers hold W blocks of B and never the whole, and give the identical B
and metrics as one worker; a checkpoint written by W workers resumes on another W. The data are
Parquet shards with unreadable images (data.skip_bad): one worker loads them whole, two workers
read only their own database rows (data.per_worker), and both see the same database.

The two workers run stream-parallel (f on one, g on the other, each on the whole mini-batch), so
their network step is the one process's to the bit, and what is compared is the sharding of B
and of the data alone. Under plain DDP the halves of each mini-batch are summed in another order
than one process sums the whole, with and without sharding (measured on this config before B was
sharded: the same 0.73% of B's bits apart as after): test_distributed covers that with its
tolerance."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _checkpoints import keep_merged
from _gloo import run_workers
from _nontrivial import assert_learned
from _repo import DEBUG

from dadh_dist import checkpoint as ckpt
from dadh_dist import config, health, loop
from dadh_dist.data import DataError, dataset_to_parquet, load_dataset

# the debug config's data written as Parquet shards, three database images made unreadable, and
# a database of 1,201 of the rest; three outer iterations, checkpoints after each (the last two
# are kept). By hand, on the real data:
#   DADH_SHARDED_SOURCE=fashion_mnist pytest tests/test_sharded.py   (5,001 rows)
SOURCE = os.environ.get("DADH_SHARDED_SOURCE", "digits")
N = 1201 if SOURCE == "digits" else 5001
BAD = (3, 420, 700)  # database rows whose image bytes are garbage
EXTRA = ["scaling.use_ray=false", "data.source=parquet", "data.skip_bad=true",
         f"data.database_limit={N}", "train.outer_iters=3", "train.num_samples=448"]


def write_shards(folder: Path, bad=BAD, row_group=100) -> Path:
    """SOURCE's splits as Parquet shards (row groups of `row_group` rows: most of them hold
    database rows only, one mixes splits), with the images of database rows `bad` broken."""
    cfg = config.load(DEBUG, [f"data.source={SOURCE}"])
    dataset_to_parquet(load_dataset(cfg.data), folder / "tmp", rows_per_shard=10**7)
    table = pq.read_table(folder / "tmp")
    database = np.flatnonzero(np.array(table.column("split").to_pylist()) == "database")
    images = table.column("image").to_pylist()
    for r in bad:
        images[database[r]] = b"not an image"
    table = table.set_column(0, "image", pa.array(images, pa.binary()))
    (folder / "pq").mkdir()
    for i, lo in enumerate(range(0, table.num_rows, 700)):
        pq.write_table(table.slice(lo, 700), folder / "pq" / f"part-{i}.parquet",
                       row_group_size=row_group)
    return folder / "pq"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


def _worker(rank, world, out_dir, root, resume_from):
    from dadh_dist.distributed import TorchCollectives

    cfg = config.load(DEBUG, [*EXTRA, f"data.root={root}"])
    cfg.scaling.num_workers = world  # the in-process config forbids several; the loop does not
    cfg.scaling.stream_parallel = cfg.data.per_worker = world == 2
    out = Path(out_dir)
    seen = []

    def report(metrics, staged):
        if staged is not None:  # this rank's part: its own block of B, nobody else's
            seen.append(sorted(p.name for p in staged.glob("codes_*.npy")))
        keep_merged(out, staged, metrics)

    env = loop.WorkerEnv(collectives=TorchCollectives(), report=report,
                         run_dir=out if rank == 0 else None,
                         resume_from=Path(resume_from) if resume_from else None)
    final = loop.train(cfg, env)
    (out / f"final_{rank}.json").write_text(json.dumps({**final, "blocks_written": seen}))


def _run(folder: Path, world: int, root: Path, resume_from: Path | None = None):
    folder.mkdir()
    run_workers(_worker, world, str(folder), str(root),
                str(resume_from) if resume_from else None, timeout_s=120)
    finals = [json.loads((folder / f"final_{r}.json").read_text()) for r in range(world)]
    state, manifest = ckpt.load(ckpt.latest_valid(folder))
    return finals, state["B"], manifest


KEYS = ("map_all_f", "map_all_g", "map_all_fg", "p_at_1000_fg", "val/map_all_fg")


def _same_metrics(a: dict, b: dict) -> None:
    # AP sums meet in another order on W blocks than on one: equal to rounding (1e-12), and
    # every count-based value (P@N, the distinct codes) exactly
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], abs=1e-12, rel=0), key
    assert a["distinct_database_codes"] == b["distinct_database_codes"]


def test_two_blocks_equal_one_and_resume_across_worker_counts(tmp_path, shards):
    one, B1, m1 = _run(tmp_path / "w1", 1, shards)  # the shards loaded whole
    two, B2, m2 = _run(tmp_path / "w2", 2, shards)  # each worker reads its own rows
    assert_learned(one[0])
    assert torch.equal(B1, B2)  # bit for bit, though no worker of the pair held all of B
    _same_metrics(one[0], two[0])
    assert B1.shape[0] == N
    # the chance level from the blocks' relevant counts is the one of all labels
    data = load_dataset(config.load(DEBUG, [*EXTRA, f"data.root={shards}"]).data)
    assert data.skipped == len(BAD)
    assert one[0]["chance_map"] == two[0]["chance_map"] == pytest.approx(
        health.chance_map(data.query.labels, data.database.labels), rel=1e-12)
    # each rank wrote its own block only; the manifest lists both. The blocks are the rows
    # each worker kept of its even share of the shards' database rows: near, not at, N / 2
    (a, cut), (cut_, b) = (row[:2] for row in m2["codes"]["blocks"])
    assert (a, cut_, b) == (0, cut, N) and abs(cut - N / 2) < 30 and cut != (N + 1) // 2
    assert two[0]["blocks_written"][-1] == [f"codes_{0:012d}_{cut:012d}.npy"]
    assert two[1]["blocks_written"][-1] == [f"codes_{cut:012d}_{N:012d}.npy"]
    assert len(m1["codes"]["blocks"]) == 1

    # W=2's checkpoint of outer iteration 2 (two blocks) resumed by one worker, which reads
    # them as one; one block read as two: test_blocks.py's checkpoint test, W = 1, 2, 4, 60
    one_from_two, B12, _ = _run(tmp_path / "w2_to_w1", 1, shards,
                                tmp_path / "w2" / "checkpoint_000002")
    assert torch.equal(B12, B1)
    _same_metrics(one_from_two[0], one[0])
    print(f"\n{SOURCE}, n={N}: B equal bit for bit (W=1, W=2, W=2 resumed by 1); "
          + ", ".join(f"{k} {one[0][k]:.6f} / {two[0][k]:.6f}" for k in KEYS))  # with -s


def _read_blocks(rank, world, root, out_dir):
    from dadh_dist.data.per_worker import load_block
    from dadh_dist.distributed import TorchCollectives

    c, out = TorchCollectives(), Path(out_dir)
    cfg = config.load(DEBUG, [*EXTRA, f"data.root={root}", "data.per_worker=true"]).data
    cfg.skip_bad = False
    try:
        load_block(cfg, c)
    except DataError as e:  # on every worker: the owner of the bad row names it
        (out / f"error_{rank}.txt").write_text(str(e))
    cfg.skip_bad = True
    cfg.database_limit = 5  # fewer rows than classes: on every worker, the same one line
    try:
        load_block(cfg, c)
    except DataError as e:
        (out / f"error_limit_{rank}.txt").write_text(str(e))
    for limit in (0, N):
        cfg.database_limit = limit
        data, rows, n = load_block(cfg, c)
        db = data.database
        np.savez(out / f"block_{limit}_{rank}.npz", images=db.images, labels=db.labels,
                 ids=db.ids, rows=[rows.start, rows.stop, n], query=data.query.images,
                 validation_ids=data.validation.ids, skipped=data.skipped)


def test_each_worker_reads_its_own_rows_of_the_whole_database(tmp_path, shards):
    # three workers on shards whose row groups mix splits: row for row the whole load's
    mixed = write_shards(tmp_path, bad=(0, 1, 2, 3, 500), row_group=37)
    run_workers(_read_blocks, 3, str(mixed), str(tmp_path), timeout_s=60)
    errors = [(tmp_path / f"error_{r}.txt").read_text() for r in range(3)]
    assert "part-0.parquet: row " in errors[0] and "image is unreadable" in errors[0]
    assert "worker(s) [0] could not read their database rows" in errors[1] == errors[2]
    limited = {(tmp_path / f"error_limit_{r}.txt").read_text() for r in range(3)}
    assert len(limited) == 1 and re.match(r"data.database_limit: class \d has no database "
                                          r"image among the 5 kept", limited.pop())
    for limit in (0, N):
        cfg = config.load(DEBUG, [*EXTRA, f"data.root={mixed}", f"data.database_limit={limit}"])
        want = load_dataset(cfg.data)
        got = [np.load(tmp_path / f"block_{limit}_{r}.npz") for r in range(3)]
        bounds = [g["rows"] for g in got]
        assert [b[2] for b in bounds] == [len(want.database)] * 3
        assert [b[0] for b in bounds] == [0, bounds[0][1], bounds[1][1]]
        assert bounds[2][1] == len(want.database)
        for key in ("images", "labels", "ids"):
            assert np.array_equal(np.concatenate([g[key] for g in got]),
                                  getattr(want.database, key)), (limit, key)
        for g in got:
            assert np.array_equal(g["query"], want.query.images)
            assert np.array_equal(g["validation_ids"], want.validation.ids)
            assert int(g["skipped"]) == want.skipped == 5
