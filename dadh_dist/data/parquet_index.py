"""The rows of one split of a folder of Parquet shards, read by range: what one worker of a
sharded B needs of the database (docs/scaling.md §4), without reading the other rows.

    index = SplitIndex.open(root)             # footers, and the split column where it must
    labels = index.labels(start, stop)        # (stop - start, c) uint8, database rows in order
    split, ok = index.read(start, stop, size, problems)   # labels, ids and decoded images

Row i of a split is the i-th row with that split in shard-name order and row order, the order
`load_parquet` gives each split (every row kept). The index is built from the footers: a row
group whose `split` statistics show one value is counted without reading it; only a row group
with more than one value has its split column read. Either way a value that is no split (or a
null) is a DataError naming the shard and row, as when loading: no row is silently in no split.
Reading [start, stop) then touches the row groups that overlap it, one at a time.

A label row that is null, empty, of another width than the first, or not 0/1, and a null id,
are a DataError naming the shard and row, as when loading. An image that is null or does not
decode is a problem recorded in `problems` (skippable under data.skip_bad, as when loading);
`read` returns which rows' images are good.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dadh_dist.data.base import DataError, Split
from dadh_dist.data.images import decode_all
from dadh_dist.data.parquet import SPLITS, int64_ids, is_label_list
from dadh_dist.data.problems import Problems

DATABASE = SPLITS[2]


@dataclass(frozen=True)
class _Group:
    path: Path
    index: int  # the row group's number in its file
    first_row: int  # the group's first row in its file
    rows: int  # rows in the group, of any split
    first: int  # row number in the split of the group's first row of the split
    count: int  # rows of the split in the group
    mixed: bool  # holds rows of other splits too: its split column says which


class SplitIndex:
    """Where each row of one split of the shards under `root` lies (see the module docstring)."""

    def __init__(self, root: Path, split: str, groups: list[_Group], metadata: dict):
        self.root = root
        self.split = split
        self.metadata = metadata
        """The first shard's schema metadata (the dataset's name, multi-label flag)."""
        self.scanned = sum(g.mixed for g in groups)
        """Row groups whose split column had to be read to count their rows of the split."""
        self.groups = [g for g in groups if g.count]
        self.n = sum(g.count for g in self.groups)
        self._starts = np.array([g.first for g in self.groups], dtype=np.int64)
        self._width: int | None = None

    @classmethod
    def open(cls, root: str | Path, split: str = DATABASE) -> SplitIndex:
        root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if not root.is_dir():
            raise DataError(f"{root}: parquet folder not found")
        paths = sorted(root.glob("*.parquet"))
        if not paths:
            raise DataError(f"{root}: no *.parquet shards")
        groups, first = [], 0
        for path in paths:
            for g in _groups(path, first, split):
                groups.append(g)
                first += g.count
        metadata = _read(paths[0], lambda f: f.schema_arrow.metadata) or {}
        index = cls(root, split, groups, metadata)
        if index.n == 0:
            raise DataError(f"{root}: no {split} rows in any shard")
        return index

    def _overlapping(self, start: int, stop: int):
        """(group, a, b) for each row group holding rows [a, b) of [start, stop)."""
        if not 0 <= start <= stop <= self.n:
            raise ValueError(f"{self.split} rows [{start}, {stop}) outside [0, {self.n})")
        lo = max(int(np.searchsorted(self._starts, start, side="right")) - 1, 0)
        for g in self.groups[lo:]:
            if g.first >= stop:
                break
            if g.first + g.count > start:
                yield g, max(start, g.first), min(stop, g.first + g.count)

    def labels(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, c) uint8: the labels of rows [start, stop)."""
        out = None  # filled one row group at a time: the block and one group's rows at most
        for g, a, b in self._overlapping(start, stop):
            table, rows = self._group(g, ["labels"])
            values = self._labels(g, table, rows)
            if out is None:
                out = np.empty((stop - start, values.shape[1]), np.uint8)
            out[a - start:b - start] = values[a - g.first:b - g.first]
        return out if out is not None else np.zeros((0, self._width or 0), np.uint8)

    def read(self, start: int, stop: int, size: int, problems: Problems,
             ) -> tuple[Split, np.ndarray]:
        """Rows [start, stop) as a Split (images decoded to size × size when size > 0) and which
        rows' images are good (bad ones: zero pixels, recorded in `problems`). Every row group
        is decoded on its own; an image whose shape differs from the first good one's is a
        blocking problem, as when loading."""
        labels = ids = images = None
        ok = np.zeros(stop - start, bool)
        ref: tuple[str, tuple] | None = None  # where the shape images must have comes from
        for g, a, b in self._overlapping(start, stop):
            table, rows = self._group(g, ["labels", "id", "image"])
            values = self._labels(g, table, rows)[a - g.first:b - g.first]
            picked = rows[a - g.first:b - g.first]
            where = [f"{g.path}: row {g.first_row + int(r)}" for r in picked]
            group_ids = table.column("id").combine_chunks().take(pa.array(picked))
            nulls = np.flatnonzero(group_ids.is_null().to_numpy(zero_copy_only=False))
            if nulls.size:
                raise DataError(f"{where[nulls[0]]}: id is null")
            col = table.column("image").combine_chunks()
            if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
                raise DataError(f"{g.path}: column image must be binary, got {col.type}")
            got, good, _ = decode_all(col.take(pa.array(picked)).to_pylist(),
                                      lambda j, where=where: (where[j], "image"), size, False,
                                      problems)
            del table, col
            if labels is None:
                labels = np.empty((stop - start, values.shape[1]), np.uint8)
                ids = np.empty(stop - start, np.int64)
            labels[a - start:b - start] = values
            ids[a - start:b - start] = int64_ids(str(g.path), group_ids)
            if not good.any():
                continue
            first = int(np.flatnonzero(good)[0])
            if ref is None:
                ref = (where[first], got.shape[1:])
                images = np.zeros((stop - start, *ref[1]), np.uint8)  # bad rows stay zero
            elif got.shape[1:] != ref[1]:
                problems.add(where[first], f"image has shape {got.shape[1:]}, but {ref[0]} "
                             f"has {ref[1]} (set data.image_size to resize)")
                continue
            images[a - start:b - start][good] = got[good]
            ok[a - start:b - start] = good
        if labels is None:
            labels, ids = np.zeros((0, self._width or 0), np.uint8), np.zeros(0, np.int64)
        if images is None:  # no good image: the shape from the settings alone
            images = np.zeros((stop - start, 1, size, size), np.uint8)
        return Split(images, labels, ids), ok

    def _group(self, g: _Group, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
        """Some columns of one row group, and the positions in it of the split's rows."""
        table = _read(g.path, lambda f: f.read_row_group(
            g.index, columns=[*columns, "split"] if g.mixed else columns))
        rows = np.arange(g.rows)
        if g.mixed:
            rows = rows[_is_split(table.column("split"), self.split)]
        return table, rows

    def _labels(self, g: _Group, table: pa.Table, rows: np.ndarray) -> np.ndarray:
        """The split's rows' labels of one row group, checked."""
        col = table.column("labels").combine_chunks()
        if not is_label_list(col.type):
            raise DataError(f"{g.path}: column labels must be list<uint8>, got {col.type}")
        col = col.take(pa.array(rows))

        def where(j: int) -> str:
            return f"{g.path}: row {g.first_row + int(rows[j])}"

        nulls = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
        if nulls.size:
            raise DataError(f"{where(nulls[0])}: labels is null")
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if self._width is None and lengths.size:
            self._width = int(lengths[0]) or None
        bad = np.flatnonzero((lengths == 0) | (lengths != (self._width or 0)))
        if bad.size:
            j = bad[0]
            raise DataError(f"{where(j)}: " + ("labels list is empty" if lengths[j] == 0 else
                            f"{lengths[j]} labels, but the first {self.split} row has "
                            f"{self._width}"))
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), self._width)
        off = np.flatnonzero(((values != 0) & (values != 1)).any(1))
        if off.size:
            raise DataError(f"{where(off[0])}: labels must be 0 or 1")
        none = np.flatnonzero(~values.any(1))
        if none.size:
            raise DataError(f"{where(none[0])}: no label is 1 (every image needs a class)")
        return values.astype(np.uint8, copy=False)


def _read(path: Path, what):
    try:
        return what(pq.ParquetFile(path))
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: unreadable parquet shard or missing column ({e})") from None


def _groups(path: Path, first: int, split: str) -> list[_Group]:
    """The row groups of one shard, their rows of `split` counted from the footer where the
    split column's statistics decide it, from the split column where they do not."""
    meta = _read(path, lambda f: f.metadata)
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    for need in ("labels", "split"):
        if not any(name == need or name.startswith(need + ".") for name in names):
            raise DataError(f"{path}: missing column {need}")
    split_at = names.index("split")
    out, row = [], 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        count, mixed = _count_from_stats(rg.column(split_at), rg.num_rows, split, path, row)
        if count is None:
            column = _read(path, lambda f, i=i: f.read_row_group(i, columns=["split"]))
            _check_values(column.column("split"), path, row)
            count, mixed = int(_is_split(column.column("split"), split).sum()), True
        out.append(_Group(path, i, row, rg.num_rows, first, count, mixed))
        first += count
        row += rg.num_rows
    return out


def _count_from_stats(column, rows: int, split: str, path: Path,
                      first_row: int) -> tuple[int | None, bool]:
    """(rows of `split`, mixed) from a row group's split statistics; (None, True) when they
    cannot tell: no statistics, nulls, or more than one value (then another value, one that is
    no split, may lie between the two, which only the column itself tells)."""
    stats = column.statistics
    if rows == 0:
        return 0, False
    if stats is None or not stats.has_min_max or stats.null_count:
        return None, True
    lo, hi = stats.min, stats.max
    lo, hi = (v.decode() if isinstance(v, bytes) else v for v in (lo, hi))
    if lo != hi:
        return None, True
    if lo not in SPLITS:  # every row of the group: the first one is named
        raise DataError(f"{path}: row {first_row}: split {lo!r} is not one of "
                        f"{', '.join(SPLITS)}")
    return (rows, False) if lo == split else (0, False)


def _check_values(column: pa.ChunkedArray, path: Path, first_row: int) -> None:
    """The split column of a row group holds only split names: else a DataError naming the
    shard and row, as loading the whole folder does (a structural problem: never skipped)."""
    known = pc.is_in(column, value_set=pa.array(SPLITS)).fill_null(False)
    bad = np.flatnonzero(~known.to_numpy(zero_copy_only=False))
    if bad.size:
        r = int(bad[0])
        value = column[r].as_py()
        what = "split is null" if value is None else (
            f"split {value!r} is not one of {', '.join(SPLITS)}")
        more = f" (and {bad.size - 1} more row(s) of the group)" if bad.size > 1 else ""
        raise DataError(f"{path}: row {first_row + r}: {what}{more}")


def _is_split(column: pa.ChunkedArray, split: str) -> np.ndarray:
    return pc.equal(column, split).fill_null(False).to_numpy(zero_copy_only=False)
