"""The code matrix B held as row blocks: each worker keeps only its own rows (docs/design.md §3.8).

Worker r of W holds B[start:stop] (the even split of the n database rows, `even_split`) and
nothing else of B. What the rest of an outer iteration needs of B are sums over rows or a few
rows, so every exchange below is independent of n:

    B_Ω  (m, k)     each row from its owner: zeros elsewhere, one all-reduce SUM (int8)
    BᵀB  (k, k)     Σ_blocks B_bᵀ·B_b, exact integers in float64
    S_Ω·B (m, k)    single-label data: per-class sums of B (c, k) and B's column sums; multi-label
                    data: Σ_blocks S01(Ω, b)·B_b (m, k); the balancing ratio r and Σ_j S² from
                    per-block label counts, all in the same one all-reduce
    checksum        Σ over rows of a 64-bit hash of (row index, row bits), mod 2^64: the same
                    number whatever W, summed from one partial per block (`checksum`)

The code step itself (`solve`) needs H = FᵀF + GᵀG and the block's own rows of Q, which come
from F, G, Ω and the labels of Ω and of the block: no rows of B leave their owner.

Every function here is called on every rank; `c` is a collectives object (`distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dadh_dist import codes, retrieval
from dadh_dist import objective as obj
from dadh_dist.distributed import ReplicaMismatch, even_split

_MASK32 = (1 << 32) - 1
CHUNK_ROWS = 1 << 20
"""Rows a whole-block pass (flipped bits, checksum, packing) holds scratch for at a time."""


def _chunks(rows: int, size: int = CHUNK_ROWS) -> list[slice]:
    """Slices covering range(rows), `size` rows each; one empty slice for an empty block."""
    return [slice(lo, lo + size) for lo in range(0, max(rows, 1), size)]


@dataclass
class Block:
    """This worker's rows of B: B[start:stop] of an (n, k) matrix."""

    start: int
    stop: int
    n: int
    B: torch.Tensor
    """(stop - start, k) int8, ±1 (0 before the first code step with codes.init = zeros)."""
    single: bool
    """Every database row (on every block) and so every Ω row has exactly one label."""
    partial: int | None = None
    """This block's share of `checksum` when the code step wrote it: `verify` compares."""
    bounds: tuple[int, ...] = ()
    """Every rank's first row, then n: rank r owns rows [bounds[r], bounds[r + 1])."""

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def block_rows(n: int, c) -> slice:
    """The rows of B this rank owns."""
    return even_split(n, c.world_size, c.rank)


def open_block(c, B_rows: torch.Tensor, rows: slice, n: int, labels_rows: torch.Tensor) -> Block:
    """A `Block` over this rank's rows; `single` and every rank's rows are agreed on by every
    rank (two small collectives). The blocks must tile [0, n) in rank order."""
    not_single = torch.tensor([0.0 if obj.is_single_label(labels_rows) else 1.0])
    single = float(c.all_reduce_sum(not_single)) == 0.0
    every = c.all_gather_rows(torch.tensor([[rows.start, rows.stop]], dtype=torch.int64))
    starts, stops = every[:, 0].tolist(), every[:, 1].tolist()
    if starts[0] != 0 or stops[-1] != n or starts[1:] != stops[:-1]:
        raise ValueError(f"the workers' rows {list(zip(starts, stops))} do not tile [0, {n})")
    block = Block(rows.start, rows.stop, n, B_rows.to(torch.int8).contiguous(), single,
                  bounds=(*starts, n))
    block.partial = _partial_checksum(block)
    return block


# ------------------------------------------------------------------------------ what Ω needs


def gather_rows(c, block: Block, omega: torch.Tensor) -> torch.Tensor:
    """B_Ω: (m, k) int8, the rows `omega` (database indices) of B, on every rank."""
    inside = (omega >= block.start) & (omega < block.stop)
    out = torch.zeros(omega.shape[0], block.B.shape[1], dtype=torch.int8)
    out[inside] = block.B[omega[inside] - block.start]
    return c.all_reduce_sum(out)  # one owner a row: the others add 0


def gather_label_rows(c, block: Block, labels_rows: torch.Tensor,
                      omega: torch.Tensor) -> torch.Tensor:
    """Ω's labels: (m, c) uint8 0/1, from the owners of its rows (labels_rows: this block's),
    on every rank; one m×c int8 all-reduce, so no worker needs the other blocks' labels."""
    inside = (omega >= block.start) & (omega < block.stop)
    out = torch.zeros(omega.shape[0], labels_rows.shape[1], dtype=torch.int8)
    out[inside] = labels_rows[omega[inside] - block.start].to(torch.int8)
    return c.all_reduce_sum(out).to(torch.uint8)  # one owner a row: the others add 0


def gather_owned(c, block: Block, values: np.ndarray, omega: torch.Tensor) -> torch.Tensor:
    """The rows `omega` of a per-row array that every rank holds only for its own block
    (values: this block's rows, e.g. its images), in Ω's order, on every rank. Each owner sends
    only the Ω rows it holds: one all-gather of about m rows in all, whatever n is."""
    om = omega.numpy()
    owner = np.searchsorted(np.asarray(block.bounds[1:]), om, side="right")
    mine = om[owner == c.rank] - block.start  # in Ω order
    got = c.all_gather_rows(torch.from_numpy(np.ascontiguousarray(values[mine])))
    out = torch.empty((om.shape[0], *values.shape[1:]), dtype=got.dtype)
    out[torch.from_numpy(np.argsort(owner, kind="stable"))] = got  # rank order, then Ω order
    return out


def code_stats(c, block: Block, kind: str, labels_omega: torch.Tensor,
               labels_rows: torch.Tensor, chunk_rows: int = 8192,
               ) -> tuple[obj.CodeStats, obj.SoftSimilarity]:
    """(CodeStats, S) for Ω: what `objective.code_stats` and `objective.make_similarity` give on
    the whole B and database, from one all-reduce of per-block sums.

    labels_omega: (m, c) Ω's labels; labels_rows: (stop - start, c) the block's labels. With
    single-label data every summed value is an integer, so the result is the same on any W;
    multi-label data sums float64 partials of S01·B.
    """
    k = block.B.shape[1]
    m = labels_omega.shape[0]
    BtB = torch.zeros(k, k, dtype=torch.float64)
    colsum = torch.zeros(k, dtype=torch.float64)
    width = labels_rows.shape[1]
    if block.single:
        cls = labels_rows.argmax(1)
        per_class = torch.zeros(width, k, dtype=torch.float64)
        counts = torch.bincount(cls, minlength=width).double()
    else:
        per_omega = torch.zeros(m, k, dtype=torch.float64)  # S01(Ω, block)·B_block
        n_similar = torch.zeros(m, dtype=torch.float64)
    # in chunks of rows, so no float copy of the whole block is held; every partial is a sum of
    # integers (exact in float64), so the chunking changes no value
    for s in range(0, block.B.shape[0], chunk_rows):
        Bd = block.B[s : s + chunk_rows].double()
        BtB += Bd.T @ Bd
        colsum += Bd.sum(0)
        if block.single:
            per_class.index_add_(0, cls[s : s + chunk_rows], Bd)
        else:
            S01 = obj.similar01(labels_omega, labels_rows[s : s + chunk_rows]).double()
            per_omega += S01 @ Bd
            n_similar += S01.sum(1)
    if block.single:
        parts = [BtB, colsum, per_class, counts]
    else:
        parts = [BtB, colsum, per_omega, n_similar, n_similar.sum().reshape(1)]
    shapes = [p.shape for p in parts]
    flat = c.all_reduce_sum(torch.cat([p.reshape(-1) for p in parts]))
    total, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        total.append(flat[at : at + size].reshape(shape))
        at += size
    BtB, colsum = total[0].float(), total[1].float().unsqueeze(0)
    n = block.n
    if block.single:
        class_sums, counts = total[2].float(), total[3]
        omega_cls = labels_omega.argmax(1)
        # r = #similar / #dissimilar over Ω × database (objective.balance_ratio)
        similar = float((torch.bincount(omega_cls, minlength=counts.shape[0]).double()
                         * counts).sum())
        n_similar = counts[omega_cls]
        sim = _similarity(kind, similar, m * n)
        # objective.class_similarity_rows on the summed class sums: (1+r)·Σ_class B − r·1ᵀB
        SB = ((1.0 + sim.r) * class_sums - sim.r * colsum)[omega_cls]
    else:
        s01_b, n_similar, similar = total[2], total[3], float(total[4])
        sim = _similarity(kind, similar, m * n)
        SB = ((1.0 + sim.r) * s01_b - sim.r * total[1].unsqueeze(0)).float()
    S_sq = n_similar + (n - n_similar) * sim.r**2  # objective.similarity_sq_row_sums
    return obj.CodeStats(BtB=BtB, SB=SB, S_sq=S_sq.float(), n=n), sim


def _similarity(kind: str, similar: float, pairs: int) -> obj.SoftSimilarity:
    if kind == "pm1":
        return obj.SoftSimilarity(1.0)
    dissimilar = pairs - similar
    return obj.SoftSimilarity(similar / dissimilar if dissimilar > 0 else 1.0)


# ------------------------------------------------------------------------------ the code step


def solve(block: Block, F: torch.Tensor, G: torch.Tensor | None, omega: torch.Tensor,
          labels_omega: torch.Tensor, labels_rows: torch.Tensor, sim: obj.SoftSimilarity, *,
          gamma: float, eta: float, bits: int, sweeps: int, chunk_rows: int) -> torch.Tensor:
    """The block's new rows of B (DCC, `codes.dcc`) with F, G: (m, k) fixed. Local: no
    collective (H and Q's inputs are the same on every rank)."""
    H = codes.code_hessian(F, G)
    Q = codes.code_linear_rows(block.start, labels_rows, omega, labels_omega, F, G, sim,
                               gamma=gamma, eta=eta, bits=bits, chunk_rows=chunk_rows,
                               by_class=True)
    return codes.dcc(block.B, H, Q, eta, sweeps)


def update(c, block: Block, B_new: torch.Tensor) -> dict:
    """Install the block's new rows and record its checksum share; returns the code-step
    metrics that need every block (flipped bits, bit balance, the W-independent checksum)."""
    k = block.B.shape[1]
    B_new = B_new.to(torch.int8).contiguous()
    new, old = B_new.numpy(), block.B.numpy()
    # a chunk at a time: torch's (new != old).sum() holds an n×k bool and an int64 copy of it
    flipped = float(sum(np.count_nonzero(new[s] != old[s]) for s in _chunks(len(new))))
    block.B = B_new
    block.partial = _partial_checksum(block)
    lo, hi = block.partial & _MASK32, block.partial >> 32
    # numpy sums int8 into int64 through small buffers; torch's sum(dtype=int64) would make an
    # int64 copy of the block first (8 × its bytes)
    columns = torch.from_numpy(block.B.numpy().sum(0, dtype=np.int64)).double()
    sums = c.all_reduce_sum(torch.cat([
        torch.tensor([flipped, float(lo), float(hi)], dtype=torch.float64), columns]))
    n = block.n
    return {
        "codes/flipped": float(sums[0]) / (n * k),
        "codes/bit_balance": float((sums[3:] / n).abs().mean()),
        "codes/checksum": float(_combine(int(sums[1]), int(sums[2])) % 1_000_000_007),
    }


# ------------------------------------------------------------------------------ integrity


def checksum(c, block: Block) -> int:
    """A 64-bit checksum of the whole B (every block), the same for any W and split."""
    part = _partial_checksum(block)
    sums = c.all_reduce_sum(torch.tensor([part & _MASK32, part >> 32], dtype=torch.float64))
    return _combine(int(sums[0]), int(sums[1]))


def verify(c, block: Block, when: str) -> None:
    """Every rank re-hashes its block and compares it with the share the code step recorded;
    one flag per rank is all-reduced, so all ranks stop together (ReplicaMismatch) when any
    block changed in memory since it was written. Cost: the block's bytes hashed, W values sent.
    """
    flags = torch.zeros(c.world_size)
    if block.partial is not None and _partial_checksum(block) != block.partial:
        flags[c.rank] = 1.0
    flags = c.all_reduce_sum(flags)
    bad = [r for r in range(c.world_size) if flags[r] > 0]
    if bad:
        raise ReplicaMismatch(
            f"B's row block on worker(s) {bad} changed since the code step wrote it ({when}); "
            "stopping instead of training on a corrupt block")


def _combine(lo_sum: int, hi_sum: int) -> int:
    return (lo_sum + (hi_sum << 32)) & ((1 << 64) - 1)


def _partial_checksum(block: Block, chunk_rows: int = CHUNK_ROWS) -> int:
    """Σ over the block's rows i of mix(i, bits of row i), mod 2^64 (splitmix64 finaliser);
    chunk_rows rows at a time, so the scratch is bounded whatever the block's size."""
    B = block.B.numpy()
    total = sum(_rows_checksum(B[s], block.start + s.start) for s in _chunks(len(B), chunk_rows))
    return total & ((1 << 64) - 1)


def _rows_checksum(rows: np.ndarray, first: int) -> int:
    packed = retrieval.pack_codes(rows)
    width = -(-packed.shape[1] // 8) * 8
    words = np.zeros((packed.shape[0], width), np.uint8)
    words[:, : packed.shape[1]] = packed
    words = words.view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.arange(first + 1, first + rows.shape[0] + 1, dtype=np.uint64))
        for w in range(words.shape[1]):
            h = _mix(h ^ words[:, w])
        return int(h.sum(dtype=np.uint64))


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# ------------------------------------------------------------------------------ health


DISTINCT_CAP = 1 << 16
"""Distinct codes a block contributes to `distinct_codes` at most (8 bytes each at 64 bits)."""


def distinct_codes(c, block: Block) -> tuple[int, bool]:
    """(distinct rows of the whole B, exact?): each block's distinct rows, at most DISTINCT_CAP
    of them, are gathered and counted once. Exact when no block has more than DISTINCT_CAP
    distinct rows; a lower bound (at least DISTINCT_CAP) otherwise, which is far above what the
    collapse check looks for (fewer distinct codes than classes)."""
    B = block.B.numpy()  # packed a chunk at a time: no n×k bool of the whole block
    packed = np.concatenate([retrieval.pack_codes(B[s]) for s in _chunks(len(B))])
    mine = np.unique(packed, axis=0) if packed.shape[0] else packed
    capped = float(mine.shape[0] > DISTINCT_CAP)
    over = float(c.all_reduce_sum(torch.tensor([capped])))
    every = c.all_gather_rows(torch.from_numpy(np.ascontiguousarray(mine[:DISTINCT_CAP])))
    count = int(np.unique(every.numpy(), axis=0).shape[0]) if every.shape[0] else 0
    return count, over == 0
