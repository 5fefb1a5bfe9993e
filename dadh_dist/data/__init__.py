"""Data sources, all loaded into one form: disjoint query / validation / database splits of
uint8 images (N, C, H, W) with a 0/1 label matrix (N, c). Nothing here downloads anything.

    ds = load_dataset(cfg.data)
    ds.database.images, ds.database.labels, ds.query.ids, ds.num_classes, ds.multi_label

    report = check_dataset(cfg.data)   # every problem at once (python -m dadh_dist check-data)
"""

from __future__ import annotations

import sys

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.check import CheckReport, check_dataset
from dadh_dist.data.fashion import find_fashion_mnist
from dadh_dist.data.parquet import dataset_to_parquet
from dadh_dist.data.problems import Problem, Problems
from dadh_dist.data.sources import SOURCES, check_root, load_source

__all__ = ["SOURCES", "CheckReport", "DataError", "Dataset", "Problem", "Split",
           "check_dataset", "check_root", "dataset_to_parquet", "find_fashion_mnist",
           "load_dataset"]

SKIP_EXAMPLES = 3


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load `cfg.source` and split it (seeded by cfg.seed); database_limit > 0 subsets the
    database with a seeded draw independent of the split.

    The first problem found fails the load with a DataError naming the file and line or row.
    With `cfg.skip_bad`, an unreadable or missing image of a list or Parquet source is instead
    dropped, counted in `Dataset.skipped` and reported in one line on stderr. Which images are
    dropped depends only on the files, so every worker loading the data drops the same ones.
    Structural problems are never skipped: a label row of the wrong width or with values other
    than 0/1, a truncated IDX or Parquet file, a missing split, a class without database images,
    splits that overlap.
    """
    problems = Problems(skip_bad=cfg.skip_bad)
    ds = load_source(cfg, problems)
    skipped = problems.skipped()
    if skipped:
        ds.skipped = len(skipped)
        more = ", ..." if len(skipped) > SKIP_EXAMPLES else ""
        print(f"warning: data.skip_bad: skipped {len(skipped)} unreadable or missing image(s): "
              + "; ".join(map(str, skipped[:SKIP_EXAMPLES])) + more, file=sys.stderr)
    return ds
