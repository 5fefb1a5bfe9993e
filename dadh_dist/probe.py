"""What a file handed to a tool holds, told from its bytes and Parquet footer (no rows read).

`search --query` takes either a codes file or images; a file that is neither (empty, a damaged
Parquet file, a Parquet table of something else) must be called what it is, not taken for
images that merely lack a --checkpoint.
"""

from __future__ import annotations

from pathlib import Path

PARQUET_MAGIC = b"PAR1"
PARQUET_SUFFIXES = (".parquet", ".pq")
CODES = "codes"
IMAGES = "images"


def is_parquet_like(path: Path) -> bool:
    """A Parquet suffix, or a file that starts with Parquet's magic bytes."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def query_kind(path: str | Path) -> str:
    """CODES or IMAGES for a --query path; CodesError for a file that can be neither."""
    from dadh_dist import codesfile

    p = Path(path)
    if not p.is_file():
        return IMAGES  # a folder of images or shards (or missing: the image reader says so)
    if p.stat().st_size == 0:
        raise codesfile.CodesError(f"{p}: empty file (0 bytes): neither codes nor images")
    if not is_parquet_like(p):
        return IMAGES  # one image file or a list file
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(p)
    except (pa.ArrowException, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise codesfile.CodesError(f"{p}: corrupt Parquet file, unreadable as codes or images "
                                   f"({reason})") from None
    if (codesfile.KEY + "bits").encode() in (schema.metadata or {}):
        return CODES
    if "image" in schema.names:
        return IMAGES  # Parquet image shards, encoded with --checkpoint
    raise codesfile.CodesError(
        f"{p}: a Parquet file with neither codes-file metadata nor an image column "
        f"(columns: {', '.join(schema.names) or 'none'})")


def check_codes_file(path: str | Path) -> None:
    """CodesError for a --database path that is empty, before Parquet's own message."""
    from dadh_dist import codesfile

    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        raise codesfile.CodesError(f"{p}: empty file (0 bytes), not a codes file")
