"""scikit-learn's 8x8 digits (bundled with the wheel): a small real source for fast tests."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from dadh_dist.config import DataConfig
from dadh_dist.data.base import Dataset
from dadh_dist.data.fashion import split_single_label
from dadh_dist.data.problems import Problems

# where scikit-learn's wheel keeps the table its load_digits reads, inside its package folder:
# one row per image, 64 pixels then the label, comma-separated
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64), as scikit-learn's
    load_digits gives them. Read from the table its wheel ships, without importing
    sklearn.datasets: that import costs ~1.5 s of CPU in every process that loads digits (each
    debug run, each worker), reading the table 0.03 s. Where the table is not where this looks,
    scikit-learn's own loader."""
    spec = importlib.util.find_spec("sklearn")  # finds the package, runs none of it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder, *DIGITS_FILE)
        if path.is_file():
            with gzip.open(path, "rt") as fh:
                table = np.loadtxt(fh, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    return d.images, d.target.astype(np.int64)


def load_digits(cfg: DataConfig, problems: Problems | None = None) -> Dataset:
    """1,797 images (N, 1, 8, 8); pixel values 0..16 scaled by 16 into uint8 (16 -> 255)."""
    pixels, labels = digits_arrays()
    images = np.clip(pixels * 16, 0, 255).astype(np.uint8)[:, None]
    return split_single_label("digits", images, labels, 10, cfg, problems)
