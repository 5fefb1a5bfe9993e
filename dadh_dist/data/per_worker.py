"""data.per_worker: each worker reads only its own block of the database from Parquet shards
(labels, ids and decoded images), and the query and validation splits whole (docs/scaling.md §4).

    data, rows, n = load_block(cfg.data, collectives)
    data.database            # this worker's rows [rows.start, rows.stop) of the n database rows

The database is row for row the one `load_dataset` gives for the same settings: database rows
in shard and row order, images that do not decode dropped under data.skip_bad, then
data.database_limit's seeded subset of what is left. Worker r first reads the even split of the
shards' database rows; the rows it keeps become its block, so blocks differ from an even split
of n by the images skipped (and the subset drawn). A checkpoint's rows are numbered alike, so
`evaluate`, `encode --learned` and a resume with another worker count read the same database.

Every worker calls `load_block` (it runs collectives). A problem found by any worker (a bad
row, a class with no database image) stops every worker with a DataError; the worker that found
it names the shard and row. Rows of other splits than the three are not read, so not checked.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.parquet import META_MULTI, META_NAME, SPLITS
from dadh_dist.data.parquet_index import SplitIndex
from dadh_dist.data.problems import Problems, limit_note
from dadh_dist.data.splits import limit_rows
from dadh_dist.distributed import even_split

T = TypeVar("T")
SKIP_EXAMPLES = 3


def load_block(cfg: DataConfig, c) -> tuple[Dataset, slice, int]:
    """(the dataset with only this worker's database rows, those rows, n): see the module
    docstring. `c`: the run's collectives (`distributed`)."""
    if cfg.source != "parquet":
        raise DataError(f"data.per_worker: reads Parquet shards; data.source is {cfg.source}")
    if not cfg.root:
        raise DataError("parquet: set data.root to the folder of *.parquet shards")
    root = Path(cfg.root)
    problems = Problems(skip_bad=cfg.skip_bad)

    def read() -> tuple[SplitIndex, dict[str, tuple[Split, int]], Split, np.ndarray]:
        index = SplitIndex.open(root)
        small = {name: _whole(root, name, cfg.image_size, problems) for name in SPLITS[:2]}
        mine = even_split(index.n, c.world_size, c.rank)
        block, ok = index.read(mine.start, mine.stop, cfg.image_size, problems)
        problems.barrier()
        ref = small["query"][0]
        if block.labels.shape[0] and block.labels.shape[1] != ref.labels.shape[1]:
            raise DataError(f"{root}: database rows {mine.start}..{mine.stop - 1} have "
                            f"{block.labels.shape[1]} labels, the query rows "
                            f"{ref.labels.shape[1]}")
        if ok.any() and block.images.shape[1:] != ref.images.shape[1:]:
            raise DataError(f"{root}: database images have shape {block.images.shape[1:]}, the "
                            f"query images {ref.images.shape[1:]} (set data.image_size to "
                            "resize)")
        return index, small, block, ok

    index, small, block, ok = _agreed(c, read, root)
    query, validation = small["query"][0], small["validation"][0]
    if block.labels.shape[0] == 0:  # more workers than rows: an empty block of the right shape
        block = Split(np.zeros((0, *query.images.shape[1:]), np.uint8),
                      np.zeros((0, query.labels.shape[1]), np.uint8), np.zeros(0, np.int64))
    # which rows each worker keeps: counts from every worker, then the seeded subset
    counts = c.all_gather_rows(torch.tensor([[int(ok.sum()), int((~ok).sum())]]))
    kept, bad = counts[:, 0].numpy(), counts[:, 1].numpy()
    first = int(kept[: c.rank].sum())
    total = int(kept.sum())
    keep = np.flatnonzero(ok)
    start, n = first, total
    chosen = limit_rows(total, cfg.database_limit, cfg.seed)
    if chosen is not None:
        here = (chosen >= first) & (chosen < first + keep.size)
        keep = keep[chosen[here] - first]
        start, n = int(np.searchsorted(chosen, first)), int(chosen.size)
    database = block if keep.size == len(block) else block.take(keep)  # a copy only if rows go
    if not database.labels.shape[0]:
        database = Split(np.zeros((0, *query.images.shape[1:]), np.uint8),
                         database.labels, database.ids)
    # every class needs database images: of all rows, of those that decoded, of those kept
    sums = c.all_reduce_sum(torch.from_numpy(np.stack([
        block.labels.sum(0, dtype=np.int64), block.labels[ok].sum(0, dtype=np.int64),
        database.labels.sum(0, dtype=np.int64)])))
    for row, where, note in ((0, root, ""), (1, root, " left without its unreadable images"),
                             (2, "data.database_limit", limit_note(n, cfg.database_limit))):
        for j in np.flatnonzero(sums[row].numpy() == 0):
            problems.add(where, f"class {j} has no database image{note}")
        problems.barrier()
    if total == 0:
        raise DataError(f"{root}: no database image decodes")
    meta = index.metadata
    if META_MULTI in meta:
        multi = meta[META_MULTI] == b"true"
    else:
        rows = [query.labels, validation.labels, block.labels]
        not_one = torch.tensor([float(any((y.sum(1) != 1).any() for y in rows))])
        multi = float(c.all_reduce_sum(not_one)) > 0
    _warn_skipped(problems, c, int(bad.sum()))
    name = meta.get(META_NAME, root.resolve().name.encode()).decode()
    skipped = int(bad.sum()) + sum(dropped for _, dropped in small.values())
    return (Dataset(name, query, validation, database, multi_label=multi, skipped=skipped),
            slice(start, start + database.labels.shape[0]), n)


def _whole(root: Path, split: str, size: int, problems: Problems) -> tuple[Split, int]:
    """Every row of a small split (query, validation), its bad images dropped under skip_bad,
    and how many were dropped."""
    index = SplitIndex.open(root, split)
    rows, ok = index.read(0, index.n, size, problems)
    problems.barrier()
    return (rows if ok.all() else rows.take(np.flatnonzero(ok))), int((~ok).sum())


def _agreed(c, fn: Callable[[], T], root: Path) -> T:
    """fn() on every worker; when it raises a DataError on any, every worker raises (that one
    its own error, which names the shard and row; the others one naming the workers)."""
    error = None
    try:
        out = fn()
    except DataError as e:
        error, out = e, None
    flags = torch.zeros(c.world_size)
    flags[c.rank] = 1.0 if error is not None else 0.0
    flags = c.all_reduce_sum(flags)
    if error is not None:
        raise error
    failed = [r for r in range(c.world_size) if flags[r] > 0]
    if failed:
        raise DataError(f"{root}: worker(s) {failed} could not read their database rows (their "
                        "own errors name the shard and row)")
    return out


def _warn_skipped(problems: Problems, c, total: int) -> None:
    """One line on stderr per worker that skipped images of its rows."""
    skipped = problems.skipped()
    if not skipped:
        return
    more = ", ..." if len(skipped) > SKIP_EXAMPLES else ""
    print(f"warning: data.skip_bad: worker {c.rank} skipped {len(skipped)} unreadable or missing "
          f"image(s) ({total} of the database on all workers): "
          + "; ".join(map(str, skipped[:SKIP_EXAMPLES])) + more, file=sys.stderr)
