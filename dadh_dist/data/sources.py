"""The registry of sources, and loading one into a Dataset while recording its problems."""

from __future__ import annotations

from pathlib import Path

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset
from dadh_dist.data.cifar import load_cifar10
from dadh_dist.data.digits import load_digits
from dadh_dist.data.fashion import find_fashion_mnist, load_fashion_mnist
from dadh_dist.data.grids import load_fashion_mnist_grid
from dadh_dist.data.lists import load_list
from dadh_dist.data.parquet import load_parquet
from dadh_dist.data.problems import Problems, check_limited
from dadh_dist.data.splits import limit

SOURCES = {
    "fashion_mnist": load_fashion_mnist,
    "fashion_mnist_grid": load_fashion_mnist_grid,
    "cifar10": load_cifar10,
    "list": load_list,
    "parquet": load_parquet,
    "digits": load_digits,
}

# Where the sources that read no folder take their data from.
BUNDLED = {"digits": "scikit-learn's copy in its wheel"}

# What data.root must hold, per source that reads one.
ROOTS = {
    "fashion_mnist": "the Fashion-MNIST IDX files",
    "fashion_mnist_grid": "the Fashion-MNIST IDX files",
    "cifar10": "the cifar-10-batches-py files",
    "list": "test.txt and database.txt",
    "parquet": "the *.parquet shards",
}


def check_root(cfg: DataConfig, here: bool = True) -> None:
    """DataError naming data.root when the source's folder is missing, or when the source reads
    none and a root is set (the user's data would be ignored): a run checks this before it
    starts any worker. An empty root is Fashion-MNIST's Debian package, found through dpkg.
    `here=False` (the data is read on other machines): only what the setting alone tells."""
    if cfg.source in BUNDLED:
        if cfg.root:
            raise DataError(f"data.root: data.source = {cfg.source} reads no folder (it uses "
                            f"{BUNDLED[cfg.source]}), but data.root = {cfg.root!r}; leave "
                            "data.root empty, or set data.source to the format of that data")
        return
    what = ROOTS.get(cfg.source)
    if what is None:
        return
    if not cfg.root:
        if cfg.source.startswith("fashion_mnist"):
            if here:
                find_fashion_mnist()
            return
        raise DataError(f"data.root: data.source = {cfg.source} needs a folder holding {what}")
    if not here:
        return
    root = Path(cfg.root)
    if not root.is_dir():
        why = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data.root: {root} {why} (data.source = {cfg.source} reads {what} "
                        "from it)")


def load_source(cfg: DataConfig, problems: Problems) -> Dataset:
    """Load and split `cfg.source` (seeded by cfg.seed); database_limit > 0 subsets the database
    with a seeded draw independent of the split."""
    if cfg.source not in SOURCES:
        raise DataError(f"data.source: {cfg.source!r} is not one of {', '.join(SOURCES)}")
    # the driver's pre-flight check, again where the data is read (a cluster's workers): a
    # missing folder is named by its setting, whoever finds it. An empty root is the loaders'
    # own case (their messages name data.root too), so the package lookup runs once.
    if cfg.root:
        check_root(cfg)
    ds = SOURCES[cfg.source](cfg, problems)
    before = ds.database
    ds.database = limit(before, cfg.database_limit, cfg.seed)
    if len(ds.database) < len(before) and before.labels.sum(0).all():
        check_limited(ds.database.labels, cfg.database_limit, problems)
        problems.barrier()
    return ds
