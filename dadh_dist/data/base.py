"""The one internal form of every source: disjoint splits of uint8 images and 0/1 labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dadh_dist.data.problems import DataError


@dataclass
class Split:
    """One split. images: (N, C, H, W) uint8; labels: (N, c) uint8 0/1; ids: (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    """Index of each image in its source (file order, row of a list file, canvas number)."""
    digests: np.ndarray | None = None
    """(N,) uint64 pixel digest of each image (images.pixel_digest), kept only by check-data's
    scan of file-based sources, whose images then hold no pixels; None otherwise."""

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                            f"{self.images.shape}")
        if self.labels.dtype != np.uint8 or self.labels.ndim != 2 or len(self.labels) != n:
            raise DataError(f"labels must be uint8 ({n}, c), got {self.labels.dtype} "
                            f"{self.labels.shape}")
        if self.ids.dtype != np.int64 or self.ids.shape != (n,):
            raise DataError(f"ids must be int64 ({n},), got {self.ids.dtype} {self.ids.shape}")
        d = self.digests
        if d is not None and (d.dtype != np.uint64 or d.shape != (n,)):
            raise DataError(f"digests must be uint64 ({n},), got {d.dtype} {d.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def take(self, rows: np.ndarray) -> Split:
        ids = self.ids[rows]
        if self.images.strides[0] == 0 and len(self.images) and len(ids):
            # check-data keeps no pixels (a zero-stride placeholder); indexing would allocate them
            images = np.broadcast_to(self.images[:1], (len(ids), *self.images.shape[1:]))
        else:
            images = self.images[rows]
        digests = None if self.digests is None else self.digests[rows]
        return Split(images, self.labels[rows], ids, digests)


@dataclass
class Dataset:
    name: str
    query: Split
    validation: Split
    database: Split
    """The training set; retrieval ranks it for every query."""
    multi_label: bool
    skipped: int = 0
    """Unreadable or missing images dropped under data.skip_bad (0 without it)."""

    @property
    def num_classes(self) -> int:
        return self.database.labels.shape[1]

    @property
    def channels(self) -> int:
        return self.database.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.database.images.shape[2]

    def splits(self) -> dict[str, Split]:
        return {"query": self.query, "validation": self.validation, "database": self.database}
