"""Collectives behind named helpers; the only module that imports torch.distributed.

The training loop talks to `Collectives`: `LocalCollectives` for one process, and
`TorchCollectives` for a process group (gloo on CPU, NCCL on GPU) that Ray Train, or a test,
has initialised. Every helper is called on every rank.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def even_split(length: int, world: int, rank: int) -> slice:
    """Contiguous share of `length` items for `rank`: sizes differ by at most one, no padding."""
    base, extra = divmod(length, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def tensor_checksum(t: torch.Tensor) -> int:
    """A 63-bit hash of a tensor's bytes (for comparing B across workers)."""
    digest = hashlib.blake2b(t.detach().cpu().contiguous().numpy().tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def state_checksum(state: Mapping[str, torch.Tensor]) -> int:
    """A 63-bit hash of a module's state_dict: each entry's name, dtype, shape and bytes (on
    the CPU, in standard layout: a channels_last weight hashes as its contiguous copy), in the
    state_dict's order, which is the modules' registration order and so the same on every
    worker."""
    digest = hashlib.blake2b(digest_size=8)
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_checksum: entry {name!r} is a {type(t).__name__}, not a "
                            "tensor")
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        # bytes as uint8: numpy has no bfloat16, and a 0-d tensor views as one element
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return int.from_bytes(digest.digest(), "little") >> 1


def checksum(x: torch.Tensor | Mapping[str, torch.Tensor]) -> int:
    """`tensor_checksum` of a tensor, `state_checksum` of a state_dict."""
    return tensor_checksum(x) if isinstance(x, torch.Tensor) else state_checksum(x)


@dataclass(frozen=True)
class _Slot:
    """Where the i-th tensor of a packed state goes back."""

    index: int


def pack_state(state):
    """(skeleton, specs), tensors: `state` with each tensor replaced by a _Slot, a
    (dtype, shape, was_on_cpu) per tensor, and the tensors in the same order."""
    tensors: list[torch.Tensor] = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return _Slot(len(tensors) - 1)
        if isinstance(x, dict):
            return _same_kind(x, {k: walk(v) for k, v in x.items()})
        if type(x) in (list, tuple):
            return type(x)(walk(v) for v in x)
        return x  # anything else travels pickled, as it is

    skeleton = walk(state)
    specs = [(t.dtype, tuple(t.shape), t.device.type == "cpu") for t in tensors]
    return (skeleton, specs), tensors


def unpack_state(skeleton, tensors: list):
    """`pack_state` undone: the skeleton with its slots filled from `tensors`."""
    if isinstance(skeleton, _Slot):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return _same_kind(skeleton, {k: unpack_state(v, tensors) for k, v in skeleton.items()})
    if type(skeleton) in (list, tuple):
        return type(skeleton)(unpack_state(v, tensors) for v in skeleton)
    return skeleton


def _same_kind(like: dict, items: dict) -> dict:
    """`items` as a mapping of `like`'s type with its attributes (a module's state_dict is an
    OrderedDict whose `_metadata` load_state_dict reads)."""
    out = type(like)(items)
    if hasattr(like, "__dict__"):
        out.__dict__.update(like.__dict__)
    return out


class ReplicaMismatch(RuntimeError):
    """Workers that must hold identical state do not."""


@dataclass(frozen=True)
class StreamGroup:
    """This worker's half of a stream-parallel run."""

    stream: str
    """The stream this worker trains: f or g."""
    process_group: object
    """torch.distributed group of the workers training the same stream (DDP runs over it)."""
    size: int
    """Workers per stream (W/2)."""
    leaders: dict
    """The lowest rank of each stream's half: the source its weights are shared from."""


class LocalCollectives:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def start_gather_rows(self, t: torch.Tensor, counts: list[int]):
        return lambda: t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def check_identical(self, what: str, t: torch.Tensor) -> int:
        return tensor_checksum(t)

    def check_parts_identical(self, parts: dict) -> None:
        pass  # nothing to compare with, so nothing is hashed

    def broadcast_object(self, obj, src: int = 0):
        return obj

    def broadcast_state(self, state, src: int = 0):
        return state

    def stream_group(self):
        raise RuntimeError("scaling.stream_parallel needs a process group of >= 2 workers")


class TorchCollectives:
    """Collectives over the default torch.distributed process group."""

    def __init__(self, device: torch.device | None = None):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # NCCL needs tensors on the GPU; gloo works on the CPU.
        self.device = device or torch.device("cpu")

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows in rank order; shares may differ in length."""
        sizes = torch.tensor([t.shape[0]], device=self.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(all_sizes, sizes)
        return self.start_gather_rows(t, [int(s) for s in all_sizes])()

    def start_gather_rows(self, t: torch.Tensor, counts: list[int]):
        """`all_gather_rows` when every rank's row count is known (`counts`), started now and
        left running; the function returned waits for it and gives the rows. One collective,
        and whatever the caller does before it waits overlaps with it."""
        if counts[self.rank] != t.shape[0]:
            raise ValueError(f"rank {self.rank} sends {t.shape[0]} rows, counts say "
                             f"{counts[self.rank]}")
        width = max(counts)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        work = dist.all_gather(parts, padded, async_op=True)

        def rows() -> torch.Tensor:
            work.wait()
            return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)

        return rows

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self.device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self.device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out.to(t.device)

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj, src: int = 0):
        """Rank `src`'s `obj` (picklable; tensors travel by value) on every rank."""
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def broadcast_state(self, state, src: int = 0):
        """Rank `src`'s `state` (nested dicts, lists and tuples of tensors and plain values, as a
        module's or an optimiser's state_dict) on every rank, its tensors bit for bit. Only the
        nesting is pickled; the tensors travel as one flat buffer per dtype on the collectives'
        device (no pickled megabytes, no tensor unpickled onto the sender's GPU). A received
        tensor that was on the CPU at `src` is on the CPU, any other on this rank's device."""
        layout = None
        if self.rank == src:
            layout, tensors = pack_state(state)
        layout = self.broadcast_object(layout, src=src)
        skeleton, specs = layout
        flat = {}
        for dtype in sorted({spec[0] for spec in specs}, key=str):
            mine = [i for i, spec in enumerate(specs) if spec[0] == dtype]
            total = sum(math.prod(specs[i][1]) for i in mine)
            if self.rank == src:
                buf = torch.cat([tensors[i].detach().reshape(-1).to(self.device) for i in mine])
            else:
                buf = torch.empty(total, dtype=dtype, device=self.device)
            dist.broadcast(buf, src=src)
            flat[dtype] = (mine, buf)
        if self.rank == src:
            return state
        received: list = [None] * len(specs)
        for mine, buf in flat.values():
            sizes = [math.prod(specs[i][1]) for i in mine]
            for i, part in zip(mine, buf.split(sizes)):
                part = part.reshape(specs[i][1])
                # each tensor in memory of its own: views would keep the whole buffer alive, and
                # an optimiser state loaded from them would save it all into every checkpoint
                received[i] = part.to("cpu", copy=True) if specs[i][2] else part.clone()
        return unpack_state(skeleton, received)

    def stream_group(self) -> StreamGroup:
        """Split the workers in two halves for stream-parallel training: ranks [0, W/2) train f,
        ranks [W/2, W) train g, each half with a process group of its own for DDP. Every rank
        creates both groups (torch requires it), in the same order."""
        half = self.world_size // 2
        groups = {"f": dist.new_group(list(range(half))),
                  "g": dist.new_group(list(range(half, self.world_size)))}
        stream = "f" if self.rank < half else "g"
        return StreamGroup(stream=stream, process_group=groups[stream], size=half,
                           leaders={"f": 0, "g": half})

    def check_identical(self, what: str, t: torch.Tensor) -> int:
        """Compare a checksum of `t` across ranks (one all-gather of W numbers); on any
        difference raise ReplicaMismatch on every rank, naming the ranks that differ from
        rank 0."""
        mine = tensor_checksum(t)
        self._compare({what: mine})
        return mine

    def check_parts_identical(self, parts: dict) -> None:
        """`check_identical` for several named parts at once (tensors or state_dicts, see
        `checksum`), in one all-gather of W×P numbers: the error names each part that differs
        and, per part, the ranks that differ from rank 0. A group of one (a 1-worker Ray run)
        has nothing to compare with and hashes nothing."""
        if self.world_size == 1:
            return
        self._compare({what: checksum(x) for what, x in parts.items()})

    def _compare(self, mine: dict[str, int]) -> None:
        """Gather every rank's checksum of every part (every rank names the same parts, in the
        same order) and raise ReplicaMismatch on every rank when any part differs."""
        row = torch.tensor([list(mine.values())], dtype=torch.int64)
        every = self.start_gather_rows(row, [1] * self.world_size)().tolist()
        odd = []
        for i, what in enumerate(mine):
            sums = [r[i] for r in every]
            ranks = [r for r, s in enumerate(sums) if s != sums[0]]
            if ranks:
                odd.append(f"{what}: worker(s) {ranks} hold other values than worker 0 "
                           "(checksums " + ", ".join(f"{r}: {s:#x}" for r, s in enumerate(sums))
                           + ")")
        if odd:
            raise ReplicaMismatch("; ".join(odd) + "; stopping instead of diverging")


def broadcast_buffers(c, module: torch.nn.Module, src: int = 0) -> None:
    """Rank `src`'s persistent buffers of `module` (BatchNorm's running statistics) copied in
    place into every rank's; a module without any (GroupNorm only) sends nothing."""
    kept = module.state_dict(keep_vars=True)
    buffers = {name: b for name, b in module.named_buffers() if name in kept}
    if not buffers:
        return
    got = c.broadcast_state(buffers, src=src)
    if c.rank != src:
        with torch.no_grad():
            for name, b in buffers.items():
                b.copy_(got[name])


def init_process_group_for_test(rank: int, world_size: int, port: int, timeout_s: int = 60):
    """A gloo group on 127.0.0.1 (tests and benchmarks run workers as plain processes)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def wrap_ddp(module: torch.nn.Module, device: torch.device,
             group: StreamGroup | None = None) -> torch.nn.Module:
    """DDP around a stream when a process group is up (over `group`'s half of the workers in a
    stream-parallel run, else over all); the module itself when that group has one worker."""
    if not is_initialized():
        return module
    size = group.size if group is not None else dist.get_world_size()
    if size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    pg = group.process_group if group is not None else None
    if device.type == "cuda":
        return DistributedDataParallel(module, device_ids=[device.index], process_group=pg)
    return DistributedDataParallel(module, process_group=pg)
