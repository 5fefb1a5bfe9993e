"""The database rows of a folder of Parquet shards, read by range: what one worker of a sharded
B needs of the labels (docs/scaling.md §4), without reading the other rows or any image.

    index = DatabaseIndex.open(root)          # footers, and the split column where it must
    labels = index.labels(start, stop)        # (stop - start, c) uint8, database rows in order

Database row i is the i-th row with split = database in shard-name order and row order, the
order `load_parquet` gives the database (every row kept). The index is built from the footers:
a row group whose `split` statistics say it holds only database rows, or none, is counted
without reading it; only a row group that mixes splits has its split column read. Reading
[start, stop) then touches the labels column of the row groups that overlap it, one at a time.

A label row that is null, empty, of another width than the first, or not 0/1 is a DataError
naming the shard and row, as when loading. This reader does not decode images, so it cannot
know which images `data.skip_bad` would drop; its row numbers are those of a database with every
image readable, and `data.database_limit` has no meaning here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dadh_dist.data.base import DataError
from dadh_dist.data.parquet import SPLITS, is_label_list

DATABASE = SPLITS[2]


@dataclass(frozen=True)
class _Group:
    path: Path
    index: int  # the row group's number in its file
    first_row: int  # the group's first row in its file
    rows: int  # rows in the group, of any split
    first: int  # database row number of the group's first database row
    count: int  # database rows in the group
    mixed: bool  # holds rows of other splits too: its split column says which


class DatabaseIndex:
    """Where each database row of the shards under `root` lies (see the module docstring)."""

    def __init__(self, root: Path, groups: list[_Group]):
        self.root = root
        self.scanned = sum(g.mixed for g in groups)
        """Row groups whose split column had to be read to count their database rows."""
        self.groups = [g for g in groups if g.count]
        self.n = sum(g.count for g in self.groups)
        self._starts = np.array([g.first for g in self.groups], dtype=np.int64)
        self._width: int | None = None

    @classmethod
    def open(cls, root: str | Path) -> DatabaseIndex:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: parquet folder not found")
        paths = sorted(root.glob("*.parquet"))
        if not paths:
            raise DataError(f"{root}: no *.parquet shards")
        groups, first = [], 0
        for path in paths:
            for g in _groups(path, first):
                groups.append(g)
                first += g.count
        index = cls(root, groups)
        if index.n == 0:
            raise DataError(f"{root}: no database rows in any shard")
        return index

    def labels(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, c) uint8: the labels of database rows [start, stop)."""
        if not 0 <= start <= stop <= self.n:
            raise ValueError(f"database rows [{start}, {stop}) outside [0, {self.n})")
        out = None  # filled one row group at a time: the block and one group's rows at most
        lo = max(int(np.searchsorted(self._starts, start, side="right")) - 1, 0)
        for g in self.groups[lo:]:
            if g.first >= stop:
                break
            if g.first + g.count <= start:
                continue
            values = self._group_labels(g)
            a, b = max(start, g.first), min(stop, g.first + g.count)
            if out is None:
                out = np.empty((stop - start, values.shape[1]), np.uint8)
            out[a - start:b - start] = values[a - g.first:b - g.first]
        return out if out is not None else np.zeros((0, self._width or 0), np.uint8)

    def _group_labels(self, g: _Group) -> np.ndarray:
        """The database rows' labels of one row group, checked."""
        columns = ["labels", "split"] if g.mixed else ["labels"]
        table = _read(g.path, lambda f: f.read_row_group(g.index, columns=columns))
        rows = np.arange(g.rows)
        if g.mixed:
            rows = rows[_is_database(table.column("split"))]
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
                            f"{lengths[j]} labels, but the first database row has "
                            f"{self._width}"))
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), self._width)
        off = np.flatnonzero(((values != 0) & (values != 1)).any(1))
        if off.size:
            raise DataError(f"{where(off[0])}: labels must be 0 or 1")
        return values.astype(np.uint8, copy=False)


def _read(path: Path, what):
    try:
        return what(pq.ParquetFile(path))
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: unreadable parquet shard or missing column ({e})") from None


def _groups(path: Path, first: int) -> list[_Group]:
    """The row groups of one shard, their database rows counted from the footer where the
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
        count, mixed = _count_from_stats(rg.column(split_at), rg.num_rows)
        if count is None:
            split = _read(path, lambda f, i=i: f.read_row_group(i, columns=["split"]))
            count, mixed = int(_is_database(split.column("split")).sum()), True
        out.append(_Group(path, i, row, rg.num_rows, first, count, mixed))
        first += count
        row += rg.num_rows
    return out


def _count_from_stats(column, rows: int) -> tuple[int | None, bool]:
    """(database rows, mixed) from a row group's split statistics; (None, True) when they
    cannot tell (no statistics, nulls, or both database and other rows)."""
    stats = column.statistics
    if rows == 0:
        return 0, False
    if stats is None or not stats.has_min_max or stats.null_count:
        return None, True
    lo, hi = stats.min, stats.max
    lo, hi = (v.decode() if isinstance(v, bytes) else v for v in (lo, hi))
    if lo == hi == DATABASE:
        return rows, False
    if not lo <= DATABASE <= hi:
        return 0, False
    return None, True


def _is_database(split: pa.ChunkedArray) -> np.ndarray:
    return pc.equal(split, DATABASE).fill_null(False).to_numpy(zero_copy_only=False)
