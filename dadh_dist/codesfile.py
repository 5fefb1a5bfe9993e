"""Codes files (Parquet) and top-k Hamming search over them (docs/design.md §6).

A codes file is one Parquet table, one row per image:

    id     int64 or string      the image's id in its source (split id, relative path, ...)
    code   fixed_size_binary    its ±1 code packed by `retrieval.pack_codes` (ceil(k/8) bytes)

and file metadata that says what made the codes: `dadh_dist.bits` (k), `dadh_dist.encoder`
(f, g, fg for network codes; B for the learned database codes of a run), `dadh_dist.model_sha256`
(`inference.model_sha256` of the trained streams), `dadh_dist.config` (the resolved config as
TOML), `dadh_dist.source` and `dadh_dist.checkpoint` (for people). Query and database codes are
only comparable when k and the model hash agree; `check_pair` refuses anything else.

Search ranks a database by Hamming distance with ties in database order, the rule every metric of
`retrieval` uses, so the top-k here are the first k of `retrieval.ranking`. The optional faiss
backend (`IndexBinaryFlat`, exhaustive) returns the same distances; within a tie it may order ids
differently.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dadh_dist import config, kernels, retrieval
from dadh_dist.checkpoint import replacing

FORMAT = "1"
KEY = "dadh_dist."
REQUIRED = ("format", "bits", "encoder", "model_sha256")
BACKENDS = ("packed", "faiss")
ENCODERS = (*config.ENCODERS, "B")
"""The query encoders, and B: the learned database codes."""


class CodesError(ValueError):
    """A codes file that cannot be used as asked (the one-line message names the file)."""


@dataclass
class Codes:
    """Packed codes with their ids and provenance. packed: (n, ceil(bits/8)) uint8."""

    ids: np.ndarray
    """(n,) int64, or object array of str."""
    packed: np.ndarray
    bits: int
    encoder: str
    model_sha256: str
    config_toml: str = ""
    source: str = ""
    checkpoint: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.packed.dtype != np.uint8 or self.packed.ndim != 2:
            raise ValueError(f"packed must be uint8 (n, bytes), got {self.packed.dtype} "
                             f"{self.packed.shape}")
        if self.packed.shape[1] != -(-self.bits // 8):
            raise ValueError(f"{self.bits} bits need {-(-self.bits // 8)} bytes a row, got "
                             f"{self.packed.shape[1]}")
        if len(self.ids) != len(self.packed):
            raise ValueError(f"{len(self.ids)} ids for {len(self.packed)} codes")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")

    @classmethod
    def from_pm1(cls, ids, codes: np.ndarray, **meta) -> Codes:
        """Codes from ±1 rows (n, k) of any numeric dtype."""
        return cls(ids=np.asarray(ids), packed=retrieval.pack_codes(codes), bits=codes.shape[1],
                   **meta)

    def __len__(self) -> int:
        return len(self.packed)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<codes in memory>"

    def pm1(self) -> np.ndarray:
        """int8 ±1 codes (n, bits)."""
        return retrieval.unpack_codes(self.packed, self.bits)


# ----------------------------------------------------------------------------------- read/write


def write(path: str | Path, codes: Codes) -> Path:
    """Write `codes` as a Parquet codes file (through a temporary name, so a reader never sees
    half a file)."""
    path = Path(path)
    width = codes.packed.shape[1]
    code_col = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(codes), [None, pa.py_buffer(np.ascontiguousarray(codes.packed))])
    ids = codes.ids
    if ids.dtype.kind in "iu":
        _check_int64(f"{path}: column 'id'", ids)
        id_col = pa.array(ids.astype(np.int64), pa.int64())
    else:
        text = [str(i) for i in ids]
        bad = next((t for t in text if not is_utf8(t)), None)
        if bad is not None:  # a file name in no UTF-8 (Parquet strings are UTF-8)
            raise CodesError(f"{path}: id {bad!r} is not valid UTF-8 (rename the file)")
        id_col = pa.array(text, pa.string())
    meta = {"format": FORMAT, "bits": str(codes.bits), "encoder": codes.encoder,
            "model_sha256": codes.model_sha256, "config": codes.config_toml,
            "source": codes.source, "checkpoint": codes.checkpoint}
    table = pa.Table.from_arrays([id_col, code_col], names=["id", "code"]).replace_schema_metadata(
        {(KEY + k).encode(): v.encode() for k, v in meta.items()})
    path.parent.mkdir(parents=True, exist_ok=True)  # the CLI checked it can (cli.check_out)
    try:
        with replacing(path) as tmp:  # streamed, not held as bytes
            pq.write_table(table, tmp)
    except OSError as e:
        raise CodesError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def is_utf8(text: str) -> bool:
    """Whether `text` can be stored as a Parquet string: no lone surrogates (the form Python
    gives file names whose bytes are not UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def is_codes_file(path: str | Path) -> bool:
    """True for a readable Parquet file carrying codes-file metadata (no rows are read)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError):
        return False
    return (KEY + "bits").encode() in meta


def read(path: str | Path) -> Codes:
    """Read and check a codes file; CodesError naming the file for anything unusable."""
    path = Path(path)
    if path.is_dir():
        raise CodesError(f"{path}: is a folder, not a codes file")
    if not path.is_file():
        raise CodesError(f"{path}: codes file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise CodesError(f"{path}: not a readable Parquet file ({e})") from None
    raw = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()
           if k.startswith(KEY.encode())}
    meta = {k.removeprefix(KEY): v for k, v in raw.items()}
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CodesError(f"{path}: not a dadh_dist codes file (no {KEY}{missing[0]} metadata)")
    if meta["format"] != FORMAT:
        raise CodesError(f"{path}: codes file format {meta['format']!r}, this version reads "
                         f"{FORMAT!r}")
    try:
        bits = int(meta["bits"])
    except ValueError:
        bits = 0
    if bits < 1:
        raise CodesError(f"{path}: invalid bit count {meta['bits']!r}")
    if meta["encoder"] not in ENCODERS:
        raise CodesError(f"{path}: unknown encoder {meta['encoder']!r}")
    for col in ("id", "code"):
        if col not in table.column_names:
            raise CodesError(f"{path}: missing column {col!r}")
        if table.column(col).null_count:
            raise CodesError(f"{path}: column {col!r} has null values")
    width = -(-bits // 8)
    code = table.column("code").combine_chunks()
    if not pa.types.is_fixed_size_binary(code.type) or code.type.byte_width != width:
        raise CodesError(f"{path}: column 'code' is {code.type}, but {bits} bits need "
                         f"fixed_size_binary[{width}]")
    n = len(code)
    data = code.buffers()[1]
    packed = (np.frombuffer(data, np.uint8)[code.offset * width:(code.offset + n) * width]
              .reshape(n, width).copy() if n else np.zeros((0, width), np.uint8))
    padding = np.uint8((1 << (8 * width - bits)) - 1)  # the last byte's bits past the k-th
    if bits % 8 and (packed[:, -1] & padding).any():  # XOR + popcount would count them
        row = int(np.flatnonzero(packed[:, -1] & padding)[0])
        raise CodesError(f"{path}: row {row} sets padding bits (past bit {bits}) of its last "
                         "code byte; they must be 0 (not codes packed by dadh_dist)")
    id_col = table.column("id")
    if pa.types.is_integer(id_col.type):
        ids = id_col.to_numpy()
        _check_int64(f"{path}: column 'id'", ids)
        ids = ids.astype(np.int64)
    elif pa.types.is_string(id_col.type) or pa.types.is_large_string(id_col.type):
        ids = np.array(id_col.to_pylist(), dtype=object)
    else:
        raise CodesError(f"{path}: column 'id' must be integers or strings, got {id_col.type}")
    return Codes(ids=ids, packed=packed, bits=bits, encoder=meta["encoder"],
                 model_sha256=meta["model_sha256"], config_toml=meta.get("config", ""),
                 source=meta.get("source", ""), checkpoint=meta.get("checkpoint", ""), path=path)


def _check_int64(where: str, ids: np.ndarray) -> None:
    """CodesError for unsigned ids beyond int64: cast, they would wrap to negative ids that
    name no image."""
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        raise CodesError(f"{where} holds id {int(ids.max())}, beyond int64 (ids must fit int64)")


def check_pair(query: Codes, database: Codes) -> None:
    """Refuse query and database codes that cannot be compared (each message names a file)."""
    for codes, role in ((database, "database"), (query, "query")):
        if len(codes) == 0:
            raise CodesError(f"{codes.name}: the {role} holds no codes")
    check_model(database, query.bits, query.model_sha256, query.name)


def check_model(database: Codes, bits: int, model_sha256: str, queries: str) -> None:
    """Refuse queries of `bits` bits made by the model `model_sha256` (`queries` names their
    file or checkpoint) against `database`: known before any image is encoded."""
    if bits != database.bits:
        raise CodesError(f"{queries}: {bits}-bit codes, but {database.name} holds "
                         f"{database.bits}-bit codes")
    if model_sha256 != database.model_sha256:
        raise CodesError(
            f"{database.name}: made by model {database.model_sha256[:12]}, but the queries "
            f"({queries}) by model {model_sha256[:12]}; encode both with one checkpoint")


# ---------------------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    query_ids: np.ndarray
    ids: np.ndarray
    """(nq, k) database ids, nearest first."""
    distances: np.ndarray
    """(nq, k) Hamming distances."""
    backend: str
    seconds: float
    """Time of the search itself (no reading or encoding)."""

    def table(self) -> str:
        """One line per result: query id, rank (1 = nearest), database id, distance."""
        rows = [(_cell(q), str(r + 1), _cell(i), str(int(d)))
                for q, ids, dist in zip(self.query_ids, self.ids, self.distances)
                for r, (i, d) in enumerate(zip(ids, dist))]
        head = ("query", "rank", "id", "distance")
        w = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(head)]
        return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:<{w[2]}}  {d:>{w[3]}}"
                         for a, b, c, d in [head, *rows])

    def to_json(self, database: Codes) -> str:
        return json.dumps({
            "database": database.name, "bits": database.bits, "k": int(self.ids.shape[1]),
            "backend": self.backend,
            "results": [{"query": _plain(q), "ids": [_plain(i) for i in ids],
                         "distances": [int(d) for d in dist]}
                        for q, ids, dist in zip(self.query_ids, self.ids, self.distances)],
        })


def _plain(x):
    """A numpy scalar as the Python int or str that JSON and tables print."""
    return x.item() if isinstance(x, np.generic) else x


def _cell(x) -> str:
    """An id as a table cell: as it is, or quoted as a JSON string when it is empty or holds
    white space or control characters, which would read as the table's own spacing and lines."""
    x = _plain(x)
    text = str(x)
    if isinstance(x, str) and (not text or not text.isprintable()
                               or any(c.isspace() for c in text)):
        return json.dumps(text, ensure_ascii=False)
    return text


def search(query: Codes, database: Codes, k: int, backend: str = "packed") -> SearchResult:
    """Top-k database ids per query, after `check_pair` has accepted the two."""
    check_pair(query, database)
    t0 = time.perf_counter()
    index, dist = topk(query.packed, database.packed, k, database.bits, backend)
    return SearchResult(query.ids, database.ids[index], dist, backend, time.perf_counter() - t0)


def topk(query_packed: np.ndarray, db_packed: np.ndarray, k: int, bits: int,
         backend: str = "packed") -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances), each (nq, min(k, n)): the k nearest database rows per query.

    packed: XOR + popcount in a compiled kernel (`kernels.topk`), ties in database order. faiss:
    `IndexBinaryFlat`, same distances, its own order within ties; needs bits % 8 == 0.
    """
    if k < 1:
        raise CodesError(f"--k: must be >= 1, got {k}")
    if backend == "packed":
        return _topk_packed(query_packed, db_packed, k)
    if backend == "faiss":
        return _topk_faiss(query_packed, db_packed, k, bits)
    raise CodesError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")


def _topk_packed(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`kernels.topk` on 64-bit words: histogram, smallest ball, one pass in database order."""
    k = min(k, len(db))
    q_words, db_words = retrieval._words(q), retrieval._words(db)
    with kernels.threads() as t:  # distances of the codes' width: uint32 past 65535 bits
        scratch = np.empty((max(1, min(t, len(q))), len(db)),
                           retrieval._distance_dtype(db.shape[1]))
        return kernels.topk(q_words, db_words, k, 8 * db.shape[1] + 1, scratch)


def _nearest(d: np.ndarray, k: int) -> np.ndarray:
    """The first k entries of the stable ranking of one distance row d (n,), in numpy: only the
    smallest Hamming ball holding k items is sorted. `topk` does the same in `kernels.topk`
    without a distance row; this form serves callers that hold the row (tests/test_tools.py)."""
    if k >= d.shape[0]:
        return retrieval.ranking(d)
    radius = int(np.searchsorted(np.cumsum(np.bincount(d)), k))  # first r with |{d <= r}| >= k
    ball = np.flatnonzero(d <= radius)
    return ball[np.argsort(d[ball], kind="stable")[:k]]


def _topk_faiss(q: np.ndarray, db: np.ndarray, k: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        import faiss
    except ImportError:
        msg = "--backend faiss: faiss is not installed (pip install faiss-cpu)"
        raise CodesError(msg) from None
    if bits % 8:
        raise CodesError(f"--backend faiss: IndexBinaryFlat needs a bit count that is a multiple "
                         f"of 8, the codes have {bits}; use --backend packed")
    index = faiss.IndexBinaryFlat(bits)
    index.add(np.ascontiguousarray(db))
    dist, ids = index.search(np.ascontiguousarray(q), min(k, len(db)))
    return ids.astype(np.int64), dist.astype(np.int32)
