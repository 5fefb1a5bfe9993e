"""Export of a trained hash function: weights plus a self-contained `torch.export` program.

    export(hf, "fg", "exported/")   # writes:
        hash_fg.pt2     torch.export program: uint8 images (N, C, S, S) -> int8 ±1 codes (N, k)
        streams.pt      state_dicts of the streams it uses ({"f": ..., "g": ...})
        export.json     bits, encoder, input shape, model SHA-256, resolved config

    program = torch.export.load("exported/hash_fg.pt2").module()
    codes = program(images)         # no dadh_dist needed to run it

Writing into a folder that holds an export of another encoder removes that export's program, so
the folder holds one export, the one export.json describes; the folder's other files (the
user's) stay. An export is never mixed with an earlier one: it is made in a staging folder, and
`install` removes the earlier export's files before moving the new ones in, export.json last, so
export.json is there only with the whole export it describes. An `out` inside the local mirror
of a remote run (a run URI's default export folder) is then published to the same place under
the run URI, as evaluate publishes its report.

The batch dimension is dynamic (any N >= 1); channels and side are fixed to the training
geometry. The codes are sign(f), sign(g) or sign(f + g) with 0 counted as -1, the rule of
`encoding.query_codes`, and `export` checks the saved program against the checkpoint before it
returns.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from dadh_dist import uris
from dadh_dist.config import ENCODERS
from dadh_dist.inference import HashFunction

MAX_BATCH = 1 << 20
CHECK_IMAGES = 16


class ExportError(RuntimeError):
    """The exported program does not reproduce the checkpoint's codes."""


class CodeProgram(nn.Module):
    """x uint8 (N, C, S, S) -> int8 ±1 (N, k): sign of f(x), g(x) or f(x) + g(x)."""

    def __init__(self, f: nn.Module | None, g: nn.Module | None):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.f is not None and self.g is not None:
            y = self.f(x) + self.g(x)
        else:
            y = (self.f if self.f is not None else self.g)(x)
        return torch.where(y > 0, 1, -1).to(torch.int8)


def program_module(hf: HashFunction, encoder: str) -> CodeProgram:
    hf.check_encoder(encoder)
    f = hf.f if "f" in encoder else None
    g = hf.g if "g" in encoder else None
    return CodeProgram(f, g).eval()


def on_cpu(hf: HashFunction) -> HashFunction:
    """`hf` itself on the CPU, else a CPU copy of its streams."""
    if hf.device.type == "cpu":
        return hf
    streams = {name: copy.deepcopy(getattr(hf, name)).cpu() if getattr(hf, name) is not None
               else None for name in ("f", "g")}
    return dataclasses.replace(hf, **streams, device=torch.device("cpu"))


def example_images(hf: HashFunction, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, hf.channels, hf.image_size, hf.image_size)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


def program_name(encoder: str) -> str:
    return f"hash_{encoder}.pt2"


def export(hf: HashFunction, encoder: str, out: str | Path) -> dict[str, Path | str]:
    """Write the program, the weights and their metadata into `out` once the program has been
    verified, in place of an earlier export there (another encoder's program included); the
    folder's other files stay. A program that fails the check leaves `out` as it was; an export
    stopped while its files are put in place leaves no export.json (never a mix of two). Returns
    the paths written, and under "published" where they were sent (user-info masked) when `out`
    lies in a remote run's mirror (`HashFunction.publish`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the CPU's streams, whatever device hf runs on: the program is traced there, the weights
    # saved from there (streams.pt then loads on a machine without a GPU) and the check's
    # reference taken there; the copy keeps tracing from touching hf's modules
    cpu = on_cpu(hf)
    module = copy.deepcopy(program_module(cpu, encoder))
    x = example_images(hf, 2)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})
    names = {"program": program_name(encoder), "weights": "streams.pt",
             "metadata": METADATA}
    with staging_for(out) as staging:
        torch.export.save(program, staging / names["program"])
        streams = {name: getattr(cpu, name).state_dict() for name in ("f", "g") if name in encoder}
        torch.save(streams, staging / names["weights"])
        meta = {
            "encoder": encoder, "bits": hf.bits, "streams": sorted(streams),
            "input": {"dtype": "uint8", "shape": ["N", hf.channels, hf.image_size, hf.image_size],
                      "batch": f"dynamic, 1..{MAX_BATCH}"},
            "output": {"dtype": "int8", "shape": ["N", hf.bits], "values": "+1/-1 (0 -> -1)"},
            "model_sha256": hf.model_sha256, "checkpoint": str(hf.checkpoint.resolve()), "t": hf.t,
            "torch": torch.__version__, "config": hf.cfg.to_dict(),
        }
        (staging / names["metadata"]).write_text(json.dumps(meta, indent=1))
        check_round_trip(cpu, encoder, staging / names["program"], out / names["program"])
        install(staging, out, list(names.values()))
    paths: dict[str, Path | str] = {key: out / name for key, name in names.items()}
    published = hf.publish(out)
    if published:
        paths["published"] = uris.redact(published)
    return paths


# ------------------------------------------------------ never mixed with an earlier export


METADATA = "export.json"
OWN_FILES = frozenset({*(program_name(e) for e in ENCODERS), "streams.pt", METADATA})
"""Every name an export writes into its folder: what an earlier export left under one of them is
replaced or removed by the next; any other file there is the user's and stays."""


STAGING_PREFIX = ".export-"
"""Staging folders inside an export's `out`: `.export-<host>-<pid>-<random>`."""


def _host_prefix() -> str:
    """`.export-<host>-`, the host name with every character but letters, digits, `.` and `_`
    made `_`: a `-` in it would let one host's prefix match another's folders (`a-` in
    `.export-a-1-...`), and the pid after it must be this host's to be checked."""
    import re
    import socket

    return f"{STAGING_PREFIX}{re.sub(r'[^A-Za-z0-9._]', '_', socket.gethostname())}-"


@contextlib.contextmanager
def staging_for(out: Path):
    """A staging folder inside `out` (the same file system, so its files rename in) for the
    block to write an export into; whatever is left of it afterwards goes. Its name holds this
    host's name and this process's id: the staging folders of exports from this host into `out`
    whose process is gone (killed, which no cleanup survives) are removed first. Another host's
    (an `out` on shared storage) are left alone: their process cannot be checked from here."""
    from dadh_dist.checkpoint import remove_stale_staging

    prefix = _host_prefix()
    remove_stale_staging(out, prefixes=(prefix,), stale_after_s=0.0)
    staging = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install(staging: Path, out: Path, names: list[str]) -> None:
    """Make the export staged as `names` in `staging` the one in `out`, so that no file of it is
    ever beside one of an earlier export, however it is stopped: the earlier export's files go
    first, export.json first, then the new ones come in, export.json last. export.json is thus
    there only with the whole export it describes; a stopped install leaves no export.json (the
    export is to be run again), never a mix."""
    for name in sorted(OWN_FILES, key=lambda n: n != METADATA):
        (out / name).unlink(missing_ok=True)
    for name in sorted(names, key=lambda n: n == METADATA):
        os.replace(staging / name, out / name)


def load_program(path: str | Path) -> nn.Module:
    """The callable module of a saved program."""
    return torch.export.load(str(path)).module()


def check_round_trip(hf: HashFunction, encoder: str, path: str | Path,
                     name: str | Path | None = None) -> None:
    """The saved program's codes on seeded random images must equal the checkpoint's codes,
    at a batch size other than the one it was traced with (`name`: the program's name in the
    error, when `path` is a staged copy)."""
    x = example_images(hf, CHECK_IMAGES, seed=1)
    with torch.no_grad():
        got = load_program(path)(x).numpy()
    # the program runs on the CPU: its reference too (a GPU's convolutions, TF32 among them,
    # round otherwise, and an output within rounding of 0 would fail a good program)
    want = on_cpu(hf).codes(x, encoder)
    if got.shape != want.shape or (got != want).any():
        raise ExportError(f"{name or path}: the exported program's codes differ from the "
                          f"checkpoint's on {int((got != want).any(1).sum())} of {len(x)} images")
