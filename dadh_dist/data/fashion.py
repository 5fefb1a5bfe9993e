"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` or a folder of its IDX files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.idx import read_idx
from dadh_dist.data.splits import STREAM_SPLIT, one_hot, rng, split_per_class

PACKAGE = "dataset-fashion-mnist"
NUM_CLASSES = 10
NOT_FOUND = (f"Fashion-MNIST not found: install it with `apt-get install -y {PACKAGE}` "
             "or set data.root to a folder with the IDX files")


def find_fashion_mnist() -> Path:
    """The folder holding the IDX files, as listed by `dpkg -L dataset-fashion-mnist`."""
    try:
        out = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise DataError(NOT_FOUND) from None
    for line in out.stdout.splitlines():
        p = Path(line.strip())
        if p.name == "train-images-idx3-ubyte.gz":
            return p.parent
    raise DataError(NOT_FOUND)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / stem}.gz: Fashion-MNIST file not found")


def read_fashion_mnist(root: str | Path = "") -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images pooled: images (N, 1, 28, 28) uint8, y (N,) int64 class indices.

    Index i < 60,000 is training image i; 60,000 + j is test image j.
    """
    folder = Path(root) if root else find_fashion_mnist()
    if not folder.is_dir():
        raise DataError(f"{folder}: Fashion-MNIST folder not found")
    images, ys = [], []
    for part in ("train", "t10k"):
        img_path = _idx_file(folder, f"{part}-images-idx3-ubyte")
        lab_path = _idx_file(folder, f"{part}-labels-idx1-ubyte")
        x, y = read_idx(img_path), read_idx(lab_path)
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DataError(f"{img_path}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{lab_path}: expected {len(x)} labels, got shape {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise DataError(f"{lab_path}: labels outside 0..{NUM_CLASSES - 1}")
        images.append(x[:, None])
        ys.append(y.astype(np.int64))
    if images[0].shape[2:] != images[1].shape[2:]:
        raise DataError(f"{folder}: train and test images differ in size")
    return np.concatenate(images), np.concatenate(ys)


def split_single_label(
    name: str, images: np.ndarray, y: np.ndarray, num_classes: int, cfg: DataConfig
) -> Dataset:
    """Per-class split of a pooled single-label source (ids = index in the pool)."""
    parts = split_per_class(y, num_classes, cfg.query_per_class, cfg.val_per_class,
                            rng(cfg.seed, STREAM_SPLIT), name)
    q, v, d = (Split(images[i], one_hot(y[i], num_classes), i) for i in parts)
    return Dataset(name, query=q, validation=v, database=d, multi_label=False)


def load_fashion_mnist(cfg: DataConfig) -> Dataset:
    images, y = read_fashion_mnist(cfg.root)
    return split_single_label("fashion_mnist", images, y, NUM_CLASSES, cfg)
