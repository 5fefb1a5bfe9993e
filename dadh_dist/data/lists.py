"""List-file datasets (NUS-WIDE, MS-COCO, ImageNet-100 style): `relative/path.jpg 0 1 0 ...`.

The folder holds test.txt (queries), database.txt or else train.txt (database), and optionally
val.txt (validation; otherwise val_per_class * classes random database rows are held out).
Paths are relative to the folder and may not contain spaces.

A missing or unreadable image is skippable (data.skip_bad). A malformed line (no labels, the wrong
number of labels, a label other than 0/1, no label 1), an image listed twice, a missing list,
lists that share an image (compared as normalised paths) and a class without database images are
structural: never skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.images import decode_all
from dadh_dist.data.problems import LabelWidth, Problems, check_classes, check_limited
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


READ_ERRORS = (OSError, UnicodeDecodeError)


def list_lines(file: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, tokens) of every non-blank line of a list file (`path [labels]`);
    the file's read errors (READ_ERRORS) reach the caller. Training and encoding both read
    list files through it."""
    text = file.read_text(encoding="utf-8-sig")  # a Windows editor's byte-order mark is no path
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.split()]


def parse_list(file: Path, width: LabelWidth, problems: Problems) -> Entries:
    """Every well-formed line of `file`; each malformed one is recorded as a problem."""
    try:
        numbered, readable = list_lines(file), True
    except READ_ERRORS as e:
        problems.add(file, f"cannot read list file ({e})")
        numbered, readable = [], False
    paths, rows, lines = [], [], []
    first_line: dict[str, int] = {}
    for lineno, tokens in numbered:
        where, labels = f"{file}:{lineno}", tokens[1:]
        if width.n < 0:
            if not labels:
                problems.add(where, "no labels after the image path")
                continue
            width.n, width.where = len(labels), where
        if len(labels) != width.n:
            problems.add(where, f"{len(labels)} labels, but {width.where} has {width.n}")
            continue
        bad = [t for t in labels if t not in ("0", "1")]
        if bad:
            problems.add(where, f"label {bad[0]!r} is not 0 or 1")
            continue
        if "1" not in labels:
            problems.add(where, "no label is 1 (every image needs a class)")
            continue
        key = image_key(tokens[0])
        if key in first_line:
            problems.add(where, f"image {tokens[0]} is listed again (line {first_line[key]})")
            continue
        first_line[key] = lineno
        paths.append(tokens[0])
        rows.append([t == "1" for t in labels])
        lines.append(lineno)
    n = len(paths)
    if n == 0 and readable:
        problems.add(file, "list file has no usable entries")
    return Entries(file, paths, np.array(rows, np.uint8).reshape(n, max(width.n, 0)),
                   np.arange(n, dtype=np.int64), np.array(lines, np.int64))


def decode_entries(entries: Entries, root: Path, size: int, problems: Problems) -> Split:
    """The split of the listed images that decode, as RGB size x size."""
    images, ok, digests = decode_all([root / p for p in entries.paths],
                                     lambda i: (f"{entries.file}:{entries.lines[i]}",
                                                f"image {entries.paths[i]}"),
                                     size, True, problems)
    split = Split(images, entries.labels, entries.ids, digests)
    return split if ok.all() else split.take(np.flatnonzero(ok))


def image_key(path: str) -> str:
    """What two spellings of one listed image share (`./a/b.png`, `a//b.png`, `a/x/../b.png`)."""
    return os.path.normpath(path)


def check_disjoint(parts: list[Entries], problems: Problems) -> None:
    """One problem per pair of lists sharing images, naming the first shared line of each."""
    for i, a in enumerate(parts):
        line_of = {image_key(p): line for p, line in zip(a.paths, a.lines)}
        for b in parts[i + 1:]:
            shared = [(p, line) for p, line in zip(b.paths, b.lines) if image_key(p) in line_of]
            if shared:
                p, line = shared[0]
                count = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
                problems.add(f"{b.file}:{line}", f"image {p} is also listed in "
                             f"{a.file}:{line_of[image_key(p)]}{count}; query, validation and "
                             "database must be disjoint")


def load_list(cfg: DataConfig, problems: Problems | None = None) -> Dataset:
    problems = problems or Problems(skip_bad=cfg.skip_bad)
    if not cfg.root:
        raise DataError("list: set data.root to the folder holding test.txt and database.txt")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{root}: list folder not found")
    test = root / "test.txt"
    if not test.is_file():
        problems.add(test, "query list not found")
    db = root / "database.txt"
    if not db.is_file():
        db = root / "train.txt"
        if not db.is_file():
            problems.add(root, "neither database.txt nor train.txt found")
    if problems.items:
        problems.fail()

    width = LabelWidth()
    query, database = parse_list(test, width, problems), parse_list(db, width, problems)
    val_file = root / "val.txt"
    validation = parse_list(val_file, width, problems) if val_file.is_file() else None
    if any(e is not None and not e.paths for e in (query, database, validation)):
        problems.fail()
    problems.barrier()

    if validation is None:
        n_val = cfg.val_per_class * width.n
        if n_val >= len(database.paths):
            problems.add("data.val_per_class", f"{db} has {len(database.paths)} rows, too few "
                         f"to hold out val_per_class * classes = {n_val} validation rows")
            problems.fail()
        held = np.zeros(len(database.paths), bool)
        held[rng(cfg.seed, STREAM_HOLDOUT).choice(len(held), n_val, replace=False)] = True
        validation = database.take(np.flatnonzero(held))
        database = database.take(np.flatnonzero(~held))
    check_disjoint([query, validation, database], problems)
    check_classes(database.labels, str(db), problems)
    problems.barrier()
    kept = limit_rows(len(database.paths), cfg.database_limit, cfg.seed)
    if kept is not None:
        database = database.take(kept)
        check_limited(database.labels, cfg.database_limit, problems)
        problems.barrier()

    size = cfg.image_size or DEFAULT_SIZE
    splits = {name: decode_entries(e, root, size, problems)
              for name, e in (("query", query), ("validation", validation),
                              ("database", database))}
    problems.barrier()
    if len(splits["database"]) < len(database.paths) and database.labels.sum(0).all():
        check_classes(splits["database"].labels, str(db), problems,
                      " left without its unreadable images")
        problems.barrier()
    multi = any(bool((s.labels.sum(1) != 1).any()) for s in splits.values())
    return Dataset(root.resolve().name or "list", **splits, multi_label=multi)
