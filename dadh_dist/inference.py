"""The trained hash function of a run, loaded back, and the images it encodes.

    hf = load("runs/fashion_mnist_32bit_1a2b3c4d")     # the run's newest valid checkpoint
    hf = load("runs/.../checkpoint_000010")            # or one checkpoint
    Q = hf.codes(images, "fg")                         # uint8 (N, C, S, S) -> int8 ±1 (N, k)
    hf.B                                               # learned database codes (n, k)

Query codes are sign(f(x)), sign(g(x)) or sign(f(x) + g(x)) computed exactly as the training
loop's evaluation computes them (`dadh_dist.encoding`), so a metric computed here
equals the one the run reported.

Images to encode come from an `ImageSource`: a folder of image files, a list file, a folder of
Parquet shards (`data.dataset_to_parquet`), one image file, or one split of the run's own
dataset. Sources are decoded chunk by chunk, so memory does not grow with their size. Nothing
is adapted silently: files of a folder that are not images, and images converted to the model's
channels or resized to its side, are told through a `note` callback; unreadable images are all
collected and reported together (`BadImages`), never one per run.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dadh_dist import checkpoint as ckpt
from dadh_dist import codesfile, encoding, probe, storage, uris
from dadh_dist import config as config_mod
from dadh_dist.config import Config, ConfigError
from dadh_dist.data import DataError, Dataset, check_root, load_dataset
from dadh_dist.data.images import DECODE_ERRORS, DEEP_MODES, run_chunked, to_8_bits
from dadh_dist.data.lists import READ_ERRORS, list_lines
from dadh_dist.data.parquet import int64_ids, read_columns
from dadh_dist.data.problems import Problem, name_check_command
from dadh_dist.data.sources import BUNDLED
from dadh_dist.models import HashStream, build_streams
from dadh_dist.monitor import progress_bar  # noqa: F401  (also used by tests)

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
    run_uri: str | None = None
    """The remote run the checkpoint was fetched from (None for a local one); its local mirror
    is `run_folder`."""

    @property
    def bits(self) -> int:
        return self.cfg.objective.bits

    @property
    def encoders(self) -> tuple[str, ...]:
        return encoding.available(self.g is not None)

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

    def publish(self, out: Path) -> str | None:
        """Send the folder `out` to the remote run when it lies in the run's local mirror (where
        a tool's default output goes for a run URI), at the same place under the run URI; the
        URI it went to, or None for a local run or an `out` elsewhere."""
        if self.run_uri is None:
            return None
        try:
            rel = Path(out).resolve().relative_to(self.run_folder.resolve())
        except ValueError:
            return None
        dest = uris.join(self.run_uri, rel.as_posix())
        storage.Publisher(Path(out), dest)()
        # the folder there is this one: what an earlier output left that this one has not goes
        here = {p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file()}
        for name, _ in uris.list_files(dest):
            if name not in here:
                uris.delete_file(uris.join(dest, name))
        return dest

    def outputs(self, images, encoders, batch: int | None = None) -> dict[str, torch.Tensor]:
        """Real-valued stream outputs (N, k) float32 for the streams the encoders need."""
        # a read-only array (np.asarray of a decoded image) makes torch warn once per process;
        # copying uint8 pixels costs little beside the forward pass
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(
            images if images.flags.writeable else images.copy())
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"images must be uint8 (N, {self.channels}, H, W), got {x.dtype} "
                             f"{tuple(x.shape)}")
        batch = batch or self.cfg.eval.batch_size
        return encoding.stream_outputs(self.f, self.g, x, encoders, self.device, batch)

    def codes(self, images, encoder: str, batch: int | None = None) -> np.ndarray:
        """int8 ±1 codes (N, k): sign(f), sign(g) or sign(f + g), 0 counted as -1."""
        self.check_encoder(encoder)
        return encoding.query_codes(self.outputs(images, [encoder], batch), encoder)


def resolve_checkpoint(path: str | Path) -> tuple[Path, str | None]:
    """(checkpoint folder, run URI): the folder, absolute, as given or the newest valid one of
    a run folder, and None; for a URI (a remote run or checkpoint, see `storage`) the folder
    fetched into the run's local mirror, and the run's URI."""
    if uris.is_uri(str(path)):
        return _fetch_remote(str(path))
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such run or checkpoint folder")
    # `.`, `..` or a trailing slash must still name the checkpoint and its run (default
    # output folders are made of those names)
    p = p.resolve()
    if (p / ckpt.MANIFEST).exists() or (p / ckpt.STATE).exists():
        return p, None
    found = ckpt.latest_valid(p)
    if found is None:
        raise _no_checkpoint(str(p), (p / ckpt.CONFIG).is_file(), "run folder")
    return found, None


def _no_checkpoint(where: str, is_run: bool, what: str) -> ckpt.CheckpointError:
    """The error for a run (or folder) without a valid checkpoint: a run that has its
    config.toml stopped (or is still) before its first checkpoint."""
    if is_run:
        return ckpt.CheckpointError(
            f"{where}: the run has no valid checkpoint yet (training stopped before its first, "
            "or has not reached it; checkpoints come every train.checkpoint_every outer "
            "iterations)")
    return ckpt.CheckpointError(f"{where}: holds no valid checkpoint_* folder (is it a {what} "
                                "of jobs/train.py?)")


def _fetch_remote(uri: str) -> tuple[Path, str]:
    if uris.read_bytes(uris.join(uri, ckpt.MANIFEST)) is not None:  # a checkpoint
        run_uri, name = uris.split(uri)
        return storage.fetch_checkpoint(uri, storage.mirror_dir(run_uri) / name), run_uri
    mirror = storage.mirror_dir(uri)
    for name in ("config.toml", "final_metrics.json"):
        raw = uris.read_bytes(uris.join(uri, name))
        if raw is not None:
            mirror.mkdir(parents=True, exist_ok=True)
            ckpt.write_atomic(mirror / name, raw)
    found = storage.latest_valid(uri, mirror)
    if found is None:
        raise _no_checkpoint(uris.redact(uri), (mirror / ckpt.CONFIG).is_file(), "run")
    return found, uri


def load(path: str | Path, device: str | torch.device = "cpu",
         data_root: str | None = None) -> HashFunction:
    """The hash function of a run or checkpoint folder (the checkpoint is verified first).
    `data_root` (the tools' --data-root): the run's data, read from there rather than from the
    data.root it was trained on (moved, or mounted elsewhere); nothing else changes.

    A run still training removes its older checkpoints as it writes new ones, and may remove the
    one chosen here while it is read. A run folder's newest is then chosen again, once, with a
    warning: the newest is what was asked for, and a rerun would do just that. A checkpoint
    named itself (or a second one lost) is a one-line CheckpointError naming it."""
    folder, run_uri = resolve_checkpoint(path)
    chosen = run_uri is None and folder != Path(path).expanduser().resolve()
    try:
        return _load(folder, run_uri, device, data_root)
    except (OSError, ckpt.CheckpointError, ConfigError) as e:
        if run_uri is not None or not _removed(folder, e, chosen):
            raise
    if not chosen:
        raise ckpt.CheckpointError(
            f"{folder}: was removed while being read (is its run still training? it keeps only "
            "its newest checkpoints: name the run folder to take its newest)")
    again = ckpt.latest_valid(folder.parent)
    if again is not None:
        ckpt.warning(f"{folder.name} was removed while being read (the run is still training?); "
                     f"reading its newest now, {again.name}")
        try:
            return _load(again, None, device, data_root)
        except (OSError, ckpt.CheckpointError, ConfigError) as e:
            if not _removed(again, e, True):
                raise
    raise ckpt.CheckpointError(f"{again or folder}: was removed while being read (is the run "
                               "still training? rerun to take its newest)")


def _removed(folder: Path, error: BaseException, verified: bool) -> bool:
    """Whether reading the checkpoint `folder` failed because it was removed meanwhile: the folder
    is gone, or a file it held when `ckpt.load` verified it (a FileNotFoundError comes only
    after that check), or its manifest when it was `verified` on being chosen (a run's newest:
    an incomplete checkpoint named itself also lacks one)."""
    return (not folder.is_dir() or isinstance(error, FileNotFoundError)
            or (verified and not (folder / ckpt.MANIFEST).is_file()))


def _load(folder: Path, run_uri: str | None, device: str | torch.device,
          data_root: str | None) -> HashFunction:
    state, manifest = ckpt.load(folder)
    cfg = _moved(config_mod.load(folder / ckpt.CONFIG), data_root)
    if "geometry" not in state:
        raise ckpt.CheckpointError(f"{folder / ckpt.STATE}: records no input geometry")
    channels, size = state["geometry"]  # (channels, side) of the training images
    m, o = cfg.model, cfg.objective
    # Local pretrained weights only matter before training; the checkpoint overwrites them, and
    # the file need not exist where the model is used.
    f, g = build_streams(o.bits, channels, size, backbone=m.backbone, width=m.width,
                         input_size=m.input_size, two_streams=o.two_streams,
                         seed=cfg.train.seed, norm=m.norm)
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
                        device=torch.device(device), model_sha256=model_sha256(f, g),
                        run_uri=run_uri)


def load_with_data(path: str | Path, device: str | torch.device = "cpu",
                   data_root: str | None = None) -> tuple[HashFunction, Dataset]:
    """The hash function and the run's dataset (see `load` for data_root)."""
    hf = load(path, device, data_root)
    return hf, run_dataset(hf)


DATA_ROOT = "--data-root"
"""The tools' option that points a run at its moved data (`load`'s data_root)."""


def _moved(cfg: Config, data_root: str | None) -> Config:
    if data_root is None:
        return cfg
    if not data_root.strip():
        raise ConfigError(f"{DATA_ROOT}: empty; name the folder the run's data is in now")
    if cfg.data.source in BUNDLED:
        raise ConfigError(f"{DATA_ROOT}: the run reads data.source = {cfg.data.source} "
                          f"({BUNDLED[cfg.data.source]}), no folder; drop {DATA_ROOT}")
    root = data_root if "://" in data_root else str(Path(data_root).expanduser().resolve())
    return cfg.with_overrides({"data.root": root})


def run_dataset(hf: HashFunction) -> Dataset:
    """The run's own dataset, read as it was trained (from `load`'s data_root if given). A
    missing data folder says how to point the run at the data's new place."""
    try:
        check_root(hf.cfg.data)
    except DataError as e:
        raise DataError(f"{e}; if the data moved since training, name its folder with "
                        f"{DATA_ROOT}") from None
    try:
        return load_dataset(hf.cfg.data)
    except DataError as e:
        saved = hf.run_folder / "config.toml"
        if saved.is_file():  # else the placeholder stays: no file to name
            name_check_command(e, str(saved), _moved_root(saved, hf.cfg))
        raise


def _moved_root(saved: Path, cfg: Config) -> list[str]:
    """The data.root override that points the run's saved config at where `cfg` reads its data
    now ([] where it has not moved)."""
    try:
        before = config_mod.load(saved).data.root
    except (ConfigError, OSError, ValueError):
        before = None  # an unreadable file: say the root, to be sure
    return [] if before == cfg.data.root else [f"data.root={cfg.data.root}"]


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


Note = Callable[[str], None]
"""Receives one line the user should read (a file skipped, images converted); no "note: "."""


def _ignore(_: str) -> None:
    pass


class BadImages(DataError):
    """Images that could not be read, all of them: `problems` holds one per image."""

    def __init__(self, problems: list[str], total: int):
        lines = [str(p) for p in problems]
        if len(lines) == 1:
            text = f"{lines[0]} (nothing was written)"
        else:
            text = (f"{len(lines)} of {total} images could not be read, nothing was written: "
                    f"{lines[0]} and {len(lines) - 1} more")
        super().__init__(text, [Problem("", line, skippable=True) for line in lines])
        self.total = total

    @property
    def summary(self) -> str:
        """The line that follows the list of problems on a console."""
        return (f"{len(self.problems)} of {self.total} images could not be read (listed above); "
                "nothing was written")


@dataclass
class Adaptations:
    """How decoded images were brought to the model's geometry, counted over a source."""

    converted: Counter = field(default_factory=Counter)
    """PIL mode of the file -> images converted from it to the model's channels."""
    resized: Counter = field(default_factory=Counter)
    """(width, height) of the file -> images resized from it."""

    def record(self, mode: str | None, size: tuple[int, int], side: int) -> None:
        """`mode`: the file's, for an image whose pixels were converted (None: they were not)."""
        if mode is not None:
            self.converted[mode] += 1
        if size != (side, side):
            self.resized[size] += 1

    def lines(self, channels: int, side: int) -> list[str]:
        out = []
        if self.converted:
            modes = ", ".join(f"{m}: {c}" for m, c in self.converted.most_common())
            target = "grayscale (the model takes 1 channel)" if channels == 1 else \
                "RGB (the model takes 3 channels)"
            out.append(f"converted {sum(self.converted.values())} image(s) ({modes}) to {target}")
        if self.resized:
            common = self.resized.most_common(3)
            sizes = ", ".join(f"{w}x{h}: {c}" for (w, h), c in common)
            more = f" and {len(self.resized) - 3} other sizes" if len(self.resized) > 3 else ""
            out.append(f"resized {sum(self.resized.values())} image(s) to {side}x{side} px "
                       f"(bilinear; from {sizes}{more})")
        return out


@dataclass
class ImageSource:
    """Images to encode: ids (N,) and read(start, stop) -> uint8 (stop - start, C, S, S).

    `read` decodes a whole range before it fails, so that a `BadImages` it raises names every
    unreadable image of the range, not the first."""

    description: str
    ids: np.ndarray
    read: Callable[[int, int], np.ndarray]
    labels: np.ndarray | None = None
    adapted: Adaptations = field(default_factory=Adaptations)

    def __len__(self) -> int:
        return len(self.ids)


def decode(src: Path | bytes, channels: int, size: int, where: str) -> np.ndarray:
    """One image as the model sees it: (channels, size, size) uint8, gray or RGB, bilinear resize
    (the resampling of the file-based training sources)."""
    return decode_noting(src, channels, size, where)[0]


def decode_noting(src: Path | bytes, channels: int, size: int, where: str
                  ) -> tuple[np.ndarray, str | None, tuple[int, int]]:
    """`decode`, plus what was adapted: the file's PIL mode when its pixels had to change to
    become the model's channels (None when they did not) and its (width, height)."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            mode, original = img.mode, img.size
            converted = _conversion(img, channels)
            img = to_8_bits(img).convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            a = np.asarray(img, np.uint8)
    except FileNotFoundError:
        raise DataError(f"{where}: image not found") from None
    except DECODE_ERRORS as e:
        raise DataError(f"{where}: unreadable image ({e})") from None
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)), (mode if converted else None), \
        original


def pixels_are_gray(img: Image.Image) -> bool:
    """Whether an image holds gray pixels only: one colour band (alpha aside), or R == G == B at
    every pixel once a palette or colour image is taken to RGB. Decided by the pixels, not the
    mode: a gray GIF or a PNG of a gray palette is gray."""
    bands = [b for b in img.getbands() if b not in ("A", "a")]
    if len(bands) == 1 and img.mode not in ("P", "PA"):
        return True
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _conversion(img: Image.Image, channels: int) -> bool:
    """Whether bringing `img` to the model's channels changes its pixels: a colour image for a
    gray model (gray pixels stored as RGB or a palette are not), an image deeper than 8 bits,
    anything not RGB for a colour model."""
    if channels == 3:
        return img.mode != "RGB"
    return img.mode != "L" and (img.mode in DEEP_MODES or img.mode == "F"
                                or not pixels_are_gray(img))


def _decoded_source(description: str, ids, fetch: Callable[[int], Path | bytes],
                    where: Callable[[int], str], channels: int, size: int) -> ImageSource:
    odd = [i for i, name in enumerate(ids) if not codesfile.is_utf8(name)]
    if odd:  # refused before any image is encoded, not when the codes are written
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise DataError(f"{where(odd[0])!r}{more}: file name is not valid UTF-8, which the ids of "
                        "a codes file must be; rename the file(s)")
    adapted = Adaptations()

    def read(start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, channels, size, size), np.uint8)
        seen: list = [None] * (stop - start)  # (mode, size) or the problem, per image

        def fill(i: int) -> None:
            try:
                out[i], mode, original = decode_noting(fetch(start + i), channels, size,
                                                       where(start + i))
                seen[i] = (mode, original)
            except DataError as e:
                seen[i] = str(e)

        run_chunked(stop - start, fill)
        problems = [s for s in seen if isinstance(s, str)]
        if problems:
            raise BadImages(problems, stop - start)
        for mode, original in seen:
            adapted.record(mode, original, size)
        return out

    return ImageSource(description, np.asarray(ids), read, adapted=adapted)


def open_source(path: str | Path | None, hf: HashFunction, split: str | None = None,
                dataset: Dataset | None = None, note: Note = _ignore) -> ImageSource:
    """Images from `path` (folder, list file, Parquet shard folder or file, one image), or the
    run's own `split` when path is None. For Parquet, `split` keeps only that split's rows.
    Files of a folder that are not images (by suffix) are skipped, and `note` says so."""
    c, s = hf.channels, hf.image_size
    if path is None:
        if split not in SPLITS:
            raise ConfigError(f"--split: name one of {', '.join(SPLITS)} (or give --images)")
        ds = dataset or run_dataset(hf)
        if (ds.channels, ds.image_size) != (c, s):
            raise DataError(f"{hf.checkpoint}: the run's data is {ds.channels}x{ds.image_size}"
                            f"px, the model was rebuilt for {c}x{s}px")
        part = getattr(ds, split)
        return ImageSource(f"{ds.name} {split} split", part.ids,
                           lambda a, b: part.images[a:b], part.labels)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such image folder or file")
    if p.is_dir():
        # a codes file written next to the images (encode --out photos/codes.parquet) is not a
        # Parquet image shard: it must not turn the folder into a shard source
        codes = {q for q in p.rglob("*.parquet") if codesfile.is_codes_file(q)}
        if codes:
            shown = ", ".join(q.relative_to(p).as_posix() for q in sorted(codes)[:3])
            note(f"skipped {len(codes)} codes file(s) in {p} (jobs/encode.py output, not images "
                 f"or image shards): {shown}{' ...' if len(codes) > 3 else ''}")
        shards = [q for q in sorted(p.glob("*.parquet")) if q not in codes]
        if shards:
            return _parquet_source(shards, split, c, s)
        every = sorted(q for q in p.rglob("*") if q.is_file() and q not in codes)
        files = [q for q in every if q.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        others = [q for q in every if q.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            kinds = Counter(q.suffix.lower() or "(no suffix)" for q in others)
            shown = ", ".join(q.relative_to(p).as_posix() for q in others[:3])
            note(f"skipped {len(others)} file(s) in {p} that are not images by their suffix "
                 f"({', '.join(f'{k}: {c}' for k, c in kinds.most_common())}), e.g. {shown}")
        ids = [q.relative_to(p).as_posix() for q in files]
        return _decoded_source(f"{len(files)} images in {p}", np.array(ids, dtype=object),
                               lambda i: files[i], lambda i: str(files[i]), c, s)
    if probe.is_parquet_like(p):  # by suffix (.parquet, .pq) or by its magic bytes
        if codesfile.is_codes_file(p):
            raise DataError(f"{p}: is a codes file (columns id, code), not images; encode the "
                            "images it was made from")
        return _parquet_source([p], split, c, s)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return _decoded_source(str(p), np.array([p.name], dtype=object), lambda i: p,
                               lambda i: str(p), c, s)
    return _list_source(p, c, s)


def _list_source(file: Path, channels: int, size: int) -> ImageSource:
    """`path [labels...]` per line, paths relative to the list file's folder; labels ignored."""
    try:
        entries = [(n, tokens[0]) for n, tokens in list_lines(file)]
    except READ_ERRORS as e:
        raise DataError(f"{file}: cannot read list file ({e})") from None
    if not entries:
        raise DataError(f"{file}: list file has no entries")
    root = file.parent
    return _decoded_source(
        f"{len(entries)} images listed in {file}", np.array([e[1] for e in entries], dtype=object),
        lambda i: root / entries[i][1], lambda i: f"{file}:{entries[i][0]}: {entries[i][1]}",
        channels, size)


def _check_shard_columns(shard: Path, columns: list[str]) -> None:
    """DataError in one line naming the shard when it is unreadable or lacks a column (pyarrow's
    own message spans the whole schema)."""
    try:
        names = pq.read_schema(shard).names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{shard}: not a readable Parquet file ({uris.first_line(e)})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{shard}: has no column {missing[0]!r} (columns: "
                        f"{', '.join(names) or 'none'}); Parquet image shards hold image, id "
                        "and split (data.dataset_to_parquet)")


def _parquet_source(shards: list[Path], split: str | None, channels: int,
                    size: int) -> ImageSource:
    """Rows of Parquet shards (columns image, id, and split when filtering); images are read
    one shard at a time."""
    rows: list[tuple[int, int]] = []  # (shard, row) of every kept image
    ids: list[np.ndarray] = []
    columns = ["id"] + (["split"] if split else [])
    for shard in shards:  # every shard's columns checked before any image is decoded
        _check_shard_columns(shard, ["image", *columns])
    for k, shard in enumerate(shards):
        table = read_columns(shard, columns, f"cannot read column(s) {', '.join(columns)}")
        keep = np.arange(table.num_rows)
        if split:
            keep = np.flatnonzero(table.column("split").to_numpy(zero_copy_only=False) == split)
        rows.extend((k, int(r)) for r in keep)
        column = table.column("id")
        if column.null_count:
            raise DataError(f"{shard}: column id has null values")
        # int64, as the training loader reads them (a string or float id is refused here too)
        ids.append(int64_ids(str(shard), column)[keep])
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(np.unique(all_ids)) != len(all_ids):
        raise DataError(f"{shards[0].parent}: ids repeat across rows; pick one split "
                        "(encode.py --parquet-split)")
    cache: dict[int, list[bytes]] = {}
    adapted = Adaptations()

    def blobs(k: int) -> list[bytes]:
        if k not in cache:
            cache.clear()  # one shard in memory at a time
            cache[k] = read_columns(shards[k], ["image"], "cannot read column image").column(
                "image").to_pylist()
        return cache[k]

    def read(start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, channels, size, size), np.uint8)
        problems, seen = [], []
        for i in range(start, stop):  # shard by shard: rows of one shard are contiguous
            k, r = rows[i]
            blob = blobs(k)[r]
            where = f"{shards[k]}: row {r}"
            if blob is None:
                problems.append(f"{where}: image is null")
                continue
            try:
                out[i - start], mode, original = decode_noting(blob, channels, size, where)
            except DataError as e:
                problems.append(str(e))
                continue
            seen.append((mode, original))
        if problems:
            raise BadImages(problems, stop - start)
        for mode, original in seen:
            adapted.record(mode, original, size)
        return out

    what = f"{split} rows of " if split else ""
    return ImageSource(f"{len(rows)} {what}{len(shards)} Parquet shard(s)", all_ids, read,
                       adapted=adapted)


# ------------------------------------------------------------------------------------- encoding


def encode_source(hf: HashFunction, source: ImageSource, encoder: str, batch: int | None = None,
                  progress: bool = True) -> np.ndarray:
    """int8 ±1 codes (N, k) of every image of `source`, decoded and encoded chunk by chunk.

    After the first unreadable image the rest is only decoded, not encoded, so that the
    `BadImages` raised at the end lists every unreadable image of the source."""
    hf.check_encoder(encoder)
    batch = batch or hf.cfg.eval.batch_size
    chunk = 8 * batch  # a multiple of the batch: the same forward passes as one big call
    out = np.empty((len(source), hf.bits), np.int8)
    problems: list[str] = []
    with progress_bar(len(source), f"encoding {source.description}", progress) as bar:
        for start in range(0, len(source), chunk):
            stop = min(start + chunk, len(source))
            try:
                images = source.read(start, stop)
            except BadImages as e:
                problems.extend(str(q) for q in e.problems)
            else:
                if not problems:
                    out[start:stop] = hf.codes(images, encoder, batch)
            bar.update(stop - start)
    if problems:
        raise BadImages(problems, len(source))
    return out


def codes_meta(hf: HashFunction, encoder: str, source: str) -> dict:
    """Provenance metadata of a codes file made by `hf`."""
    return {"encoder": encoder, "model_sha256": hf.model_sha256, "config_toml": hf.cfg.to_toml(),
            "source": source, "checkpoint": str(hf.checkpoint.resolve())}  # from any folder


def encode_to_codes(hf: HashFunction, images: str | Path | None, split: str | None,
                    encoder: str | None, learned: bool = False, batch: int | None = None,
                    progress: bool = True, note: Note = _ignore) -> codesfile.Codes:
    """Codes of a source (see `open_source`); `learned` takes the run's B for its database
    (no image is read then). `note` hears what was skipped or adapted on the way."""
    if learned:
        if images is not None or split not in (None, "database"):
            raise ConfigError("--learned: the learned codes B exist only for the run's database "
                              "split (drop --images and --split)")
        ds = run_dataset(hf)
        if len(ds.database) != len(hf.B):
            raise DataError(f"{hf.checkpoint}: B has {len(hf.B)} rows, the run's database split "
                            f"{len(ds.database)} images (data changed since training?)")
        return codesfile.Codes.from_pm1(ds.database.ids, hf.B,
                                        **codes_meta(hf, "B", f"{ds.name} database split (B)"))
    encoder = hf.check_encoder(encoder or hf.default_encoder)
    source = open_source(images, hf, split, note=note)
    if len(source) == 0:
        raise DataError(f"{images or split}: no images to encode")
    codes = encode_source(hf, source, encoder, batch, progress)
    for line in source.adapted.lines(hf.channels, hf.image_size):
        note(line)
    return codesfile.Codes.from_pm1(source.ids, codes,
                                    **codes_meta(hf, encoder, source.description))


# -------------------------------------------------------------------------------------- search


def query_codes_from(path: str | Path | None, checkpoint: str | Path | None,
                     encoder: str | None, split: str | None, device: str = "cpu",
                     progress: bool = True, batch: int | None = None,
                     note: Note = _ignore, data_root: str | None = None,
                     database: codesfile.Codes | None = None) -> codesfile.Codes:
    """Query codes from a codes file, or from images encoded with `checkpoint`; a file that is
    neither (empty, corrupt Parquet) is a CodesError saying so. A checkpoint whose codes cannot
    be compared with `database` (other bits or model) is refused before any image is read."""
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such codes file or images")
    if path is not None and probe.query_kind(path) == probe.CODES:
        return codesfile.read(path)
    if checkpoint is None:
        raise ConfigError(f"--checkpoint: {path or '--split'} holds images, not codes; name the "
                          "run or checkpoint that encodes them")
    hf = load(checkpoint, device, data_root)
    if database is not None:
        codesfile.check_model(database, hf.bits, hf.model_sha256, str(hf.checkpoint))
    return encode_to_codes(hf, path, split, encoder, batch=batch, progress=progress, note=note)
