"""Data sources, all loaded into one form: disjoint query / validation / database splits of
uint8 images (N, C, H, W) with a 0/1 label matrix (N, c). Nothing here downloads anything.

    ds = load_dataset(cfg.data)
    ds.database.images, ds.database.labels, ds.query.ids, ds.num_classes, ds.multi_label
"""

from __future__ import annotations

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.cifar import load_cifar10
from dadh_dist.data.digits import load_digits
from dadh_dist.data.fashion import find_fashion_mnist, load_fashion_mnist
from dadh_dist.data.grids import load_fashion_mnist_grid
from dadh_dist.data.lists import load_list
from dadh_dist.data.parquet import dataset_to_parquet, load_parquet
from dadh_dist.data.splits import limit

SOURCES = {
    "fashion_mnist": load_fashion_mnist,
    "fashion_mnist_grid": load_fashion_mnist_grid,
    "cifar10": load_cifar10,
    "list": load_list,
    "parquet": load_parquet,
    "digits": load_digits,
}

__all__ = ["DataError", "Dataset", "Split", "dataset_to_parquet", "find_fashion_mnist",
           "load_dataset"]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load `cfg.source` and split it (seeded by cfg.seed); database_limit > 0 subsets the
    database with a seeded draw independent of the split."""
    if cfg.source not in SOURCES:
        raise DataError(f"data.source: {cfg.source!r} is not one of {', '.join(SOURCES)}")
    ds = SOURCES[cfg.source](cfg)
    ds.database = limit(ds.database, cfg.database_limit, cfg.seed)
    return ds
