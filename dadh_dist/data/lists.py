"""List-file datasets (NUS-WIDE, MS-COCO, ImageNet-100 style): `relative/path.jpg 0 1 0 ...`.

The folder holds test.txt (queries), database.txt or else train.txt (database), and optionally
val.txt (validation; otherwise val_per_class * classes random database rows are held out).
Paths are relative to the folder and may not contain spaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.images import DECODE_ERRORS, decode, run_chunked
from dadh_dist.data.splits import STREAM_HOLDOUT, limit_rows, rng

DEFAULT_SIZE = 224


@dataclass
class Entries:
    """The parsed rows of one list file. ids: row index in the file; lines: 1-based line numbers."""

    file: Path
    paths: list[str]
    labels: np.ndarray
    ids: np.ndarray
    lines: np.ndarray

    def take(self, rows: np.ndarray) -> Entries:
        return Entries(self.file, [self.paths[i] for i in rows], self.labels[rows],
                       self.ids[rows], self.lines[rows])


@dataclass
class _Width:
    """The label width every line must have, and where it was first seen."""

    n: int = -1
    where: str = ""


def parse_list(file: Path, width: _Width) -> Entries:
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read list file ({e})") from None
    paths, rows, lines = [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        labels = tokens[1:]
        if width.n < 0:
            if not labels:
                raise DataError(f"{file}:{lineno}: no labels after the image path")
            width.n, width.where = len(labels), f"{file}:{lineno}"
        if len(labels) != width.n:
            raise DataError(f"{file}:{lineno}: {len(labels)} labels, but {width.where} has "
                            f"{width.n}")
        if not set(labels) <= {"0", "1"}:
            bad = next(t for t in labels if t not in ("0", "1"))
            raise DataError(f"{file}:{lineno}: label {bad!r} is not 0 or 1")
        paths.append(tokens[0])
        rows.append([t == "1" for t in labels])
        lines.append(lineno)
    if not paths:
        raise DataError(f"{file}: list file has no entries")
    n = len(paths)
    return Entries(file, paths, np.array(rows, np.uint8), np.arange(n, dtype=np.int64),
                   np.array(lines, np.int64))


def load_images(entries: Entries, root: Path, size: int) -> np.ndarray:
    """Decode every listed image to RGB size x size: (n, 3, size, size) uint8."""
    out = np.empty((len(entries.paths), 3, size, size), np.uint8)

    def fill(i: int) -> None:
        path = entries.paths[i]
        try:
            out[i] = decode(root / path, size, rgb=True)
        except FileNotFoundError:
            raise DataError(f"{entries.file}:{entries.lines[i]}: image {path} not found") from None
        except DECODE_ERRORS as e:
            raise DataError(f"{entries.file}:{entries.lines[i]}: image {path} is unreadable "
                            f"({e})") from None

    run_chunked(len(out), fill)
    return out


def _check_disjoint(parts: list[Entries]) -> None:
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            shared = set(a.paths).intersection(b.paths)
            if shared:
                raise DataError(f"{b.file}: image {min(shared)} is also listed in {a.file}; "
                                f"query, validation and database must be disjoint")


def load_list(cfg: DataConfig) -> Dataset:
    if not cfg.root:
        raise DataError("list: set data.root to the folder holding test.txt and database.txt")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{root}: list folder not found")
    test = root / "test.txt"
    if not test.is_file():
        raise DataError(f"{test}: query list not found")
    db = root / "database.txt"
    if not db.is_file():
        db = root / "train.txt"
        if not db.is_file():
            raise DataError(f"{root}: neither database.txt nor train.txt found")
    width = _Width()
    query, database = parse_list(test, width), parse_list(db, width)
    if (root / "val.txt").is_file():
        validation = parse_list(root / "val.txt", width)
    else:
        n_val = cfg.val_per_class * width.n
        if n_val >= len(database.paths):
            raise DataError(f"{db}: {len(database.paths)} rows, too few to hold out "
                            f"val_per_class * classes = {n_val} validation rows")
        held = np.zeros(len(database.paths), bool)
        held[rng(cfg.seed, STREAM_HOLDOUT).choice(len(held), n_val, replace=False)] = True
        validation = database.take(np.flatnonzero(held))
        database = database.take(np.flatnonzero(~held))
    _check_disjoint([query, validation, database])
    empty = np.flatnonzero(database.labels.sum(0) == 0)
    if empty.size:
        raise DataError(f"{db}: class {empty[0]} has no database image")
    kept = limit_rows(len(database.paths), cfg.database_limit, cfg.seed)
    if kept is not None:
        database = database.take(kept)

    size = cfg.image_size or DEFAULT_SIZE
    splits = {name: Split(load_images(e, root, size), e.labels, e.ids)
              for name, e in (("query", query), ("validation", validation),
                              ("database", database))}
    multi = any(bool((s.labels.sum(1) != 1).any()) for s in splits.values())
    return Dataset(root.resolve().name or "list", **splits, multi_label=multi)
