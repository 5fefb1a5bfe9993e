"""Decoding encoded images (files or bytes) into uint8 (C, H, W) arrays, in parallel threads."""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode(src: Path | bytes, size: int = 0, rgb: bool = False) -> np.ndarray:
    """Decode one image to (C, H, W) uint8: C = 1 for grayscale, else 3 (RGB).

    `rgb` forces three channels; `size` > 0 resizes to size x size (bilinear). Raises one of
    DECODE_ERRORS for a missing or corrupt image.
    """
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
        img = img.convert("RGB") if rgb or img.mode not in ("L", "RGB") else img.copy()
    if size > 0 and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(img, np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


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
