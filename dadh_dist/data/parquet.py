"""Parquet shards: one row per image with columns image (PNG bytes), labels (list<uint8>),
split (query / validation / database) and id (int64); read and written with pyarrow.

A row with a null or undecodable image is skippable (data.skip_bad); an unreadable (e.g.
truncated) shard, a missing column and a null, wrong-width or non-0/1 label row never are.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.images import decode_all, run_chunked
from dadh_dist.data.problems import LabelWidth, Problems, check_classes
from dadh_dist.uris import first_line

SPLITS = ("query", "validation", "database")
SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("labels", pa.list_(pa.uint8())),
    ("split", pa.string()),
    ("id", pa.int64()),
])
META_NAME, META_MULTI = b"dadh_dist.name", b"dadh_dist.multi_label"


def _encode_png(img: np.ndarray) -> bytes:
    """(C, H, W) uint8 with C = 1 (stored as grayscale) or 3 (RGB) -> PNG bytes."""
    pil = Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def dataset_to_parquet(ds: Dataset, out_dir: str | Path, rows_per_shard: int = 10000) -> list[Path]:
    """Write `ds` as shards part-00000.parquet, ... into an empty (or new) folder.

    Rows go query, then validation, then database, so reading the shards back in name order
    gives the same arrays.
    """
    out = Path(out_dir)
    if rows_per_shard < 1:
        raise DataError(f"rows_per_shard: must be >= 1, got {rows_per_shard}")
    if ds.channels not in (1, 3):
        raise DataError(f"{ds.name}: only 1- or 3-channel images can be stored as PNG, "
                        f"got {ds.channels}")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.parquet")):
        raise DataError(f"{out}: already holds parquet shards; write into an empty folder")
    splits = ds.splits()
    rows = [(name, i) for name, s in splits.items() for i in range(len(s))]
    schema = SCHEMA.with_metadata({META_NAME: ds.name.encode(),
                                   META_MULTI: b"true" if ds.multi_label else b"false"})
    c = ds.num_classes
    written = []
    for shard, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start:start + rows_per_shard]
        blobs: list[bytes] = [b""] * len(chunk)

        def encode(i: int, chunk=chunk, blobs=blobs) -> None:
            name, r = chunk[i]
            blobs[i] = _encode_png(splits[name].images[r])

        run_chunked(len(chunk), encode)
        labels = np.stack([splits[name].labels[r] for name, r in chunk])
        table = pa.Table.from_arrays([
            pa.array(blobs, pa.binary()),
            pa.ListArray.from_arrays(pa.array(np.arange(0, c * len(chunk) + 1, c, dtype=np.int32)),
                                     pa.array(labels.ravel(), pa.uint8())),
            pa.array([name for name, _ in chunk], pa.string()),
            pa.array([splits[name].ids[r] for name, r in chunk], pa.int64()),
        ], schema=schema)
        path = out / f"part-{shard:05d}.parquet"
        pq.write_table(table, path)
        written.append(path)
    return written


@dataclass
class _Shard:
    """The well-formed rows of one shard. rows: their row numbers in the file."""

    path: Path
    images: list[bytes | None]
    labels: np.ndarray
    split: np.ndarray
    ids: np.ndarray
    rows: np.ndarray
    metadata: dict


def read_columns(path: Path, columns: list[str], what: str = "") -> pa.Table:
    """Some columns of one shard (encoding reads ids first, images one shard at a time);
    a DataError naming the shard when it is unreadable or lacks a column."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, KeyError) as e:
        raise DataError(f"{path}: {what or 'unreadable Parquet shard or missing column'} "
                        f"({first_line(e)})") from None


def int64_ids(where: str, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An id column (nulls read as 0) as int64; a DataError naming `where` for a column that is
    not integers, or unsigned ids too large for int64 (they would wrap to negative ids)."""
    if not pa.types.is_integer(ids.type):
        raise DataError(f"{where}: column id must be int64, got {ids.type}")
    values = ids.fill_null(0).to_numpy(zero_copy_only=False)
    if values.dtype.kind == "u" and values.size and values.max() >= 2**63:
        raise DataError(f"{where}: column id holds {values.max()}, beyond int64")
    return values.astype(np.int64)


def is_label_list(t: pa.DataType) -> bool:
    """A labels column's type: a list (of any offset width or fixed size) of integers."""
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
        and pa.types.is_integer(t.value_type)


def _read_shard(path: Path, width: LabelWidth, problems: Problems) -> _Shard | None:
    """Read and check one shard: None if it is unreadable, malformed as a whole, or has no rows;
    otherwise its well-formed rows, each malformed row being recorded as a problem."""
    try:
        table = pq.ParquetFile(path).read()
    except (pa.ArrowException, OSError, ValueError) as e:
        problems.add(path, f"unreadable parquet shard ({e})")
        return None
    missing = [c for c in SCHEMA.names if c not in table.column_names]
    if missing:
        problems.add(path, f"missing column(s) {', '.join(missing)}")
        return None
    types = {c: table.schema.field(c).type for c in SCHEMA.names}
    t = types["labels"]
    if not is_label_list(t):
        problems.add(path, f"column labels must be list<uint8>, got {t}")
        return None
    if not pa.types.is_integer(types["id"]):
        problems.add(path, f"column id must be int64, got {types['id']}")
        return None
    if not (pa.types.is_binary(types["image"]) or pa.types.is_large_binary(types["image"])):
        problems.add(path, f"column image must be binary, got {types['image']}")
        return None
    if table.num_rows == 0:
        return None

    ok = np.ones(table.num_rows, bool)

    def reject(mask: np.ndarray, what) -> None:
        for r in np.flatnonzero(mask & ok):
            problems.add(f"{path}: row {r}", what(r) if callable(what) else what)
        ok[mask] = False

    for col in ("labels", "split", "id"):  # a null image is left to decode_all: skippable
        reject(table.column(col).is_null().to_numpy(zero_copy_only=False), f"{col} is null")
    labels_col = table.column("labels").combine_chunks()
    lengths = pc.list_value_length(labels_col).fill_null(0).to_numpy(zero_copy_only=False)
    reject(lengths == 0, "labels list is empty")
    if not ok.any():
        return None
    if width.n < 0:
        r = int(np.flatnonzero(ok)[0])
        width.n, width.where = int(lengths[r]), f"{path} row {r}"
    reject(lengths != width.n, lambda r: f"{lengths[r]} labels, but {width.where} has {width.n}")
    # Row r's labels start at the sum of the earlier rows' lengths in the flattened values.
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = labels_col.flatten().to_numpy(zero_copy_only=False)
    good = np.flatnonzero(ok)
    values = np.zeros((table.num_rows, width.n), flat.dtype if flat.size else np.uint8)
    values[good] = flat[starts[good, None] + np.arange(width.n)]
    reject(((values != 0) & (values != 1)).any(1), "labels must be 0 or 1")
    reject(~values.any(1), "no label is 1 (every image needs a class)")

    split = table.column("split").to_numpy(zero_copy_only=False).astype(str)
    reject(~np.isin(split, SPLITS), lambda r: f"split {str(split[r])!r} is not one of "
           f"{', '.join(SPLITS)}")
    good = np.flatnonzero(ok)
    images = table.column("image").to_pylist()
    try:
        ids = int64_ids(str(path), table.column("id"))
    except DataError as e:
        problems.absorb(e)
        return None
    return _Shard(path, [images[r] for r in good], values[good].astype(np.uint8), split[good],
                  ids[good], good, table.schema.metadata or {})


def _check_ids(shards: list[_Shard], problems: Problems) -> None:
    """One problem for the first id given twice within a split: an id names one image in codes
    files and search results. (Ids may repeat across splits: a list source's are its rows'
    numbers in each list file.)"""
    ids = np.concatenate([s.ids for s in shards])
    split = np.concatenate([s.split for s in shards])
    where = [(s.path, r) for s in shards for r in s.rows]
    order = np.lexsort((ids, split))  # by split, then id
    twice = np.flatnonzero((ids[order][1:] == ids[order][:-1])
                           & (split[order][1:] == split[order][:-1]))
    if twice.size:
        a, b = order[twice[0]], order[twice[0] + 1]
        more = f" (and {twice.size - 1} more)" if twice.size > 1 else ""
        problems.add(f"{where[b][0]}: row {where[b][1]}",
                     f"id {ids[b]} is also the id of {where[a][0]}: row {where[a][1]}{more}; ids "
                     f"must be unique within a split ({split[b]})")


def load_parquet(cfg: DataConfig, problems: Problems | None = None) -> Dataset:
    problems = problems or Problems(skip_bad=cfg.skip_bad)
    if not cfg.root:
        raise DataError("parquet: set data.root to the folder of *.parquet shards")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{root}: parquet folder not found")
    paths = sorted(root.glob("*.parquet"))
    if not paths:
        raise DataError(f"{root}: no *.parquet shards")
    width = LabelWidth()
    shards = [s for s in (_read_shard(p, width, problems) for p in paths) if s is not None]
    if not shards:
        if not problems.items:
            problems.add(root, "every parquet shard is empty")
        problems.fail()
    problems.barrier()

    split = np.concatenate([s.split for s in shards])
    labels = np.concatenate([s.labels for s in shards])
    which = np.zeros(len(split), np.int64)
    for k, name in enumerate(SPLITS):
        which[split == name] = k
        if not (split == name).any():
            problems.add(root, f"no {name} rows in any shard")
    full_classes = labels[which == 2].sum(0).all()
    check_classes(labels[which == 2], str(root), problems)
    _check_ids(shards, problems)
    problems.barrier()

    # Rows grouped by split (stable, so in shard order within each): every split's images are
    # then a contiguous slice of one decoded array, without a copy.
    order = np.argsort(which, kind="stable")
    blobs = [b for s in shards for b in s.images]
    where = [(s.path, r) for s in shards for r in s.rows]
    images, ok, digests = decode_all(
        [blobs[i] for i in order],
        lambda j: (f"{where[order[j]][0]}: row {where[order[j]][1]}", "image"),
        cfg.image_size, False, problems)
    problems.barrier()
    labels, ids = labels[order], np.concatenate([s.ids for s in shards])[order]
    bounds = np.searchsorted(which[order], np.arange(len(SPLITS) + 1))
    splits = {}
    for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
        s = Split(images[lo:hi], labels[lo:hi], ids[lo:hi],
                  None if digests is None else digests[lo:hi])
        splits[name] = s if ok[lo:hi].all() else s.take(np.flatnonzero(ok[lo:hi]))
    if not ok.all() and full_classes:
        check_classes(splits["database"].labels, str(root), problems,
                      " left without its unreadable images")
        problems.barrier()
    meta = shards[0].metadata
    name = meta.get(META_NAME, root.resolve().name.encode()).decode()
    if META_MULTI in meta:
        multi = meta[META_MULTI] == b"true"
    else:
        multi = bool((labels.sum(1) != 1).any())
    return Dataset(name, **splits, multi_label=multi)
