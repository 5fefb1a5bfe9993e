"""Multi-label 2x2 grids of real single-label tiles; label = union of the tile classes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.fashion import NUM_CLASSES, fashion_folder, read_fashion_mnist
from dadh_dist.data.problems import Problems
from dadh_dist.data.splits import STREAM_GRID, rng, split_per_class

MAX_TILES = 3


@dataclass
class Grids:
    """images: (n, C, 2h, 2w) uint8; labels: (n, c) uint8; tiles: (n, 4) int64 source index
    per cell in row-major cell order (-1 = empty cell)."""

    images: np.ndarray
    labels: np.ndarray
    tiles: np.ndarray


def make_grids(
    images: np.ndarray, y: np.ndarray, pool: np.ndarray, count: int, num_classes: int,
    gen: np.random.Generator,
) -> Grids:
    """Build `count` canvases of 1-3 tiles drawn from `pool` (indices into images (N, C, h, w)).

    Tiles are dealt from reshuffled passes over the pool, so no source image is used twice before
    every image of the pool has been used once.
    """
    n_tiles = gen.integers(1, MAX_TILES + 1, size=count)
    # A random permutation of the 4 cells per canvas; the first n_tiles of it are filled.
    cell_rank = np.argsort(np.argsort(gen.random((count, 4)), axis=1), axis=1)
    filled = cell_rank < n_tiles[:, None]
    total = int(n_tiles.sum())
    if len(pool) == 0 and total:
        raise DataError("grid: empty pool of source images")
    passes = max(1, math.ceil(total / max(len(pool), 1)))
    dealt = np.concatenate([gen.permutation(pool) for _ in range(passes)])[:total]
    tiles = np.full((count, 4), -1, np.int64)
    tiles[filled] = dealt

    _, ch, h, w = images.shape
    cells = np.zeros((count, 4, ch, h, w), np.uint8)
    cells[filled] = images[dealt]
    # (n, row, col, C, h, w) -> (n, C, row, h, col, w): pixel (r*h + i, c*w + j) of the canvas.
    canvases = cells.reshape(count, 2, 2, ch, h, w).transpose(0, 3, 1, 4, 2, 5)
    canvases = np.ascontiguousarray(canvases).reshape(count, ch, 2 * h, 2 * w)

    labels = np.zeros((count, num_classes), np.uint8)
    for cell in range(4):
        rows = np.flatnonzero(tiles[:, cell] >= 0)
        labels[rows, y[tiles[rows, cell]]] = 1
    return Grids(canvases, labels, tiles)


def grid_splits(
    images: np.ndarray, y: np.ndarray, *, query: int, validation: int, database: int, seed: int,
    num_classes: int, what: str = "grid", problems: Problems | None = None,
) -> dict[str, Grids]:
    """Query, validation and database grids whose tiles come from disjoint source images.

    images: (N, C, h, w) uint8 single-label pool; y: (N,) class indices. The pool is first split
    per class into three disjoint tile pools; the query and validation pools hold enough images
    (3 per canvas) that none of their tiles repeats.
    """
    per_q = math.ceil(MAX_TILES * query / num_classes)
    per_v = math.ceil(MAX_TILES * validation / num_classes)
    gens = [rng(seed, STREAM_GRID, i) for i in range(4)]
    pools = split_per_class(y, num_classes, per_q, per_v, gens[0], what, problems,
                            f"{MAX_TILES} tiles * (query_per_class + val_per_class) + 1")
    counts = (query, validation, database)
    names = ("query", "validation", "database")
    return {name: make_grids(images, y, pool, n, num_classes, g)
            for name, pool, n, g in zip(names, pools, counts, gens[1:], strict=True)}


def load_fashion_mnist_grid(cfg: DataConfig, problems: Problems | None = None) -> Dataset:
    folder = fashion_folder(cfg.root)
    images, y = read_fashion_mnist(folder, problems)
    if cfg.grid_count < 1:
        raise DataError(f"data.grid_count: must be >= 1 for fashion_mnist_grid, got "
                        f"{cfg.grid_count}")
    grids = grid_splits(images, y, query=cfg.query_per_class * NUM_CLASSES,
                        validation=cfg.val_per_class * NUM_CLASSES, database=cfg.grid_count,
                        seed=cfg.seed, num_classes=NUM_CLASSES,
                        what=f"{folder} (fashion_mnist_grid)", problems=problems)
    splits, start = {}, 0
    for name, g in grids.items():
        ids = np.arange(start, start + len(g.images), dtype=np.int64)
        splits[name] = Split(g.images, g.labels, ids)
        start += len(g.images)
    return Dataset("fashion_mnist_grid", **splits, multi_label=True)
