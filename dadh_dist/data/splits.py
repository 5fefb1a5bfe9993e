"""Seeded splitting: per-class query/validation/database, random hold-out, database subsets."""

from __future__ import annotations

import numpy as np

from dadh_dist.data.base import DataError, Split
from dadh_dist.data.problems import Problems

# Independent random streams derived from data.seed, so that e.g. changing database_limit
# never changes which images are queries.
STREAM_SPLIT, STREAM_LIMIT, STREAM_HOLDOUT, STREAM_GRID = range(4)


def rng(seed: int, *stream: int) -> np.random.Generator:
    """The generator of one named stream (a STREAM_* constant, optionally sub-indexed)."""
    if seed < 0:
        raise DataError(f"data.seed: must be >= 0, got {seed}")
    return np.random.default_rng((seed, *stream))


def one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    """y: (N,) class indices -> (N, num_classes) uint8 0/1."""
    out = np.zeros((len(y), num_classes), np.uint8)
    out[np.arange(len(y)), y] = 1
    return out


def split_per_class(
    y: np.ndarray, num_classes: int, n_query: int, n_val: int, gen: np.random.Generator,
    what: str, problems: Problems | None = None,
    need_is: str = "query_per_class + val_per_class + 1",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw `n_query` query and `n_val` validation indices per class; the rest is the database.

    y: (N,) class indices. Returns three sorted, disjoint int64 index arrays covering range(N).
    Every class too small to split is recorded, then the split fails: an empty one under `what`
    (the source's folder or name), one the split sizes outgrow under data.query_per_class, the
    setting to lower, its need spelled `need_is` (= n_query + n_val + 1) in the settings' terms.
    """
    counts = np.bincount(y, minlength=num_classes)
    need = n_query + n_val + 1
    small = np.flatnonzero(counts < need)
    if small.size:
        problems = problems or Problems()
        for c in small:
            if counts[c] == 0:
                problems.add(what, f"class {c} has no images")
            else:
                problems.add("data.query_per_class", f"class {c} of {what} has {counts[c]} "
                             f"images, fewer than {need_is} = {need}")
        problems.fail()
    # Shuffle, then group by class keeping the shuffled order: the rank of an image inside its
    # class block is uniformly random, so "rank < n_query" is a uniform draw per class.
    order = gen.permutation(len(y))
    order = order[np.argsort(y[order], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(y)) - starts[y[order]]
    query = np.sort(order[rank < n_query])
    val = np.sort(order[(rank >= n_query) & (rank < n_query + n_val)])
    database = np.sort(order[rank >= n_query + n_val])
    return query.astype(np.int64), val.astype(np.int64), database.astype(np.int64)


def limit_rows(n: int, size: int, seed: int) -> np.ndarray | None:
    """Sorted rows of a seeded random subset of `size` out of n, or None when all are kept."""
    if size <= 0 or size >= n:
        return None
    return np.sort(rng(seed, STREAM_LIMIT).choice(n, size, replace=False))


def limit(split: Split, size: int, seed: int) -> Split:
    """data.database_limit: keep a seeded random subset of `size` rows, in their original order."""
    rows = limit_rows(len(split), size, seed)
    return split if rows is None else split.take(rows)
