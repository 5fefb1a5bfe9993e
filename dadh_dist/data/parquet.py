"""Parquet shards: one row per image with columns image (PNG bytes), labels (list<uint8>),
split (query / validation / database) and id (int64); read and written with pyarrow."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.images import DECODE_ERRORS, decode, run_chunked

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
    path: Path
    images: list[bytes]
    labels: np.ndarray
    split: np.ndarray
    ids: np.ndarray
    metadata: dict


def _read_shard(path: Path, width: list) -> _Shard | None:
    """Read and check one shard (None if it has no rows).

    `width` = [label width, where it was first seen], shared by all shards.
    """
    try:
        table = pq.ParquetFile(path).read()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable parquet shard ({e})") from None
    if table.num_rows == 0:
        return None
    missing = [c for c in SCHEMA.names if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    for col in SCHEMA.names:
        nulls = table.column(col).is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            raise DataError(f"{path}: row {np.flatnonzero(nulls)[0]}: {col} is null")

    labels_col = table.column("labels").combine_chunks()
    t = labels_col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
            or not pa.types.is_integer(t.value_type):
        raise DataError(f"{path}: column labels must be list<uint8>, got {t}")
    lengths = labels_col.value_lengths().to_numpy(zero_copy_only=False)
    if width[0] < 0 and len(lengths):
        width[0], width[1] = int(lengths[0]), f"{path} row 0"
    bad = np.flatnonzero(lengths != width[0])
    if bad.size:
        r = bad[0]
        raise DataError(f"{path}: row {r}: {lengths[r]} labels, but {width[1]} has {width[0]}")
    values = labels_col.flatten().to_numpy(zero_copy_only=False).reshape(len(lengths), width[0])
    bad = np.flatnonzero(((values != 0) & (values != 1)).any(1))
    if bad.size:
        raise DataError(f"{path}: row {bad[0]}: labels must be 0 or 1")

    split = table.column("split").to_numpy(zero_copy_only=False).astype(str)
    bad = np.flatnonzero(~np.isin(split, SPLITS))
    if bad.size:
        raise DataError(f"{path}: row {bad[0]}: split {split[bad[0]]!r} is not one of "
                        f"{', '.join(SPLITS)}")
    ids = table.column("id")
    if not pa.types.is_integer(ids.type):
        raise DataError(f"{path}: column id must be int64, got {ids.type}")
    if not (pa.types.is_binary(table.column("image").type)
            or pa.types.is_large_binary(table.column("image").type)):
        raise DataError(f"{path}: column image must be binary, got {table.column('image').type}")
    return _Shard(path, table.column("image").to_pylist(), values.astype(np.uint8), split,
                  ids.to_numpy().astype(np.int64), table.schema.metadata or {})


def load_parquet(cfg: DataConfig) -> Dataset:
    if not cfg.root:
        raise DataError("parquet: set data.root to the folder of *.parquet shards")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{root}: parquet folder not found")
    paths = sorted(root.glob("*.parquet"))
    if not paths:
        raise DataError(f"{root}: no *.parquet shards")
    width = [-1, ""]
    shards = [s for s in (_read_shard(p, width) for p in paths) if s is not None]
    if not shards:
        raise DataError(f"{root}: every parquet shard is empty")
    # Global row order: shard by shard; each row goes to slot `pos` of its split.
    split = np.concatenate([s.split for s in shards])
    which = np.zeros(len(split), np.int64)
    pos = np.zeros(len(split), np.int64)
    for k, name in enumerate(SPLITS):
        which[split == name] = k
        pos[split == name] = np.arange((split == name).sum())
    if not (which == SPLITS.index("database")).any():
        raise DataError(f"{root}: no database rows in any shard")
    blobs = [b for s in shards for b in s.images]
    where = [(s.path, r) for s in shards for r in range(len(s.images))]

    def decode_row(i: int) -> np.ndarray:
        try:
            return decode(blobs[i], cfg.image_size)
        except DECODE_ERRORS as e:
            raise DataError(f"{where[i][0]}: row {where[i][1]}: unreadable image ({e})") from None

    first = decode_row(0)
    outs = [np.empty(((which == k).sum(), *first.shape), np.uint8) for k in range(len(SPLITS))]

    def fill(i: int) -> None:
        a = first if i == 0 else decode_row(i)
        if a.shape != first.shape:
            raise DataError(f"{where[i][0]}: row {where[i][1]}: image shape {a.shape} differs "
                            f"from {first.shape} (set data.image_size to resize)")
        outs[which[i]][pos[i]] = a

    run_chunked(len(blobs), fill)
    labels = np.concatenate([s.labels for s in shards])
    ids = np.concatenate([s.ids for s in shards])
    splits = {name: Split(outs[k], labels[which == k], ids[which == k])
              for k, name in enumerate(SPLITS)}
    meta = shards[0].metadata
    name = meta.get(META_NAME, root.resolve().name.encode()).decode()
    if META_MULTI in meta:
        multi = meta[META_MULTI] == b"true"
    else:
        multi = bool((labels.sum(1) != 1).any())
    return Dataset(name, **splits, multi_label=multi)
