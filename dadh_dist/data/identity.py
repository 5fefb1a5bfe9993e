"""What identifies the data in a data.root folder, so that a run can tell a moved copy of the
data it trained on from other data (docs/design.md §3.6, resuming).

The identity of a folder is, for each file its source reads the splits from (the IDX files,
the CIFAR batches, the list files, the Parquet shards), its size and a hash of its bytes. A
list's images are named by the list, so the list's bytes stand for them; a Parquet shard holds
its images. The few named files of a source (up to `WHOLE_HASH_BYTES` each) are hashed whole;
Parquet shards, which may be thousands, and larger files by their first and last
`SAMPLE_BYTES` and their size (a shard's last MiB holds its footer: schema, row groups and their
statistics), so a start reads at most 2 MiB a shard.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dadh_dist.config import DataConfig

IDX = tuple(f"{part}-{kind}-idx{dim}-ubyte{gz}" for part in ("train", "t10k")
            for kind, dim in (("images", 3), ("labels", 1)) for gz in (".gz", ""))
"""Each IDX file compressed, then raw: the loader reads the first of the two it finds."""

DEFINING = {
    "fashion_mnist": IDX,
    "fashion_mnist_grid": IDX,
    "cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
    "list": ("test.txt", "database.txt", "train.txt", "val.txt"),
    "parquet": ("*.parquet",),
}
"""Per source that reads a folder: the names (or glob patterns) in it that define the data."""

WHOLE_HASH_BYTES = 64 << 20
SAMPLE_BYTES = 1 << 20


def identity(cfg: DataConfig) -> dict[str, list] | None:
    """{file name: [size, hash]} for the files of data.root that define `cfg.source`'s data;
    None where this machine cannot tell: no root (the Fashion-MNIST package, scikit-learn's
    digits), a URI, a folder it does not see, or none of the files there."""
    patterns = DEFINING.get(cfg.source)
    if patterns is None or not cfg.root or "://" in cfg.root:
        return None
    root = Path(cfg.root)
    if not root.is_dir():
        return None
    try:
        files = _defining_files(root, patterns)
        return {p.name: [p.stat().st_size, _file_hash(p, whole=p.suffix != ".parquet")]
                for p in files} or None
    except OSError:  # unreadable or gone: the loaders name the file; here it cannot be told
        return None


def _defining_files(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    files = []
    for pattern in patterns:
        if "*" in pattern:
            files += sorted(p for p in root.glob(pattern) if p.is_file())
        elif (root / pattern).is_file() and not (
                pattern.endswith("-ubyte") and (root / f"{pattern}.gz").is_file()):
            files.append(root / pattern)  # a raw IDX file beside its .gz is not read
    return files


def _file_hash(path: Path, whole: bool) -> str:
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= (WHOLE_HASH_BYTES if whole else 2 * SAMPLE_BYTES):
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(SAMPLE_BYTES))
            f.seek(size - SAMPLE_BYTES)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def differing(recorded: dict[str, list], found: dict[str, list] | None) -> list[str]:
    """The file names whose size or hash differ between two identities, or that only one of
    them holds (every recorded name when `found` is None)."""
    if found is None:
        return sorted(recorded)
    return sorted(n for n in set(recorded) | set(found) if recorded.get(n) != found.get(n))
