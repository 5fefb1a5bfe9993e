"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` or a folder of its IDX files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.idx import read_idx
from dadh_dist.data.problems import Problems
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


def fashion_folder(root: str | Path = "") -> Path:
    """data.root, or the Debian package's folder when it is empty."""
    folder = Path(root) if root else find_fashion_mnist()
    if not folder.is_dir():
        raise DataError(f"{folder}: Fashion-MNIST folder not found")
    return folder


def _read_part(folder: Path, part: str, problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    """One of train / t10k: images (n, 1, h, w) uint8 and y (n,) int64 (empty on a problem)."""
    arrays = []
    for stem in (f"{part}-images-idx3-ubyte", f"{part}-labels-idx1-ubyte"):
        path = next((folder / n for n in (f"{stem}.gz", stem) if (folder / n).is_file()), None)
        if path is None:
            problems.add(f"{folder / stem}.gz", "Fashion-MNIST file not found")
            continue
        try:
            arrays.append((path, read_idx(path)))
        except DataError as e:
            problems.absorb(e)
    if len(arrays) < 2:
        return np.zeros((0, 1, 0, 0), np.uint8), np.zeros(0, np.int64)
    (img_path, x), (lab_path, y) = arrays
    if x.dtype != np.uint8 or x.ndim != 3:
        problems.add(img_path, f"expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
    elif y.dtype.kind not in "iu":
        problems.add(lab_path, f"expected integer class labels, got {y.dtype}")
    elif y.ndim != 1 or len(y) != len(x):
        problems.add(lab_path, f"expected {len(x)} labels, got shape {y.shape}")
    elif y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        problems.add(lab_path, f"labels outside 0..{NUM_CLASSES - 1}")
    else:
        return x[:, None], y.astype(np.int64)
    return np.zeros((0, 1, 0, 0), np.uint8), np.zeros(0, np.int64)


def read_fashion_mnist(
    root: str | Path = "", problems: Problems | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images pooled: images (N, 1, 28, 28) uint8, y (N,) int64 class indices.

    Index i < 60,000 is training image i; 60,000 + j is test image j. All four IDX files are
    checked before failing; a truncated or missing one is never skippable.
    """
    problems = problems or Problems()
    folder = fashion_folder(root)
    parts = [_read_part(folder, part, problems) for part in ("train", "t10k")]
    if problems.blocking():
        problems.fail()
    (x_train, y_train), (x_test, y_test) = parts
    if x_train.shape[2:] != x_test.shape[2:]:
        problems.add(folder, "train and test images differ in size")
        problems.fail()
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])


def split_single_label(
    name: str, images: np.ndarray, y: np.ndarray, num_classes: int, cfg: DataConfig,
    problems: Problems | None = None, where: str = "",
) -> Dataset:
    """Per-class split of a pooled single-label source (ids = index in the pool); a class too
    small is reported under `where` (default: the name)."""
    parts = split_per_class(y, num_classes, cfg.query_per_class, cfg.val_per_class,
                            rng(cfg.seed, STREAM_SPLIT), where or name, problems)
    q, v, d = (Split(images[i], one_hot(y[i], num_classes), i) for i in parts)
    return Dataset(name, query=q, validation=v, database=d, multi_label=False)


def load_fashion_mnist(cfg: DataConfig, problems: Problems | None = None) -> Dataset:
    folder = fashion_folder(cfg.root)
    images, y = read_fashion_mnist(folder, problems)
    return split_single_label("fashion_mnist", images, y, NUM_CLASSES, cfg, problems,
                              f"{folder} (fashion_mnist)")
