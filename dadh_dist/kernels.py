"""Compiled loops (numba) for the three hot spots numpy cannot fuse (issue 17).

* `dcc`: the DCC sweep of `codes.dcc` over blocks of rows, each block transposed so that a bit
  column of it is contiguous and the block stays in cache over the k column passes.
  `dcc_classes` is the same sweep reading Q by class (single-label data: a few class rows, a
  class per row, the Ω rows' additions), so the code step never holds an n×k Q;
  `class_linear` writes that Q out in one pass, `single_label_classes` finds the classes.
* `histograms` / `rank_metrics`: per query, a histogram of Hamming distances (k+1 buckets) with
  the relevant count per bucket; then one pass in database order that puts each relevant item at
  its rank (ties in database order) without sorting. mAP@all, mAP@k and P@N come from that pass,
  the tie-aware AP and the PR curve from the histograms alone.
* `topk`: the smallest Hamming ball holding k items, found from the histogram, filled in a second
  pass in database order (so ties fall in database order, as `retrieval.ranking`'s).

Every kernel is compiled once per argument type and cached on disk (`cache=True`, next to this
file or in numba's cache folder), so a process pays the compile only the first time it ever runs;
later processes load the machine code. Parallel loops use numba's threads; `threads()` sets how
many, following torch's setting when torch is loaded (a worker that ran
`torch.set_num_threads(1)` gets one thread here too).
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange, types
from numba.core.extending import intrinsic

# numba's own thread pool, not its OpenMP layer: once numba's OpenMP runtime has started in a
# process, torch's CPU kernels (which run on OpenMP too) give other float results at one thread,
# so a run resumed in a fresh process would leave the straight run's path (measured: the losses
# differ from the fourth mini-batch on). A user's NUMBA_THREADING_LAYER still wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# ------------------------------------------------------------------------------------ threads


def default_threads() -> int:
    """torch's intra-op thread count when torch is loaded, else numba's default (the CPUs)."""
    limit = numba.config.NUMBA_NUM_THREADS
    torch = sys.modules.get("torch")
    wanted = torch.get_num_threads() if torch is not None else limit
    return max(1, min(int(wanted), limit))


# One kernel call at a time per process. The workqueue layer aborts the whole process when two
# Python threads launch parallel kernels at once (a threaded caller: a service, a sweep running
# cells in threads); a second caller waits here instead. With a threadsafe layer the wait costs
# nothing that oversubscribing the same cores would not.
_LAUNCH = threading.RLock()


@contextmanager
def threads(count: int | None = None):
    """Run the kernels inside on `count` threads (None: `default_threads()`), then restore.

    Every caller of a parallel kernel goes through here: it also holds the launch lock.
    """
    count = default_threads() if count is None else max(1, min(int(count),
                                                               numba.config.NUMBA_NUM_THREADS))
    with _LAUNCH:
        before = numba.get_num_threads()
        numba.set_num_threads(count)
        try:
            yield count
        finally:
            numba.set_num_threads(before)


# ---------------------------------------------------------------------------------------- DCC


@njit(inline="always")
def _solve_block(Bt, Qt, Hc, two_eta, columns, sweeps):
    """The DCC updates of one block in place: Bt, Qt (k, w) the block's B and Q transposed."""
    k, w = Bt.shape
    acc = np.empty(w)
    for _ in range(sweeps):
        for c in columns:
            acc[:] = 0.0
            for j in range(k):
                h = Hc[c, j]
                row = Bt[j]
                for i in range(w):
                    acc[i] += row[i] * h
            hcc = Hc[c, c]
            bc = Bt[c]
            qc = Qt[c]
            for i in range(w):
                prev = bc[i]
                z = qc[i] - two_eta * (acc[i] - prev * hcc)
                if z > 0.0:
                    bc[i] = 1.0
                elif z < 0.0:
                    bc[i] = -1.0
                elif prev == 0.0:
                    bc[i] = 1.0


@njit(parallel=True, cache=True)
def dcc(B, H, Q, two_eta, columns, sweeps, block):
    """DCC in place on B (r, k) int8: `sweeps` passes over the bit columns `columns`, in order.

    H: (k, k) float64; Q: (r, k) float64; two_eta = 2η. For each column c and row i,

        z = Q[i, c] − 2η·(Σ_j B[i, j]·H[j, c] − B[i, c]·H[c, c]),   B[i, c] = sign(z)

    and z = 0 keeps the previous bit (+1 where it is 0). The sum runs over j in order 0..k-1 for
    every row, so any block size and thread count gives the same bits. torch's `Bd @ H[:, c]`
    (the torch form) adds the same exact ±1·H products in an order of its own: the two agree
    where the sums are exact (integer H and Q) and can differ where z is within rounding of 0.
    Rows are independent: blocks run in parallel.
    """
    r, k = B.shape
    nblocks = (r + block - 1) // block
    Hc = np.ascontiguousarray(H.T)  # Hc[c, j] = H[j, c]: the column the update reads, contiguous
    for b in prange(nblocks):
        s = b * block
        w = min(block, r - s)
        Bt = np.empty((k, w))  # the block transposed: bit column j is Bt[j], contiguous
        Qt = np.empty((k, w))
        for i in range(w):
            for j in range(k):
                Bt[j, i] = B[s + i, j]
                Qt[j, i] = Q[s + i, j]
        _solve_block(Bt, Qt, Hc, two_eta, columns, sweeps)
        for i in range(w):
            for j in range(k):
                B[s + i, j] = np.int8(Bt[j, i])


@njit(parallel=True, cache=True)
def dcc_classes(B, H, class_rows, classes, at, add, two_eta, columns, sweeps, block):
    """`dcc` with Q given by class instead of as an (r, k) matrix (`codes.ClassQ`):

        Q[i] = 0 + class_rows[classes[i]], then + add[e] for every e with at[e] = i, in order of e

    class_rows: (c, k) float64; classes: (r,) int64; at: (e,) int64 ascending, in [0, r);
    add: (e, k) float64. Each block builds its own rows of Q in its transposed buffer, with the
    same float operations (in the same order) as `class_linear`, so the bits equal those of
    `dcc` on `class_linear`'s Q, and Q never exists whole.
    """
    r, k = B.shape
    nblocks = (r + block - 1) // block
    Hc = np.ascontiguousarray(H.T)
    for b in prange(nblocks):
        s = b * block
        w = min(block, r - s)
        Bt = np.empty((k, w))
        Qt = np.empty((k, w))
        for i in range(w):
            q = class_rows[classes[s + i]]
            for j in range(k):
                Bt[j, i] = B[s + i, j]
                Qt[j, i] = 0.0 + q[j]
        for e in range(np.searchsorted(at, s), np.searchsorted(at, s + w)):
            i = at[e] - s
            for j in range(k):
                Qt[j, i] += add[e, j]
        _solve_block(Bt, Qt, Hc, two_eta, columns, sweeps)
        for i in range(w):
            for j in range(k):
                B[s + i, j] = np.int8(Bt[j, i])


@njit(parallel=True, cache=True)
def class_linear(class_rows, classes, at, add):
    """The (r, k) float64 Q that `dcc_classes` reads, written in one pass (`codes.ClassQ.dense`)."""
    r, k = classes.shape[0], class_rows.shape[1]
    Q = np.empty((r, k))
    for i in prange(r):
        q = class_rows[classes[i]]
        for j in range(k):
            Q[i, j] = 0.0 + q[j]
    for e in range(at.shape[0]):  # |Ω| rows at most: serial, in order of e
        for j in range(k):
            Q[at[e], j] += add[e, j]
    return Q


@njit(cache=True)
def single_label_classes(labels):
    """(classes (n,) int64, rows that are not one-hot): classes[i] = where row i's single 1 is.

    A row counts as one-hot when its entries are 0 or 1 with exactly one 1 (then the sum is 1
    and the 1 is the argmax in any dtype: `objective.is_single_label` and `argmax` agree with
    this); classes of the other rows are meaningless. One pass, no temporaries.
    """
    n, c = labels.shape
    classes = np.zeros(n, np.int64)
    bad = 0
    for i in range(n):
        ones = 0
        other = 0
        for j in range(c):
            v = labels[i, j]
            if v == 1:
                ones += 1
                classes[i] = j
            elif v != 0:
                other += 1
        if ones != 1 or other != 0:
            bad += 1
    return classes, bad


# ----------------------------------------------------------------------------------- Hamming


@intrinsic
def _popcount(typingctx, x):
    """popcount of a uint64 as an int64 (LLVM's ctpop: one instruction where the CPU has it).

    int64, not uint64: numba types int64 + uint64 as float64, which would turn every distance
    sum into float arithmetic.
    """
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@njit(inline="always")
def _distance(q, db, j):
    """Hamming distance between packed words q (W,) and db[j] (W,)."""
    if q.shape[0] == 1:  # up to 64 bits: no loop (the test is hoisted out of the item loops)
        return _popcount(q[0] ^ db[j, 0])
    d = 0
    for w in range(q.shape[0]):
        d += _popcount(q[w] ^ db[j, w])
    return d


@njit(inline="always")
def _relevant(single, qc, dbc, ql, dbl, j):
    """Does database item j share a label with the query (class ids qc, or label words ql)?"""
    if single:
        return dbc[j] == qc
    for w in range(ql.shape[0]):
        if ql[w] & dbl[j, w]:
            return True
    return False


@njit(inline="always")
def _keys(q, db, single, qc, dbc, ql, dbl, key):
    """key[j] = 2·d_j + (1 if item j is relevant else 0), d_j its distance to the query.

    A loop without scatter, so the compiler vectorises it; the passes that follow read one small
    integer an item instead of recomputing the distance and the relevance.
    """
    for j in range(db.shape[0]):
        rel = 1 if _relevant(single, qc, dbc, ql, dbl, j) else 0
        key[j] = 2 * _distance(q, db, j) + rel


@njit(inline="always")
def _count_keys(key, n, buckets):
    """(2·buckets,) int64: how many of key[:n] hold each value."""
    h = np.zeros(2 * buckets, np.int64)
    for j in range(n):
        h[key[j]] += 1
    return h


@njit(inline="always")
def _span(c, chunks, nq):
    """Queries [lo, hi) of chunk c: one chunk a thread, each with its own scratch row."""
    return c * nq // chunks, (c + 1) * nq // chunks


@njit(parallel=True, cache=True)
def histograms(q_words, db_words, single, q_cls, db_cls, q_lab, db_lab, buckets, scratch):
    """(nq, 2, buckets) int64: per query, [0] items and [1] relevant items at each distance.

    scratch: (chunks, n) uint8 (uint16 above 127 bits), one row per parallel chunk of queries.
    """
    nq, n = q_words.shape[0], db_words.shape[0]
    chunks = scratch.shape[0]
    out = np.zeros((nq, 2, buckets), np.int64)
    for c in prange(chunks):
        lo, hi = _span(c, chunks, nq)
        key = scratch[c]
        for i in range(lo, hi):
            _keys(q_words[i], db_words, single, q_cls[i], db_cls, q_lab[i], db_lab, key)
            h = _count_keys(key, n, buckets)
            for d in range(buckets):
                out[i, 0, d] = h[2 * d] + h[2 * d + 1]
                out[i, 1, d] = h[2 * d + 1]
    return out


@njit(inline="always")
def _add(s, c, x):
    """Neumaier's compensated sum: (s, c) + x."""
    t = s + x
    c += (s - t) + x if abs(s) >= abs(x) else (x - t) + s
    return t, c


@njit(parallel=True, cache=True)
def rank_metrics(q_words, db_words, single, q_cls, db_cls, q_lab, db_lab, buckets, limit, ns,
                 scratch):
    """(nq, 2 + len(ns)) float64 per query: AP@all, AP over the first `limit` of the ranking, and
    for each N of `ns` the number of relevant items among the first N. scratch: as `histograms`.

    The ranking is the database by distance, ties in database order. Pass 1 counts items and
    relevant items per distance; their prefix sums say where each distance's tie group starts.
    Pass 2 walks the database in order, so the items of a tie group arrive in rank order: the
    next item at distance d is at 1-based position (items before the group) + (items of the group
    seen so far) + 1, and a relevant one is the (relevant items before it) + 1-th hit. Both
    counters live in one int64 per distance, (hits << 32) + position, so one add an item keeps
    them (n < 2**31, checked by the caller), and the loop is branch-free: every item's counter is
    written to slot m, and m advances for a relevant item only. AP = mean of hits / position
    over the relevant items, summed with compensation (the reference sums in rank order; both
    are within an ulp or so of the exact sum).
    """
    nq, n = q_words.shape[0], db_words.shape[0]
    chunks = scratch.shape[0]
    out = np.zeros((nq, 2 + ns.shape[0]))
    for c in prange(chunks):
        lo, hi = _span(c, chunks, nq)
        key = scratch[c]
        for i in range(lo, hi):
            _keys(q_words[i], db_words, single, q_cls[i], db_cls, q_lab[i], db_lab, key)
            h = _count_keys(key, n, buckets)
            seen = np.empty(2 * buckets, np.int64)  # at 2·d: the counters of distance d
            items = 0
            total = 0
            for d in range(buckets):
                seen[2 * d] = (total << 32) + items
                items += h[2 * d] + h[2 * d + 1]
                total += h[2 * d + 1]
            if total == 0:
                continue
            packed = np.empty(total + 1, np.int64)
            m = 0
            for j in range(n):
                kj = np.int64(key[j])
                rel = kj & 1
                v = seen[kj - rel] + 1 + (rel << 32)
                seen[kj - rel] = v
                packed[m] = v
                m += rel
            s_all, c_all, s_lim, c_lim, m_lim = 0.0, 0.0, 0.0, 0.0, 0
            found = np.zeros(ns.shape[0], np.int64)
            for t in range(total):
                p = packed[t] & 0xFFFFFFFF
                x = (packed[t] >> 32) / p
                s_all, c_all = _add(s_all, c_all, x)
                if p <= limit:
                    s_lim, c_lim = _add(s_lim, c_lim, x)
                    m_lim += 1
                for u in range(ns.shape[0]):
                    found[u] += p <= ns[u]
            out[i, 0] = (s_all + c_all) / total
            out[i, 1] = (s_lim + c_lim) / m_lim if m_lim else 0.0
            for u in range(ns.shape[0]):
                out[i, 2 + u] = found[u]
    return out


@njit(parallel=True, cache=True)
def block_rank_sums(q_words, db_words, single, q_cls, db_cls, q_lab, db_lab, buckets,
                    items_before, hits_before, limit, ns, scratch):
    """`rank_metrics` for one block of a database split into consecutive row blocks: (nq,
    3 + len(ns)) float64 per query, the block's share of Σ hits/position over all relevant
    items, of the same sum over those at positions <= `limit`, the count of those, and for each
    N of `ns` the relevant items among the first N of the whole ranking.

    items_before, hits_before: (nq, buckets) int64, for each distance d the items (relevant
    items) that rank before this block's first item at d: every block's items at distances < d
    and the earlier blocks' items at d (ties follow database order, and blocks are in database
    order). With them, pass 2 of `rank_metrics` gives every item its position in the whole
    ranking, so the blocks' shares add up to the single-process sums (`retrieval`).
    """
    nq, n = q_words.shape[0], db_words.shape[0]
    chunks = scratch.shape[0]
    out = np.zeros((nq, 3 + ns.shape[0]))
    for c in prange(chunks):
        lo, hi = _span(c, chunks, nq)
        key = scratch[c]
        for i in range(lo, hi):
            _keys(q_words[i], db_words, single, q_cls[i], db_cls, q_lab[i], db_lab, key)
            h = _count_keys(key, n, buckets)
            seen = np.empty(2 * buckets, np.int64)
            total = 0
            for d in range(buckets):
                seen[2 * d] = (hits_before[i, d] << 32) + items_before[i, d]
                total += h[2 * d + 1]
            if total == 0:
                continue
            packed = np.empty(total + 1, np.int64)
            m = 0
            for j in range(n):
                kj = np.int64(key[j])
                rel = kj & 1
                v = seen[kj - rel] + 1 + (rel << 32)
                seen[kj - rel] = v
                packed[m] = v
                m += rel
            s_all, c_all, s_lim, c_lim, m_lim = 0.0, 0.0, 0.0, 0.0, 0
            found = np.zeros(ns.shape[0], np.int64)
            for t in range(total):
                p = packed[t] & 0xFFFFFFFF
                x = (packed[t] >> 32) / p
                s_all, c_all = _add(s_all, c_all, x)
                if p <= limit:
                    s_lim, c_lim = _add(s_lim, c_lim, x)
                    m_lim += 1
                for u in range(ns.shape[0]):
                    found[u] += p <= ns[u]
            out[i, 0] = s_all + c_all
            out[i, 1] = s_lim + c_lim
            out[i, 2] = m_lim
            for u in range(ns.shape[0]):
                out[i, 3 + u] = found[u]
    return out


@njit(parallel=True, cache=True)
def topk(q_words, db_words, k, buckets, scratch):
    """(indices, distances), each (nq, k): the first k of each query's ranking (k <= n).

    Pass 1: the distances (kept in the scratch row) and their histogram give the smallest radius
    R with |{d <= R}| >= k and where each distance's slots start. Pass 2, in database order:
    every item with d < R goes to its slot, and the first k − |{d < R}| items with d = R fill the
    rest; it stops once all k are placed. scratch: (chunks, n) uint8 (uint16 above 255 bits).
    """
    nq, n = q_words.shape[0], db_words.shape[0]
    chunks = scratch.shape[0]
    index = np.empty((nq, k), np.int64)
    dist = np.empty((nq, k), np.int32)
    for c in prange(chunks):
        lo, hi = _span(c, chunks, nq)
        dj = scratch[c]
        for i in range(lo, hi):
            q = q_words[i]
            for j in range(n):
                dj[j] = _distance(q, db_words, j)
            counts = np.zeros(buckets, np.int64)
            for j in range(n):
                counts[dj[j]] += 1
            start = np.empty(buckets, np.int64)
            a = 0
            radius = buckets - 1
            for d in range(buckets):
                start[d] = a
                a += counts[d]
                if a >= k:
                    radius = d
                    break
            left = k
            for j in range(n):
                d = dj[j]
                if d <= radius and start[d] < k:
                    index[i, start[d]] = j
                    dist[i, start[d]] = d
                    start[d] += 1
                    left -= 1
                    if left == 0:
                        break
    return index, dist
