"""scikit-learn's 8x8 digits (bundled with the wheel): a small real source for fast tests."""

from __future__ import annotations

import numpy as np

from dadh_dist.config import DataConfig
from dadh_dist.data.base import Dataset
from dadh_dist.data.fashion import split_single_label
from dadh_dist.data.problems import Problems


def load_digits(cfg: DataConfig, problems: Problems | None = None) -> Dataset:
    """1,797 images (N, 1, 8, 8); pixel values 0..16 scaled by 16 into uint8 (16 -> 255)."""
    from sklearn.datasets import load_digits as sk_load_digits  # slow import, only when used

    d = sk_load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)[:, None]
    return split_single_label("digits", images, d.target.astype(np.int64), 10, cfg, problems)
