"""Reader for the IDX format of (Fashion-)MNIST, gzip-compressed or not.

Layout: two zero bytes, a type code, the number of dimensions d; then d big-endian uint32 sizes;
then the values, big-endian, row-major.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from dadh_dist.data.base import DataError

IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file into a native-endian array of its declared shape and type."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions, {len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = np.prod(dims, dtype=object) * dtype.itemsize  # Python ints: no wrap-around
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "oversized"
        raise DataError(f"{path}: {kind} IDX file: shape {dims} needs {expected} data bytes, "
                        f"found {got}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
