"""Decoding encoded images (files or bytes) into uint8 (C, H, W) arrays, in parallel threads."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dadh_dist.data.problems import Problems

DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes of integer images deeper than 8 bits (16-bit PNG and TIFF files open as I;16)."""


def to_8_bits(img: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer or a float image as 8-bit gray, scaled by its type's range (I;16:
    value/257, rounded): `convert("L")` would clip at 255 and make most of a 16-bit image white.
    Mode I holding only 0..65535 (a 16-bit file read as I) is taken as 16-bit; negatives count
    as 0. Float images (F) are read the same way, by their range: see `_float_to_8_bits`."""
    if img.mode == "F":
        return _float_to_8_bits(img)
    if img.mode not in DEEP_MODES:
        return img
    a = np.asarray(img).astype(np.int64)
    top = 65535 if img.mode != "I" or a.max(initial=0) <= 65535 else 2**31 - 1
    a = (np.clip(a, 0, top) * 255 + top // 2) // top
    return Image.fromarray(a.astype(np.uint8), "L")


def _float_to_8_bits(img: Image.Image) -> Image.Image:
    """A float image holding 0..1 (the float convention) times 255, one holding 0..255 (PIL's
    float form of an 8-bit image) as it is, rounded; any other range is refused (ValueError),
    where `convert("L")` would make 0..1 black and clip the rest: no scale fits every such file,
    and scaling each image by its own min and max would give one scene different pixels in two
    files. As for mode I, the range a file holds decides."""
    a = np.asarray(img, np.float64)
    if not np.isfinite(a).all():
        raise ValueError("float pixels that are not finite (NaN or infinity)")
    lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise ValueError(f"float pixels in {lo:g}..{hi:g}: only 0..1 and 0..255 are read "
                         "(save the image with 8 or 16 bits)")
    scale = 255 if hi <= 1 else 1
    return Image.fromarray(np.floor(a * scale + 0.5).astype(np.uint8), "L")


def decode(src: Path | bytes, size: int = 0, rgb: bool = False) -> np.ndarray:
    """Decode one image to (C, H, W) uint8: C = 1 for grayscale, else 3 (RGB).

    `rgb` forces three channels; `size` > 0 resizes to size x size (bilinear). Raises one of
    DECODE_ERRORS for a missing or corrupt image.
    """
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
        img = to_8_bits(img)  # a 16-bit or float image scaled, not clipped by convert
        img = img.convert("RGB") if rgb or img.mode not in ("L", "RGB") else img.copy()
    if size > 0 and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(img, np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def pixel_digest(a: np.ndarray) -> int:
    """An 8-byte blake2b of one image's pixels: what check-data compares to find an image that is
    in two splits, where the pixels themselves are not kept."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(a), digest_size=8).digest(),
                          "little")


def pixel_digests(images: np.ndarray) -> np.ndarray:
    """(N,) uint64: the pixel_digest of each image of images (N, C, H, W)."""
    return np.fromiter((pixel_digest(a) for a in images), np.uint64, len(images))


def run_chunked(n: int, fn: Callable[[int], None]) -> None:
    """Call fn(0..n-1) from a thread pool (PIL decodes without the GIL).

    Work is dealt in contiguous chunks and results are awaited in order, so the exception
    raised is the one of the lowest failing index.
    """
    workers = min(16, os.cpu_count() or 1, max(1, n // 64))
    bounds = np.linspace(0, n, 4 * workers + 1).astype(int)

    def chunk(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            fn(i)

    if workers == 1:
        chunk(0, n)
        return
    pool = ThreadPoolExecutor(workers)
    try:
        for fut in [pool.submit(chunk, lo, hi) for lo, hi in itertools.pairwise(bounds)]:
            fut.result()
    finally:
        pool.shutdown(cancel_futures=True)


def check_image(src: Path | bytes | None, size: int = 0, rgb: bool = False
                ) -> tuple[np.ndarray | None, str]:
    """Decode one image: (C, H, W) uint8 and '', or None and why it failed ("not found", ...)."""
    if src is None:
        return None, "is missing (null)"
    try:
        return decode(src, size, rgb), ""
    except FileNotFoundError:
        return None, "not found"
    except Image.UnidentifiedImageError:  # its message repeats the path (or a BytesIO's address)
        return None, "is unreadable (no known image format, or cut short in its header)"
    except DECODE_ERRORS as e:
        return None, f"is unreadable ({e})"


def decode_all(
    items: Sequence[Path | bytes | None], describe: Callable[[int], tuple[str, str]], size: int,
    rgb: bool, problems: Problems,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Decode every item (an image file, encoded bytes, or None when missing): images
    (n, C, H, W) uint8, ok (n,) bool, and digests (n,) uint64 when scanning (else None).

    The per-image check of the loaders and of check-data. A missing or unreadable image is
    recorded as a skippable problem; an image whose shape differs from the first good one's as a
    blocking one; neither is ok. describe(i) = (where, subject), e.g. ("test.txt:7", "image a.jpg").
    Problems are recorded in item order whatever order the threads finish in, so the same rows
    are skipped on every worker. When scanning, pixels are checked but not kept: images is then a
    zero-stride placeholder of the right shape, and digests holds each good image's pixel_digest
    (0 for the others), for check-data's duplicate check.
    """
    n = len(items)
    why: list[tuple[str, bool] | None] = [None] * n
    start, probe = 0, None
    while start < n and probe is None:  # the first good image fixes the shape
        probe, reason = check_image(items[start], size, rgb)
        if probe is None:
            why[start] = (reason, True)
        start += 1
    ref = start - 1
    shape = probe.shape if probe is not None else (3 if rgb else 1, size, size)
    keep = not problems.scan
    digests = None if keep else np.zeros(n, np.uint64)
    if keep:
        out = np.empty((n, *shape), np.uint8)
        if probe is not None:
            out[ref] = probe
    else:
        out = np.broadcast_to(np.zeros((1, *shape), np.uint8), (n, *shape))
        if probe is not None:
            digests[ref] = pixel_digest(probe)

    def fill(j: int) -> None:
        i = start + j
        a, reason = check_image(items[i], size, rgb)
        if a is None:
            why[i] = (reason, True)
        elif a.shape != shape:
            why[i] = (f"has shape {a.shape}, but {describe(ref)[0]} has {shape} (set "
                      "data.image_size to resize)", False)
        elif keep:
            out[i] = a
        else:
            digests[i] = pixel_digest(a)

    run_chunked(n - start, fill)
    ok = np.ones(n, bool)
    for i, w in enumerate(why):
        if w is not None:
            where, subject = describe(i)
            problems.add(where, f"{subject} {w[0]}", skippable=w[1])
            ok[i] = False
    return out, ok, digests
