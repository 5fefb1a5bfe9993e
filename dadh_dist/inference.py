"""The trained hash function of a run, loaded back, and the images it encodes.

    hf = load("runs/fashion_mnist_32bit_1a2b3c4d")     # the run's newest valid checkpoint
    hf = load("runs/.../checkpoint_000010")            # or one checkpoint
    Q = hf.codes(images, "fg")                         # uint8 (N, C, S, S) -> int8 ±1 (N, k)
    hf.B                                               # learned database codes (n, k)

Query codes are sign(f(x)), sign(g(x)) or sign(f(x) + g(x)) computed exactly as the training
loop's evaluation computes them (`loop.encode`, `loop.query_codes`), so a metric computed here
equals the one the run reported.

Images to encode come from an `ImageSource`: a folder of image files, a list file, a folder of
Parquet shards (`data.dataset_to_parquet`), one image file, or one split of the run's own
dataset. Sources are decoded chunk by chunk, so memory does not grow with their size.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dadh_dist import checkpoint as ckpt
from dadh_dist import codesfile, loop, storage
from dadh_dist import config as config_mod
from dadh_dist.config import Config, ConfigError
from dadh_dist.data import DataError, Dataset, load_dataset
from dadh_dist.data.images import DECODE_ERRORS, run_chunked
from dadh_dist.models import HashStream, build_streams

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
SPLITS = ("query", "validation", "database")


# ----------------------------------------------------------------------------- the hash function


@dataclass
class HashFunction:
    """A trained run's streams f, g (eval mode) and learned codes B, from one checkpoint."""

    cfg: Config
    f: HashStream
    g: HashStream | None
    B: np.ndarray
    """(n, k) int8 ±1, one row per database image in database split order."""
    t: int
    """Outer iterations trained."""
    checkpoint: Path
    channels: int
    image_size: int
    """Images are (N, channels, image_size, image_size) uint8."""
    device: torch.device
    model_sha256: str

    @property
    def bits(self) -> int:
        return self.cfg.objective.bits

    @property
    def encoders(self) -> tuple[str, ...]:
        return loop.ENCODERS if self.g is not None else ("f",)

    @property
    def default_encoder(self) -> str:
        return "fg" if self.g is not None else "f"

    @property
    def run_folder(self) -> Path:
        return self.checkpoint.parent

    def check_encoder(self, encoder: str, option: str = "--encoder") -> str:
        if encoder not in self.encoders:
            raise ConfigError(f"{option}: {encoder!r} is not one of {', '.join(self.encoders)} "
                              f"(this model has {'two streams' if self.g else 'one stream'})")
        return encoder

    def outputs(self, images, encoders, batch: int | None = None) -> dict[str, torch.Tensor]:
        """Real-valued stream outputs (N, k) float32 for the streams the encoders need."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"images must be uint8 (N, {self.channels}, H, W), got {x.dtype} "
                             f"{tuple(x.shape)}")
        batch = batch or self.cfg.eval.batch_size
        needed = {s for e in encoders for s in ("f", "g") if s in e}
        return {name: loop.encode(getattr(self, name), x, self.device, batch, amp=False)
                for name in sorted(needed)}

    def codes(self, images, encoder: str, batch: int | None = None) -> np.ndarray:
        """int8 ±1 codes (N, k): sign(f), sign(g) or sign(f + g), 0 counted as -1."""
        self.check_encoder(encoder)
        return loop.query_codes(self.outputs(images, [encoder], batch), encoder)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the newest valid one of a run folder; a URI (a remote
    run or checkpoint, see `storage`) is fetched into its local mirror first."""
    if storage.is_uri(str(path)):
        return _fetch_remote(str(path))
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such run or checkpoint folder")
    if (p / ckpt.MANIFEST).exists() or (p / ckpt.STATE).exists():
        return p
    found = ckpt.latest_valid(p)
    if found is None:
        raise ckpt.CheckpointError(f"{p}: holds no valid checkpoint_* folder (is it a run "
                                   "folder of jobs/train.py?)")
    return found


def _fetch_remote(uri: str) -> Path:
    if storage.read_bytes(storage.join(uri, ckpt.MANIFEST)) is not None:  # a checkpoint
        run_uri, name = storage.split(uri)
        return storage.fetch_checkpoint(uri, storage.mirror_dir(run_uri) / name)
    mirror = storage.mirror_dir(uri)
    for name in ("config.toml", "final_metrics.json"):
        raw = storage.read_bytes(storage.join(uri, name))
        if raw is not None:
            mirror.mkdir(parents=True, exist_ok=True)
            ckpt.write_atomic(mirror / name, raw)
    found = storage.latest_valid(uri, mirror)
    if found is None:
        raise ckpt.CheckpointError(f"{storage.redact(uri)}: holds no valid checkpoint_* folder "
                                   "(is it a run of jobs/train.py?)")
    return found


def load(path: str | Path, device: str | torch.device = "cpu") -> HashFunction:
    """The hash function of a run or checkpoint folder (the checkpoint is verified first)."""
    folder = resolve_checkpoint(path)
    state, manifest = ckpt.load(folder)
    cfg = config_mod.load(folder / ckpt.CONFIG)
    if "geometry" not in state:
        raise ckpt.CheckpointError(f"{folder / ckpt.STATE}: records no input geometry")
    channels, size = state["geometry"]  # (channels, side) of the training images
    m, o = cfg.model, cfg.objective
    # Local pretrained weights only matter before training; the checkpoint overwrites them, and
    # the file need not exist where the model is used.
    f, g = build_streams(o.bits, channels, size, m.backbone, m.width, m.input_size, "",
                         o.two_streams, cfg.train.seed, m.norm)
    where = folder / ckpt.STATE
    for name, stream in (("f", f), ("g", g)):
        if stream is None:
            continue
        if name not in state:
            raise ckpt.CheckpointError(f"{where}: has no weights for stream {name}")
        try:
            stream.load_state_dict(state[name])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ckpt.CheckpointError(f"{where}: stream {name} does not fit {m.backbone} "
                                       f"with {channels} input channel(s) ({first})") from None
        stream.to(device).eval()
    B = state["B"].numpy() if isinstance(state["B"], torch.Tensor) else np.asarray(state["B"])
    if B.ndim != 2 or B.shape[1] != o.bits:
        raise ckpt.CheckpointError(f"{where}: B has shape {B.shape}, expected (n, {o.bits})")
    return HashFunction(cfg=cfg, f=f, g=g, B=B.astype(np.int8), t=int(manifest["t"]),
                        checkpoint=folder, channels=channels, image_size=size,
                        device=torch.device(device), model_sha256=model_sha256(f, g))


def load_with_data(path: str | Path, device: str | torch.device = "cpu") -> tuple[
        HashFunction, Dataset]:
    """The hash function and the run's dataset."""
    hf = load(path, device)
    return hf, load_dataset(hf.cfg.data)


def model_sha256(f: torch.nn.Module, g: torch.nn.Module | None = None) -> str:
    """SHA-256 over the weights of both streams (names, dtypes, shapes and bytes, in name order).

    Two codes files can be compared only if the same weights made them; the hash says so
    without shipping the weights.
    """
    h = hashlib.sha256()
    for prefix, module in (("f", f), ("g", g)):
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- image sources


@dataclass
class ImageSource:
    """Images to encode: ids (N,) and read(start, stop) -> uint8 (stop - start, C, S, S)."""

    description: str
    ids: np.ndarray
    read: Callable[[int, int], np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def decode(src: Path | bytes, channels: int, size: int, where: str) -> np.ndarray:
    """One image as the model sees it: (channels, size, size) uint8, gray or RGB, bilinear resize
    (the resampling of the file-based training sources)."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            a = np.asarray(img, np.uint8)
    except FileNotFoundError:
        raise DataError(f"{where}: image not found") from None
    except DECODE_ERRORS as e:
        raise DataError(f"{where}: unreadable image ({e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decoded_source(description: str, ids, fetch: Callable[[int], Path | bytes],
                    where: Callable[[int], str], channels: int, size: int) -> ImageSource:
    def read(start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, channels, size, size), np.uint8)

        def fill(i: int) -> None:
            out[i] = decode(fetch(start + i), channels, size, where(start + i))

        run_chunked(stop - start, fill)
        return out

    return ImageSource(description, np.asarray(ids), read)


def open_source(path: str | Path | None, hf: HashFunction, split: str | None = None,
                dataset: Dataset | None = None) -> ImageSource:
    """Images from `path` (folder, list file, Parquet shard folder or file, one image), or the
    run's own `split` when path is None. For Parquet, `split` keeps only that split's rows."""
    c, s = hf.channels, hf.image_size
    if path is None:
        if split not in SPLITS:
            raise ConfigError(f"--split: name one of {', '.join(SPLITS)} (or give --images)")
        ds = dataset or load_dataset(hf.cfg.data)
        if (ds.channels, ds.image_size) != (c, s):
            raise DataError(f"{hf.checkpoint}: the run's data is {ds.channels}x{ds.image_size}"
                            f"px, the model was rebuilt for {c}x{s}px")
        part = getattr(ds, split)
        return ImageSource(f"{ds.name} {split} split", part.ids,
                           lambda a, b: part.images[a:b], part.labels)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such image folder or file")
    if p.is_dir() and any(p.glob("*.parquet")):
        return _parquet_source(sorted(p.glob("*.parquet")), split, c, s)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES
                       and q.is_file())
        if not files:
            raise DataError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        ids = [q.relative_to(p).as_posix() for q in files]
        return _decoded_source(f"{len(files)} images in {p}", np.array(ids, dtype=object),
                               lambda i: files[i], lambda i: str(files[i]), c, s)
    if p.suffix.lower() == ".parquet":
        return _parquet_source([p], split, c, s)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return _decoded_source(str(p), np.array([p.name], dtype=object), lambda i: p,
                               lambda i: str(p), c, s)
    return _list_source(p, c, s)


def _list_source(file: Path, channels: int, size: int) -> ImageSource:
    """`path [labels...]` per line, paths relative to the list file's folder; labels ignored."""
    try:
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read list file ({e})") from None
    entries = [(n, line.split()[0]) for n, line in enumerate(lines, 1) if line.split()]
    if not entries:
        raise DataError(f"{file}: list file has no entries")
    root = file.parent
    return _decoded_source(
        f"{len(entries)} images listed in {file}", np.array([e[1] for e in entries], dtype=object),
        lambda i: root / entries[i][1], lambda i: f"{file}:{entries[i][0]}: {entries[i][1]}",
        channels, size)


def _parquet_source(shards: list[Path], split: str | None, channels: int,
                    size: int) -> ImageSource:
    """Rows of Parquet shards (columns image, id, and split when filtering); images are read
    one shard at a time."""
    rows: list[tuple[int, int]] = []  # (shard, row) of every kept image
    ids: list[np.ndarray] = []
    for k, shard in enumerate(shards):
        columns = ["id"] + (["split"] if split else [])
        try:
            table = pq.read_table(shard, columns=columns)
        except (pa.ArrowException, OSError, KeyError) as e:
            raise DataError(f"{shard}: unreadable Parquet shard or missing column ({e})") from None
        keep = np.arange(table.num_rows)
        if split:
            keep = np.flatnonzero(table.column("split").to_numpy(zero_copy_only=False) == split)
        rows.extend((k, int(r)) for r in keep)
        ids.append(table.column("id").to_numpy()[keep].astype(np.int64))
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(np.unique(all_ids)) != len(all_ids):
        raise DataError(f"{shards[0].parent}: ids repeat across rows; pick one split "
                        "(encode.py --parquet-split)")
    cache: dict[int, list[bytes]] = {}

    def blobs(k: int) -> list[bytes]:
        if k not in cache:
            cache.clear()  # one shard in memory at a time
            try:
                cache[k] = pq.read_table(shards[k], columns=["image"]).column("image").to_pylist()
            except (pa.ArrowException, OSError, KeyError) as e:
                raise DataError(f"{shards[k]}: cannot read column image ({e})") from None
        return cache[k]

    def read(start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, channels, size, size), np.uint8)
        for i in range(start, stop):  # shard by shard: rows of one shard are contiguous
            k, r = rows[i]
            blob = blobs(k)[r]
            where = f"{shards[k]}: row {r}"
            if blob is None:
                raise DataError(f"{where}: image is null")
            out[i - start] = decode(blob, channels, size, where)
        return out

    what = f"{split} rows of " if split else ""
    return ImageSource(f"{len(rows)} {what}{len(shards)} Parquet shard(s)", all_ids, read)


# ------------------------------------------------------------------------------------- encoding


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, every 10% otherwise."""

    def __init__(self, total: int, what: str, enabled: bool = True, stream=sys.stderr):
        self.total, self.what, self.enabled, self.stream = total, what, enabled, stream
        self.start = time.perf_counter()
        self.tty = enabled and stream.isatty()
        self.next_mark = 0.1

    def rate(self, done: int) -> float:
        return done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        frac = done / max(self.total, 1)
        line = f"{self.what}: {done}/{self.total} ({100 * frac:.0f}%), {self.rate(done):.0f} img/s"
        if self.tty:
            print("\r" + line, end="", file=self.stream, flush=True)
        elif frac >= self.next_mark or done == self.total:
            print(line, file=self.stream, flush=True)
            while self.next_mark <= frac:
                self.next_mark += 0.1

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


def encode_source(hf: HashFunction, source: ImageSource, encoder: str, batch: int | None = None,
                  progress: bool = True) -> np.ndarray:
    """int8 ±1 codes (N, k) of every image of `source`, decoded and encoded chunk by chunk."""
    hf.check_encoder(encoder)
    batch = batch or hf.cfg.eval.batch_size
    chunk = 8 * batch  # a multiple of the batch: the same forward passes as one big call
    out = np.empty((len(source), hf.bits), np.int8)
    bar = Progress(len(source), f"encoding {source.description}", progress)
    for start in range(0, len(source), chunk):
        stop = min(start + chunk, len(source))
        out[start:stop] = hf.codes(source.read(start, stop), encoder, batch)
        bar.update(stop)
    bar.close()
    return out


def codes_meta(hf: HashFunction, encoder: str, source: str) -> dict:
    """Provenance metadata of a codes file made by `hf`."""
    return {"encoder": encoder, "model_sha256": hf.model_sha256, "config_toml": hf.cfg.to_toml(),
            "source": source, "checkpoint": str(hf.checkpoint)}


def encode_to_codes(hf: HashFunction, images: str | Path | None, split: str | None,
                    encoder: str | None, learned: bool = False, batch: int | None = None,
                    progress: bool = True) -> codesfile.Codes:
    """Codes of a source (see `open_source`); `learned` takes the run's B for its database."""
    if learned:
        if images is not None or split not in (None, "database"):
            raise ConfigError("--learned: the learned codes B exist only for the run's database "
                              "split (drop --images and --split)")
        ds = load_dataset(hf.cfg.data)
        if len(ds.database) != len(hf.B):
            raise DataError(f"{hf.checkpoint}: B has {len(hf.B)} rows, the run's database split "
                            f"{len(ds.database)} images (data changed since training?)")
        return codesfile.Codes.from_pm1(ds.database.ids, hf.B,
                                        **codes_meta(hf, "B", f"{ds.name} database split (B)"))
    encoder = hf.check_encoder(encoder or hf.default_encoder)
    source = open_source(images, hf, split)
    if len(source) == 0:
        raise DataError(f"{images or split}: no images to encode")
    codes = encode_source(hf, source, encoder, batch, progress)
    return codesfile.Codes.from_pm1(source.ids, codes,
                                    **codes_meta(hf, encoder, source.description))


# -------------------------------------------------------------------------------------- search


def query_codes_from(path: str | Path, checkpoint: str | Path | None, encoder: str | None,
                     split: str | None, device: str = "cpu",
                     progress: bool = True) -> codesfile.Codes:
    """Query codes from a codes file, or from images encoded with `checkpoint`."""
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such codes file or images")
    if path is not None and codesfile.is_codes_file(path):
        return codesfile.read(path)
    if checkpoint is None:
        raise ConfigError(f"--checkpoint: {path or '--split'} holds images, not codes; name the "
                          "run or checkpoint that encodes them")
    hf = load(checkpoint, device)
    return encode_to_codes(hf, path, split, encoder, progress=progress)
