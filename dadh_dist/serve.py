"""A trained hash function behind HTTP: an image-retrieval service on Ray Serve (issue 21).

    python jobs/serve.py --checkpoint runs/<run>                 # http://127.0.0.1:8000
    curl -F image=@cat.png 'http://127.0.0.1:8000/search?k=5'
    serve run dadh_dist.serve:app checkpoint=runs/<run> replicas=2

or `serve run` / `serve deploy` of a Serve config file:

    http_options: {host: 127.0.0.1, port: 8000}
    applications:
      - name: dadh
        route_prefix: /
        import_path: dadh_dist.serve:app
        args: {checkpoint: runs/<run>, database: db.parquet, replicas: 2, max_images: 16}

Endpoints (JSON answers):

    POST /search   images + k (default 10, or the database size when smaller; a k above the
                   size is refused) -> per image its code, the top-k database ids and
                   their Hamming distances, ties in database order (the rule of jobs/search.py)
    POST /encode   images -> per image its code
    GET  /info     bits, encoder, model hash, database size, backend, input geometry, limits,
                   and the names (not the paths) of the checkpoint and the codes file
    GET  /healthz  {"status": "ok"}

Images come as multipart files (`curl -F image=@a.png -F image=@b.png -F k=5`), as JSON
`{"images": ["<base64>", ...], "ids": [...], "k": 5}` (ids optional, strings or integers; data:
URLs accepted), or as one raw image body (`Content-Type: image/png`); `k` may instead be the
query parameter `?k=5`, the only one taken, and is given once. HEAD is answered wherever GET is.
A code is a string of `bits` characters, character c being 1 where bit c of the code is +1.

Each replica loads the hash function (a checkpoint or a `jobs/export.py` export) and builds the
database index once. Concurrent requests are batched by Serve into one forward pass; the batch is
searched at its largest k and cut per request, which is exact because the top-k under a stable
ranking is a prefix of the top-K for K >= k. The index is faiss `IndexBinaryFlat` when faiss is
installed and the code length is a multiple of 8, the packed XOR + popcount kernel otherwise;
faiss only yields the k-th distance, and the ids come from a range search ordered by (distance,
database index), so both backends answer the same lists.

Images are PNG, JPEG, BMP, GIF, TIFF, WebP or PPM/PGM (`FORMATS`): PIL's other readers, EPS
(which runs Ghostscript) among them, are not exposed to the network.
Images must already have the model's geometry (gray or colour as trained, the training side in
pixels) unless the service runs with --resize, which converts and resizes them as jobs/search.py
does. A user mistake gets a 4xx with `{"error": "<one line>"}`; a database codes file whose bits
or model hash differ from the model's is refused before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dadh_dist.config import ENCODERS

if TYPE_CHECKING:
    from dadh_dist.codesfile import Codes

APP_NAME = "dadh"
DEPLOYMENT_NAME = "dadh_retrieval"
BACKENDS = ("auto", "packed", "faiss")
DEFAULT_K = 10
BATCH_HEADER = "x-dadh-batch-images"
"""Response header: how many images the forward pass that encoded this request held."""
ROUTES = {"search": "POST", "encode": "POST", "info": "GET", "healthz": "GET"}
FILE_FIELDS = ("image", "images", "file", "files")
_RANGE_ROWS = 1 << 22  # database rows a faiss range search may return at once (all ties)

logger = logging.getLogger("dadh_dist.serve")


class RequestError(Exception):
    """A request the service refuses: an HTTP status (4xx), a one-line message and the headers
    the answer carries (a 405's Allow)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())
        self.headers = headers or {}


def _config_error(message: str) -> Exception:
    from dadh_dist.config import ConfigError

    return ConfigError(message)


# -------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """What to serve and how; the fields are the command line's flags (--max-images ...)."""

    checkpoint: str
    """A run folder (its newest valid checkpoint), a checkpoint_* folder, or an export folder."""
    database: str | None = None
    """Database codes file; default: the run's learned B with the database split's ids."""
    encoder: str | None = None
    """f, g or fg (default: fg with two streams, else f; an export fixes its own)."""
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_images: int = 64
    """Images in one request."""
    max_body_bytes: int = 16 << 20
    backend: str = "auto"
    device: str = "cpu"
    resize: bool = False
    """Convert and resize images as jobs/search.py does, instead of refusing other geometries."""
    batch_images: int = 256
    """Most images in one batched forward pass (raised to max_images if lower)."""
    batch_wait_s: float = 0.005
    """How long a batch waits for more requests once its first has come."""
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        positive = {"--replicas": self.replicas, "--max-images": self.max_images,
                    "--max-body-bytes": self.max_body_bytes, "--batch-images": self.batch_images}
        for flag, value in positive.items():
            if value < 1:
                raise _config_error(f"{flag}: must be >= 1, got {value}")
        if not 1 <= self.port <= 65535:
            raise _config_error(f"--port: must be in 1..65535, got {self.port}")
        if self.batch_wait_s < 0:
            raise _config_error(f"--batch-wait-s: must be >= 0, got {self.batch_wait_s}")
        if self.cpus_per_replica <= 0:
            raise _config_error(f"--cpus-per-replica: must be > 0, got {self.cpus_per_replica}")
        if self.backend not in BACKENDS:
            raise _config_error(f"--backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.encoder not in (None, "f", "g", "fg"):
            raise _config_error(f"--encoder: {self.encoder!r} is not one of f, g, fg")

    @property
    def max_batch(self) -> int:
        return max(self.batch_images, self.max_images)

    @classmethod
    def from_args(cls, args: dict) -> Options:
        """Options from a `serve run` / config-file argument dict (values may be strings)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, raw in (args or {}).items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise _config_error(f"{key}: unknown argument (known: {', '.join(fields)})")
            values[name] = _convert(name, fields[name].type, raw)
        if "checkpoint" not in values:
            raise _config_error("checkpoint: required (a run, checkpoint or export folder)")
        return cls(**values)


def _convert(name: str, kind: str, raw):
    """A builder argument as its field's type ('int', 'float', 'bool', 'str', 'str | None')."""
    if raw is None or kind.startswith("str"):
        return None if raw is None else str(raw)
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return text in ("1", "true", "yes")
        return int(raw) if kind == "int" else float(raw)
    except ValueError:
        raise _config_error(f"{name}: expected {kind}, got {raw!r}") from None


# ------------------------------------------------------------------------------- model and data


@dataclass
class Model:
    """The hash function as the service uses it: uint8 images (N, C, S, S) -> int8 ±1 (N, k)."""

    bits: int
    channels: int
    image_size: int
    encoder: str
    model_sha256: str
    path: Path
    """The checkpoint or export folder the weights came from."""
    run_checkpoint: Path | None
    """The training checkpoint whose learned B is the default database (None: unknown here)."""
    encode: object
    """callable: uint8 (N, C, S, S) -> int8 ±1 (N, bits)."""

    def codes(self, images: np.ndarray) -> np.ndarray:
        return self.encode(images)


def is_export(path: str | Path) -> bool:
    return (Path(path).expanduser() / "export.json").is_file()


def load_model(path: str | Path, encoder: str | None = None, device: str = "cpu") -> Model:
    """The hash function of a run, checkpoint or export folder (see `Options.checkpoint`)."""
    import torch

    from dadh_dist import inference
    from dadh_dist.cli import resolve_device

    where = resolve_device(device)  # this machine's: a replica, or the driver before Ray
    if is_export(path):
        if where.type != "cpu":
            raise _config_error(f"--device: an export runs on the CPU; name the run's "
                                f"checkpoint to serve on {device}")
        return _load_export(Path(path).expanduser(), encoder)
    hf = inference.load(path, where)
    enc = hf.check_encoder(encoder or hf.default_encoder)

    def encode(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return hf.codes(images, enc)

    return Model(hf.bits, hf.channels, hf.image_size, enc, hf.model_sha256, hf.checkpoint,
                 hf.checkpoint, encode)


def _load_export(folder: Path, encoder: str | None) -> Model:
    import torch

    from dadh_dist import export

    meta_file = folder / "export.json"
    try:
        meta = json.loads(meta_file.read_text())
        enc, bits, shape = meta["encoder"], int(meta["bits"]), meta["input"]["shape"]
        channels, size, sha = int(shape[1]), int(shape[2]), str(meta["model_sha256"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise _config_error(f"{meta_file}: not an export's metadata ({e})") from None
    if encoder is not None and encoder != enc:
        raise _config_error(f"--encoder: the export {folder} computes {enc}, not {encoder} "
                            "(export that encoder, or name the run's checkpoint)")
    program_file = folder / f"hash_{enc}.pt2"
    if not program_file.is_file():
        raise FileNotFoundError(f"{program_file}: the export's program is missing")
    program = export.load_program(program_file)
    batch = int(meta.get("config", {}).get("eval", {}).get("batch_size", 256))

    def encode(images: np.ndarray) -> np.ndarray:
        out = np.empty((len(images), bits), np.int8)
        with torch.no_grad():
            for s in range(0, len(images), batch):
                out[s:s + batch] = program(torch.from_numpy(images[s:s + batch])).numpy()
        return out

    run_checkpoint = recorded_checkpoint(meta.get("checkpoint"), folder)
    return Model(bits, channels, size, enc, sha, folder, run_checkpoint, encode)


def recorded_checkpoint(recorded: str | None, folder: Path) -> Path | None:
    """The training checkpoint an export's metadata names. Exports record it absolute; older
    ones recorded it as given, relative to the working directory of jobs/export.py: tried there
    first (where it worked before), then against the export folder and each folder above it,
    so that such an export still finds its run from another working directory."""
    if not recorded:
        return None
    path = Path(recorded)
    if path.is_absolute() or path.is_dir():
        return path
    folder = folder.resolve()
    for base in (folder, *folder.parents):
        if (base / path).is_dir():
            return base / path
    return path


def load_database(options: Options, model: Model) -> Codes:
    """The database codes the service searches, refused unless `model` made them."""
    from dadh_dist import codesfile, inference

    if options.database is not None:
        database = codesfile.read(options.database)
    else:
        run = model.run_checkpoint
        if run is None or not run.is_dir():
            where = "" if run is None or run.is_absolute() else (
                f", looked for in the working directory, {model.path} and the folders above it")
            raise _config_error(f"--database: {model.path} is an export whose training "
                                f"checkpoint ({run}) is not here{where}; name a database codes "
                                "file")
        hf = inference.load(run)
        if hf.model_sha256 != model.model_sha256:
            raise codesfile.CodesError(f"{run}: holds model {hf.model_sha256[:12]}, but the "
                                       f"export {model.path} model {model.model_sha256[:12]}")
        database = inference.encode_to_codes(hf, None, "database", None, learned=True)
    check_database(database, model)
    return database


def check_database(database: Codes, model: Model) -> None:
    from dadh_dist.codesfile import CodesError

    if len(database) == 0:
        raise CodesError(f"{database.name}: the database holds no codes")
    if database.bits != model.bits:
        raise CodesError(f"{database.name}: {database.bits}-bit codes, but {model.path} makes "
                         f"{model.bits}-bit codes")
    if database.model_sha256 != model.model_sha256:
        raise CodesError(f"{database.name}: made by model {database.model_sha256[:12]}, but "
                         f"{model.path} is model {model.model_sha256[:12]}; encode the database "
                         "with this checkpoint (jobs/encode.py)")


# ------------------------------------------------------------------------------------------ index


def resolve_backend(backend: str, bits: int) -> str:
    """auto -> faiss when it is installed and bits % 8 == 0, else packed."""
    if backend == "packed":
        return backend
    try:
        import faiss  # noqa: F401
    except ImportError:
        if backend == "faiss":
            raise _config_error("--backend faiss: faiss is not installed "
                                "(pip install faiss-cpu)") from None
        return "packed"
    if bits % 8:
        if backend == "faiss":
            raise _config_error(f"--backend faiss: IndexBinaryFlat needs a bit count that is a "
                                f"multiple of 8, the model has {bits}; use --backend packed")
        return "packed"
    return "faiss"


class Index:
    """Top-k Hamming search over packed database codes, ties in database order."""

    def __init__(self, database: Codes, backend: str = "auto"):
        self.bits = database.bits
        self.packed = np.ascontiguousarray(database.packed)
        self.backend = resolve_backend(backend, self.bits)
        self._faiss = None
        if self.backend == "faiss":
            import faiss

            self._faiss = faiss.IndexBinaryFlat(self.bits)
            self._faiss.add(self.packed)

    def __len__(self) -> int:
        return len(self.packed)

    def topk(self, query_packed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, distances), each (nq, k), nearest first, ties in database order."""
        from dadh_dist import codesfile

        if self._faiss is None:
            return codesfile.topk(query_packed, self.packed, k, self.bits, "packed")
        q = np.ascontiguousarray(query_packed)
        index = np.empty((len(q), k), np.int64)
        out = np.empty((len(q), k), np.int32)
        rows = max(1, _RANGE_ROWS // len(self))  # queries per range search: bounds its answer
        for s in range(0, len(q), rows):
            self._faiss_block(q[s:s + rows], k, index[s:s + rows], out[s:s + rows])
        return index, out

    def _faiss_block(self, q: np.ndarray, k: int, index: np.ndarray, out: np.ndarray) -> None:
        kth, _ = self._faiss.search(q, k)
        kth = kth[:, -1].astype(np.int64)
        # every row within the k-th distance, then the stable order (distance, index) of them
        lims, dist, ids = self._faiss.range_search(q, int(kth.max()) + 1)
        for row in range(len(q)):
            d = dist[lims[row]:lims[row + 1]].astype(np.int64)
            i = ids[lims[row]:lims[row + 1]].astype(np.int64)
            keep = d <= kth[row]
            order = np.lexsort((i[keep], d[keep]))[:k]
            index[row], out[row] = i[keep][order], d[keep][order]


# --------------------------------------------------------------------------------------- requests


@dataclass
class Work:
    """One parsed request: its route, image names, decoded images and k (0 for /encode)."""

    route: str
    names: list
    images: np.ndarray
    """(N, C, S, S) uint8."""
    k: int


def parse_k(raw, database_size: int) -> int:
    """k of a /search: omitted, the default cut to the database size (a database smaller than
    the default is still searchable without k). An explicit k above the size is refused:
    jobs/search.py returns every code and says so in a note, but a JSON answer has no note line,
    and a client that asked for more results than exist should learn it from a 422 naming the
    size rather than from a short list."""
    if raw is None or raw == "":
        return min(DEFAULT_K, database_size)
    try:
        k = int(raw) if not isinstance(raw, (bool, float)) else None
    except (TypeError, ValueError):
        k = None
    if k is None:
        raise RequestError(400, f"k: must be an integer, got {raw!r}")
    if not 1 <= k <= database_size:
        raise RequestError(422, f"k: must be in 1..{database_size} (the database size), got {k}")
    return k


def _is_image_type(kind: str) -> bool:
    return kind.startswith("image/") or kind == "application/octet-stream"


def query_k(params: dict) -> str | None:
    """k of the query parameters (each a string, or the list of its values), the only one."""
    unknown = sorted(set(params) - {"k"})
    if unknown:
        raise RequestError(400, f"query parameter {unknown[0]!r}: unknown (known: k)")
    k = params.get("k")
    if isinstance(k, list):
        if len(k) > 1:
            raise RequestError(400, f"k: given {len(k)} times in the query ({', '.join(k)})")
        k = k[0] if k else None
    return k


def read_images(body: bytes, content_type: str, max_images: int
                ) -> tuple[list, list[bytes], object]:
    """(names, image bytes, k or None) from a multipart, JSON or raw-image body; a multipart
    body of more than `max_images` files and k is refused before it is parsed."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return _read_multipart(body, content_type, max_images)
    if kind == "application/json":
        return _read_json(body)
    if _is_image_type(kind):
        return [0], [body], None
    raise RequestError(415, f"Content-Type {kind or '(none)'!r} is not accepted: send "
                       "multipart/form-data files, application/json base64 images, or one "
                       "image/* body")


def _read_multipart(body: bytes, content_type: str, max_images: int
                    ) -> tuple[list, list[bytes], object]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    boundary = BytesParser(policy=policy.HTTP).parsebytes(head, headersonly=True).get_boundary()
    # the email parser takes seconds for 10^5 tiny parts: more than a request may hold are
    # counted (each part opens with its delimiter, the last is the close) and refused unread
    parts = body.count(b"--" + boundary.encode("utf-8", "surrogateescape")) - 1 if boundary else 0
    if parts > max_images + 1:
        raise RequestError(413, f"too many parts: {parts} in one multipart request, the limit "
                           f"is {max_images} images (--max-images) and k")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart() or not boundary:
        raise RequestError(400, "multipart body without parts (no or a wrong boundary)")
    names, blobs, k = [], [], None
    for i, part in enumerate(message.iter_parts()):
        field = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        data = part.get_payload(decode=True) or b""
        if field == "k" and filename is None:
            if k is not None:
                raise RequestError(400, "k: given twice in the multipart body; give it once")
            k = data.decode("utf-8", "replace").strip()
        elif filename is not None or field in FILE_FIELDS:
            names.append(filename if filename else f"{field}[{i}]")
            blobs.append(data)
        else:
            what = f"field {field!r}: unknown" if field is not None else f"part {i + 1}: no name"
            raise RequestError(400, f"multipart {what} (send files as {'/'.join(FILE_FIELDS)}, "
                               "and k)")
    return names, blobs, k


def _read_json(body: bytes) -> tuple[list, list[bytes], object]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:  # also: numbers of 4300+ digits, deep nesting
        raise RequestError(400, f"body: not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise RequestError(400, 'body: expected {"images": ["<base64>", ...], "k": 10}')
    unknown = sorted(set(doc) - {"images", "ids", "k"})
    if unknown:
        raise RequestError(400, f"body: unknown key {unknown[0]!r} (known: images, ids, k)")
    images = doc["images"]
    ids = doc.get("ids", list(range(len(images))))
    if not isinstance(ids, list) or len(ids) != len(images):
        raise RequestError(400, f"ids: expected a list of {len(images)} ids, one per image")
    for i, name in enumerate(ids):  # echoed in the answer, which must be JSON (no NaN) and UTF-8
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise RequestError(400, f"ids[{i}]: expected a string or an integer, got "
                               f"{json.dumps(name)[:40]}")
        if isinstance(name, str):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, f"ids[{i}]: not Unicode text (a lone surrogate "
                                   "escape)") from None
    blobs = []
    for i, text in enumerate(images):
        if not isinstance(text, str):
            raise RequestError(400, f"images[{i}]: expected a base64 string")
        if text.startswith("data:"):
            text = _data_url_payload(text, f"images[{i}]")
        try:
            blobs.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"images[{i}]: not base64 ({e})") from None
    return ids, blobs, doc.get("k")


def _data_url_payload(url: str, where: str) -> str:
    """The base64 text of a data: URL of an image (RFC 2397: data:image/png;base64,<text>)."""
    header, comma, payload = url.partition(",")
    media, *params = header[len("data:"):].split(";")
    kind = media.strip().lower()
    if not comma or "base64" not in (p.strip().lower() for p in params):
        raise RequestError(400, f"{where}: a data: URL that is not base64 (send "
                           "data:image/png;base64,<base64>)")
    if kind and not _is_image_type(kind):
        raise RequestError(422, f"{where}: a data: URL of {kind!r}, not of an image (image/*)")
    return payload


FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
"""PIL's readers a request's image may use (JPEG's reads a camera's multi-picture JPEG too, PPM's
PGM): the formats of inference.IMAGE_SUFFIXES."""


def _colour_channels(img) -> int:
    """1 for an image the file stores gray (one band, or a gray palette), else 3 (alpha
    ignored); whether a 3 holds colour is for `inference.pixels_are_gray` to say."""
    if img.mode in ("P", "PA"):
        return 1 if getattr(img.palette, "mode", "RGB") in ("L", "LA") else 3
    bands = [b for b in img.getbands() if b not in ("A", "a")]
    return 1 if len(bands) == 1 else 3


def decode_image(blob: bytes, name, model: Model, resize: bool) -> np.ndarray:
    """(C, S, S) uint8 as the model sees it, or RequestError 422 naming the image."""
    from PIL import Image, UnidentifiedImageError

    from dadh_dist.data import DataError
    from dadh_dist.data.images import DECODE_ERRORS
    from dadh_dist.inference import decode, pixels_are_gray

    where = f"image {name}"
    c, s = model.channels, model.image_size
    try:
        Image.init()  # every reader registered (open() looks FORMATS up among them), once
        # the header, and the pixels only if needed
        with Image.open(io.BytesIO(blob), formats=FORMATS) as img:
            got, (w, h) = _colour_channels(img), img.size
            # a gray model takes gray pixels however stored (a gray GIF, a gray palette, RGB
            # with R == G == B): the pixels decide, as they decide encode's "converted" note;
            # a colour model refuses only images stored gray, which its user can convert.
            # Read only at the model's side: an image of another size is refused unread
            if not resize and (w, h) == (s, s) and c == 1 and got == 3 and pixels_are_gray(img):
                got = 1
    except UnidentifiedImageError:
        raise RequestError(422, f"{where}: not an image of a format served here "
                           f"({', '.join(FORMATS)})") from None
    except DECODE_ERRORS as e:
        raise RequestError(422, f"{where}: not an image ({e})") from None
    if not resize:
        kinds = {1: "gray", 3: "colour"}
        if (w, h) != (s, s):
            raise RequestError(422, f"{where}: {w}x{h} px, the model takes {s}x{s} px (resize "
                               "it, or start the service with --resize)")
        if got != c:
            raise RequestError(422, f"{where}: a {kinds[got]} image, the model takes {kinds[c]} "
                               "images (convert it, or start the service with --resize)")
    try:
        return decode(blob, c, s, where)
    except DataError as e:
        raise RequestError(422, str(e)) from None


def code_strings(packed: np.ndarray, bits: int) -> list[str]:
    """'0'/'1' strings of `bits` characters, character c = bit c of each packed code."""
    chars = (np.unpackbits(packed, axis=1)[:, :bits] + ord("0")).astype(np.uint8)
    return [row.tobytes().decode("ascii") for row in chars]


# ---------------------------------------------------------------------------------------- service


class Service:
    """The hash function, the database index and the request logic, without Ray or HTTP: one
    replica holds one, and tests can drive one directly."""

    def __init__(self, options: Options, database: Codes, model: Model | None = None,
                 model_sha256: str | None = None):
        self.options = options
        self.model = model or load_model(options.checkpoint, options.encoder, options.device)
        if model_sha256 is not None and self.model.model_sha256 != model_sha256:
            raise _config_error(f"{self.model.path}: changed since the service was built (model "
                                f"{self.model.model_sha256[:12]}, expected {model_sha256[:12]})")
        check_database(database, self.model)
        self.database = database
        self.ids = database.ids
        self.index = Index(database, options.backend)

    def info(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("dadh_dist")
        except PackageNotFoundError:
            ours = "unknown"
        m, o = self.model, self.options
        # names, not paths: a client learns which files, not the server's folders (its own
        # start-up line prints the paths)
        db = self.database.path
        learned = m.run_checkpoint.name if m.run_checkpoint else m.path.name
        return {"bits": m.bits, "encoder": m.encoder, "model_sha256": m.model_sha256,
                "database_size": len(self.database),
                "database": db.name if db else f"learned B of {learned}",
                "backend": self.index.backend, "checkpoint": m.path.name,
                "input": {"channels": m.channels, "size": m.image_size, "resize": o.resize},
                "limits": {"max_images": o.max_images, "max_body_bytes": o.max_body_bytes},
                "version": ours}

    def parse(self, route: str, body: bytes, content_type: str, params: dict) -> Work:
        """A /search or /encode request as Work, or RequestError. `params`: the query
        parameters, each a string or the list of the values it was given."""
        k_query = query_k(params)
        names, blobs, k_body = read_images(body, content_type, self.options.max_images)
        if not blobs:
            raise RequestError(400, "no images in the request (send multipart files, or JSON "
                               '{"images": ["<base64>", ...]})')
        if len(blobs) > self.options.max_images:
            raise RequestError(413, f"too many images: {len(blobs)} in one request, the limit "
                               f"is {self.options.max_images} (--max-images)")
        k = 0
        if route == "search":
            if k_body is not None and k_query is not None:
                raise RequestError(400, "k: given in the body and in the query; give it once")
            k = parse_k(k_body if k_body is not None else k_query, len(self.database))
        m = self.model
        images = np.empty((len(blobs), m.channels, m.image_size, m.image_size), np.uint8)
        for i, (name, blob) in enumerate(zip(names, blobs)):
            images[i] = decode_image(blob, name, m, self.options.resize)
        return Work(route, names, images, k)

    def run_batch(self, batch: list[Work]) -> list[dict]:
        """Answers to a batch of requests: one forward pass, one search at the largest k."""
        images = np.concatenate([w.images for w in batch])
        from dadh_dist.retrieval import pack_codes

        packed = pack_codes(self.model.codes(images))
        codes = code_strings(packed, self.model.bits)
        starts = np.cumsum([0] + [len(w.images) for w in batch])
        rows = [np.arange(a, b) for a, b, w in zip(starts, starts[1:], batch)
                if w.route == "search"]
        found = {}
        if rows:
            rows = np.concatenate(rows)
            top = max(w.k for w in batch)
            index, dist = self.index.topk(packed[rows], top)
            found = {int(r): (index[j], dist[j]) for j, r in enumerate(rows)}
        answers = []
        for w, a in zip(batch, starts):
            results = []
            for j, name in enumerate(w.names):
                item = {"query": name, "code": codes[a + j]}
                if w.route == "search":
                    index, dist = found[int(a + j)]
                    item["ids"] = self.ids[index[:w.k]].tolist()
                    item["distances"] = dist[:w.k].astype(int).tolist()
                results.append(item)
            answer = {"bits": self.model.bits, "encoder": self.model.encoder,
                      "model_sha256": self.model.model_sha256}
            if w.route == "search":
                answer.update(k=w.k, backend=self.index.backend)
            answers.append({**answer, "results": results})
        return answers

    def handle(self, method: str, path: str, body: bytes = b"", content_type: str = "",
               params: dict | None = None) -> tuple[int, dict]:
        """(status, JSON document) of one request, without batching (tests, debugging)."""
        try:
            route = check_route(method, path)
            if route in ("info", "healthz"):
                return 200, self.info() if route == "info" else {"status": "ok"}
            if len(body) > self.options.max_body_bytes:
                raise _too_large(len(body), self.options.max_body_bytes)
            return 200, self.run_batch([self.parse(route, body, content_type, params or {})])[0]
        except RequestError as e:
            return e.status, {"error": e.message}


def check_route(method: str, path: str) -> str:
    """The endpoint a request names (any route prefix), or RequestError 404/405. HEAD is
    answered wherever GET is (HTTP requires it; health checkers and proxies send it)."""
    route = path.rstrip("/").rsplit("/", 1)[-1]
    if route not in ROUTES:
        raise RequestError(404, f"{path}: no such endpoint (POST /search, POST /encode, "
                           "GET /info, GET /healthz)")
    allowed = ROUTES[route]
    if method != allowed and not (method == "HEAD" and allowed == "GET"):
        raise RequestError(405, f"{method} {path}: use {allowed}",
                           {"allow": "GET, HEAD" if allowed == "GET" else allowed})
    return route


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, f"body: {size} bytes, the limit is {limit} (--max-body-bytes)")


def _images_in(batch: list[Work]) -> int:
    return sum(len(w.images) for w in batch)


# ----------------------------------------------------------------------------- Serve deployment


class Retrieval:
    """One Serve replica: a `Service` behind plain Starlette request handling, its forward
    passes batched by `serve.batch` (counted in images, at most `Options.max_batch`)."""

    def __init__(self, options: Options, database: Codes, model_sha256: str):
        import torch
        from ray import serve

        # torch's threads = the CPUs reserved: more only wait on each other for a small batch
        torch.set_num_threads(max(1, int(options.cpus_per_replica)))
        self.service = Service(options, database, model_sha256=model_sha256)
        self.encode_batch = serve.batch(max_batch_size=options.max_batch,
                                        batch_wait_timeout_s=options.batch_wait_s,
                                        batch_size_fn=_images_in)(self._run_batch)

    async def _run_batch(self, batch: list[Work]) -> list[tuple[dict, int]]:
        # the forward pass runs in a thread: the replica keeps reading requests meanwhile
        answers = await asyncio.to_thread(self.service.run_batch, batch)
        return [(a, _images_in(batch)) for a in answers]

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        try:
            route = check_route(request.method, request.url.path)
            if route in ("info", "healthz"):
                return JSONResponse(self.service.info() if route == "info" else {"status": "ok"})
            body = await _read_body(request, self.service.options.max_body_bytes)
            query = request.query_params
            # decoding (seconds for large images under --resize) runs in a thread, as the
            # forward pass does: the replica's other requests and its batches go on meanwhile
            work = await asyncio.to_thread(self.service.parse, route, body,
                                           request.headers.get("content-type", ""),
                                           {key: query.getlist(key) for key in query.keys()})
            answer, batch = await self.encode_batch(work)
            return JSONResponse(answer, headers={BATCH_HEADER: str(batch)})
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        except Exception as e:  # a fault of ours: logged in full, answered in one line
            logger.exception("request %s %s failed", request.method, request.url.path)
            msg = " ".join(f"internal error: {type(e).__name__}: {e}".split())
            return JSONResponse({"error": msg}, status_code=500)


async def _read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def build(options: Options):
    """The Serve application of `options`. The model and the database are loaded here first, so
    that a bad checkpoint or a codes file of another model fails before any replica starts."""
    return _build(options)[0]


def _build(options: Options) -> tuple[object, str]:
    """(application, a one-line summary of what it serves)."""
    from ray import serve

    model = load_model(options.checkpoint, options.encoder, "cpu")
    database = load_database(options, model)
    from dadh_dist import uris

    if not uris.is_uri(options.checkpoint):  # replicas need not share the driver's cwd
        options = dataclasses.replace(options, checkpoint=str(model.path.resolve()))
    backend = resolve_backend(options.backend, database.bits)
    summary = (f"{model.path} ({model.bits} bits, encoder {model.encoder}, model "
               f"{model.model_sha256[:12]}) against {len(database)} database codes ({backend})")
    gpus = replica_gpus(options.device)
    # spinning OpenMP threads on shared cores made one forward pass 70x slower (71 ms, not 1 ms)
    OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")  # noqa: N806
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME, num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": gpus,
                           "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": OMP_WAIT_POLICY}}},
        max_ongoing_requests=2 * options.max_batch)(Retrieval)
    return deployment.bind(options, database, model.model_sha256), summary


def replica_gpus(device: str) -> int:
    """GPUs a replica asks Ray for: 1 on a cuda device, 0 on the CPU (cpu:0 included)."""
    from dadh_dist.cli import resolve_device

    return int(resolve_device(device, here=False).type == "cuda")


def check_device(options: Options, remote: bool) -> None:
    """--device before Ray, before anything loads: a supported type, and one this machine has
    unless the replicas run on a cluster named elsewhere (`remote`); encode's one-line error."""
    from dadh_dist.cli import resolve_device

    resolve_device(options.device, here=not remote)


def check_cpus(options: Options, have: float) -> None:
    """Replicas asking for more CPUs than the Ray started on this machine holds would never
    start: refused before they are asked for."""
    need = options.replicas * options.cpus_per_replica
    if need > have:
        raise _config_error(f"--replicas: {options.replicas} x {options.cpus_per_replica} "
                            f"CPU need {need:g} CPUs, this machine has {have:g} "
                            "(lower --cpus-per-replica)")


def check_gpus(options: Options, have: float, where: str = "the Ray cluster") -> None:
    """Replicas asking for GPUs that `where` lacks would wait for them forever after "Started
    Serve": refused once the GPUs where they run are known."""
    need = options.replicas * replica_gpus(options.device)
    if need > have:
        raise _config_error(f"--device: {options.replicas} replica(s) on {options.device} need "
                            f"{need} GPU(s), {where} has {have:g}")


def app(args: dict):
    """Application builder for `serve run dadh_dist.serve:app checkpoint=...` and config files
    (`import_path: dadh_dist.serve:app`, `args: {checkpoint: ..., replicas: 2}`). Host and port
    come from Serve's own http_options there. The device is checked as jobs/serve.py checks it."""
    serve_run = _serve_run_params()
    if serve_run is None:
        return _checked_app(args, os.environ.get("RAY_ADDRESS"))
    # serve run calls the builder in the user's shell: a mistake is one line and exit 2 there,
    # as from jobs/serve.py, not a traceback
    from dadh_dist.cli import run_main

    built = []
    code = run_main(lambda: built.append(_checked_app(args, serve_run.get("address"))))
    if not built:
        sys.exit(code)
    return built[0]


def _checked_app(args: dict, address: str | None):
    import ray

    options = Options.from_args(args)
    if ray.is_initialized():  # Serve's controller building a config file's application
        check_gpus(options, ray.cluster_resources().get("GPU", 0))
    else:  # serve run connects after the builder: to `address`, or to a Ray it starts here
        check_device(options, remote=bool(address))
        if not address:  # Ray starts here, with this machine's CPUs
            check_cpus(options, os.cpu_count() or 1)
        if replica_gpus(options.device):
            check_gpus(options, *_gpus_before_ray(address))
    return build(options)


def _serve_run_params() -> dict | None:
    """The options of the `serve run` command (Serve's CLI is a click program) calling this
    builder, else None."""
    import click

    ctx = click.get_current_context(silent=True)
    return dict(ctx.params) if ctx is not None and ctx.command.name == "run" else None


def _gpus_before_ray(address: str | None) -> tuple[float, str]:
    """(GPUs, where) for the replicas `serve run` starts once it connects: this machine's when
    no cluster is named (Ray starts here and counts the devices torch sees), else the named
    cluster's, over a connection closed at once (serve run connects with its own runtime env)."""
    if not address:
        import torch

        return (torch.cuda.device_count() if torch.cuda.is_available() else 0), "this machine"
    import ray

    ray.init(address=address)
    try:
        return ray.cluster_resources().get("GPU", 0), "the Ray cluster"
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- the command line


def parser() -> argparse.ArgumentParser:
    from dadh_dist.cli import ToolParser

    p = ToolParser(  # --version as every tool has it: `<the command> <version>`
        description="Serve a trained hash function on Ray Serve: POST /search and /encode "
                    "(multipart files or base64 JSON), GET /info and /healthz.",
        epilog="curl -F image=@a.png 'http://127.0.0.1:8000/search?k=5'")
    d = Options("")
    p.add_argument("--checkpoint", required=True, metavar="RUN|CKPT",
                   help="run folder (its newest valid checkpoint), checkpoint_* or export folder")
    p.add_argument("--database", help="database codes file (.parquet; default: the run's "
                   "learned B with the database split's ids)")
    p.add_argument("--encoder", choices=ENCODERS,
                   help="query encoder (default: fg with two streams, else f)")
    p.add_argument("--host", default=d.host, help=f"address to listen on ({d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port ({d.port})")
    p.add_argument("--replicas", type=int, default=d.replicas, help="Serve replicas (1)")
    p.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica,
                   help="CPUs reserved by each replica (1)")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"images in one request ({d.max_images})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"request body size limit ({d.max_body_bytes})")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend,
                   help="auto: faiss IndexBinaryFlat when installed, else packed")
    p.add_argument("--device", default=d.device, help="torch device of the streams (cpu)")
    p.add_argument("--resize", action="store_true", help="convert and resize images to the "
                   "model's geometry as jobs/search.py does (default: refuse others)")
    p.add_argument("--batch-images", type=int, default=d.batch_images,
                   help=f"most images in one batched forward pass ({d.batch_images})")
    p.add_argument("--batch-wait-s", type=float, default=d.batch_wait_s,
                   help=f"wait for more requests before a batch runs ({d.batch_wait_s} s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # --help and usage errors before anything heavy
    from dadh_dist.cli import run_main

    fields = {f.name for f in dataclasses.fields(Options)}
    return run_main(lambda: serve_forever(Options(**{k: v for k, v in vars(args).items()
                                                     if k in fields})))


def serve_forever(options: Options) -> int:
    """Start Ray (in-process, on loopback, unless RAY_ADDRESS names a cluster) and Serve, run
    the application until Ctrl-C or SIGTERM, then shut both down."""
    check_device(options, remote=bool(os.environ.get("RAY_ADDRESS")))
    import ray
    from ray import serve

    application, summary = _build(options)  # user errors here: nothing has started yet
    own_ray = not ray.is_initialized()
    if own_ray and not os.environ.get("RAY_ADDRESS"):
        _check_port(options.host, options.port)
        from dadh_dist.run.session import loopback_only

        loopback_only()  # Ray's own servers; the HTTP proxy listens on --host
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        try:
            check_cpus(options, ray.cluster_resources()["CPU"])
        except Exception:
            ray.shutdown()
            raise
    elif own_ray:
        ray.init()
    try:
        check_gpus(options, ray.cluster_resources().get("GPU", 0))
    except Exception:
        if own_ray:
            ray.shutdown()
        raise
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except Exception as e:  # a replica that failed to start: Serve's message, first line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"error: the service did not start ({first})", file=sys.stderr)
            return 1
        url = f"http://{options.host}:{options.port}"
        # a service manager's stop shuts down as Ctrl-C does; set after ray.init, whose own
        # SIGTERM handler would abort the process
        signal.signal(signal.SIGTERM, _interrupt)
        if options.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"note: listening on {options.host}, so other machines can reach the service; "
                  "it has no authentication of its own", file=sys.stderr)
        print(f"serving {summary} on {url} with {options.replicas} replica(s): POST "
              f"{url}/search, POST {url}/encode, GET {url}/info, GET {url}/healthz; Ctrl-C "
              "stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
        return 0
    finally:
        serve.shutdown()
        if own_ray:
            ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise _config_error(f"--port: cannot listen on {host}:{port} "
                                f"({e.strerror or e})") from None
