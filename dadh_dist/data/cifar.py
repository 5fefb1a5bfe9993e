"""CIFAR-10 from torchvision's python-pickle folder `cifar-10-batches-py`."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset
from dadh_dist.data.fashion import split_single_label
from dadh_dist.data.problems import Problems

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
NUM_CLASSES = 10
# Everything a CIFAR batch legitimately contains; anything else in a pickle is refused rather
# than executed.
_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.numeric", "_frombuffer"),  # arrays in pickle protocol 5
    ("_codecs", "encode"),  # bytes in protocol 2 written by Python 3 (a str and its codec)
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith("numpy.core"):  # pickles written by numpy < 2
            module = "numpy._core" + module.removeprefix("numpy.core")
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images (n, 3, 32, 32) uint8, y (n,) int64."""
    if not path.is_file():
        raise DataError(f"{path}: CIFAR-10 batch file not found")
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DataError(f"{path}: unreadable CIFAR-10 pickle ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    y = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if y.shape != (len(data),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: b'labels' must hold {len(data)} integers, got {y.dtype} "
                        f"{y.shape}")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels outside 0..{NUM_CLASSES - 1}")
    # Each row is the red, green, then blue 32x32 plane, row-major.
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def load_cifar10(cfg: DataConfig, problems: Problems | None = None) -> Dataset:
    """All 60,000 images pooled (ids: training batches in order, then the test batch). Every
    batch file is checked before failing; a bad one is never skippable."""
    problems = problems or Problems()
    if not cfg.root:
        raise DataError("cifar10: set data.root to the cifar-10-batches-py folder")
    folder = Path(cfg.root)
    if not folder.is_dir():
        raise DataError(f"{folder}: CIFAR-10 folder not found")
    parts = []
    for name in BATCHES:
        try:
            parts.append(read_batch(folder / name))
        except DataError as e:
            problems.absorb(e)
    if problems.blocking():
        problems.fail()
    images = np.concatenate([x for x, _ in parts])
    y = np.concatenate([y for _, y in parts])
    return split_single_label("cifar10", images, y, NUM_CLASSES, cfg, problems, str(folder))
