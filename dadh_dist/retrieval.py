"""Retrieval on binary codes: bit packing, Hamming ranking, and the metrics papers report.

Codes B: (n, k) hold ±1 in any int or float dtype; a value > 0 is bit 1 and anything else,
0 included, is -1. Codes are packed 8 bits to a byte and compared as 64-bit words, so a Hamming
distance is XOR + popcount (`np.bitwise_count`), never a float product.

Ranking rule (every metric except the tie-aware AP): the database sorted by Hamming distance to
the query, ties in database order (index ascending). Relevant: shares at least one label with the
query; labels are 0/1 rows (a value > 0 is a label). Every metric is computed per query first, so
a query's value depends on its own row only: the distributed evaluation shards the queries and
gathers the per-query values.

Speed: one query's distances are a uint8 row (uint16 above 255 bits); its ranking is a stable
counting sort of that row (numpy's radix argsort for 8/16-bit integers), and the ranks of the
relevant items come from one gather. No comparison sort and no float work on n items. Queries run
in blocks on a few threads (`threads`); numpy releases the GIL inside these loops.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_BLOCK_BYTES = 1 << 24  # distance rows one thread holds at a time: bounds memory per thread
_TILE = 1 << 17  # uint64 words per XOR tile (1 MiB): still in cache when popcount reads it


# ----------------------------------------------------------------------------- bits and distances


def pack_codes(codes) -> np.ndarray:
    """Pack ±1 codes (n, k) into uint8 (n, ceil(k/8)); bit 1 where a value is > 0.

    A 0 (or anything not > 0, NaN included) is packed as -1. Bit j of a row is bit 7 - j % 8 of
    byte j // 8 (np.packbits order); the padding bits of the last byte are 0.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (n, k), got shape {codes.shape}")
    return np.packbits(codes > 0, axis=1)


def unpack_codes(packed, bits: int) -> np.ndarray:
    """Inverse of `pack_codes`: int8 ±1 codes (n, bits) from packed uint8 (n, ceil(bits/8))."""
    packed = _check_packed(packed, "packed")
    if packed.shape[1] != -(-bits // 8):
        raise ValueError(f"{bits} bits need {-(-bits // 8)} bytes a row, got {packed.shape[1]}")
    return np.unpackbits(packed, axis=1, count=bits).astype(np.int8) * 2 - 1


def hamming_distances(query_packed, db_packed) -> np.ndarray:
    """Hamming distances (nq, n) between packed query rows and packed database rows.

    dtype: uint8 when a row has at most 255 bits (ceil(k/8) <= 31 bytes), else uint16.
    """
    q = _check_packed(query_packed, "query_packed")
    db = _check_packed(db_packed, "db_packed")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"packed widths differ: {q.shape[1]} vs {db.shape[1]} bytes")
    q_words, db_words_t = _words(q), np.ascontiguousarray(_words(db).T)
    out = np.empty((q.shape[0], db.shape[0]), _distance_dtype(q.shape[1]))
    for s in range(0, q.shape[0], 64):
        _hamming_into(out[s : s + 64], q_words[s : s + 64], db_words_t)
    return out


def ranking(distances_row) -> np.ndarray:
    """Database indices sorted by distance, ties in database order.

    Integer distances below 2**16 are sorted by numpy's radix (counting) sort.
    """
    d = np.asarray(distances_row)
    if d.ndim != 1:
        raise ValueError(f"distances_row must be 1-D, got shape {d.shape}")
    wide = d.dtype.kind in "iu" and d.dtype.itemsize > 2 and d.size
    if wide and 0 <= d.min() and d.max() < 2**16:  # radix sort instead of timsort
        d = d.astype(np.uint8 if d.max() < 2**8 else np.uint16)
    return np.argsort(d, kind="stable")


def _check_packed(packed, name: str) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(f"{name} must be uint8 (n, bytes) from pack_codes, got "
                         f"{packed.dtype} {packed.shape}")
    return packed


def _words(packed: np.ndarray) -> np.ndarray:
    """(n, W) uint64 view of packed rows, zero-padded to whole words (zeros XOR to zero)."""
    n, width = packed.shape
    padded = np.zeros((n, 8 * max(1, -(-width // 8))), np.uint8)
    padded[:, :width] = packed
    return padded.view(np.uint64)


def _distance_dtype(width_bytes: int) -> type:
    return np.uint8 if 8 * width_bytes <= 255 else np.uint16


def _hamming_into(out: np.ndarray, q_words: np.ndarray, db_words_t: np.ndarray) -> None:
    """out (c, n) = popcount(q XOR d) summed over words; q_words (c, W), db_words_t (W, n)."""
    c, n = out.shape
    step = min(n, max(64, _TILE // max(c, 1)))
    xor = np.empty((c, step), np.uint64)
    count = np.empty((c, step), np.uint8)
    for s in range(0, n, step):
        e = min(s + step, n)
        x = xor[:, : e - s]
        np.bitwise_xor(q_words[:, :1], db_words_t[0, s:e], out=x)
        np.bitwise_count(x, out=out[:, s:e])
        for w in range(1, q_words.shape[1]):
            np.bitwise_xor(q_words[:, w : w + 1], db_words_t[w, s:e], out=x)
            out[:, s:e] += np.bitwise_count(x, out=count[:, : e - s])


# ------------------------------------------------------------------------- queries against a db


class _Relevance:
    """rel(i) -> (n,) bool: the database items that share at least one label with query i."""

    def __init__(self, query_labels: np.ndarray, database_labels: np.ndarray):
        ql, dl = query_labels > 0, database_labels > 0
        self.single = bool((ql.sum(1) == 1).all() and (dl.sum(1) == 1).all())
        if self.single:  # one label a row: compare class ids, one byte an item
            dtype = np.uint8 if ql.shape[1] <= 256 else np.int32
            self.q, self.db = ql.argmax(1).astype(dtype), dl.argmax(1).astype(dtype)
        else:  # label sets as bit masks: relevant iff the AND is non-zero
            self.q, self.db = _label_words(ql), np.ascontiguousarray(_label_words(dl).T)

    def __call__(self, i: int) -> np.ndarray:
        if self.single:
            return self.db == self.q[i]
        rel = (self.db[0] & self.q[i, 0]) != 0
        for w in range(1, self.db.shape[0]):
            rel |= (self.db[w] & self.q[i, w]) != 0
        return rel


def _label_words(labels: np.ndarray) -> np.ndarray:
    """(n, W) unsigned words holding each row's label set as bits, in the narrowest word."""
    packed = np.packbits(labels, axis=1)
    width = max(1, packed.shape[1])
    size = 1 if width == 1 else 2 if width == 2 else 4 if width <= 4 else 8
    padded = np.zeros((packed.shape[0], -(-width // size) * size), np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view(f"u{size}")


class _Problem:
    """Query and database codes packed once, labels turned into a relevance test once."""

    def __init__(self, query_codes, database_codes, query_labels, database_labels):
        qc, dc = np.asarray(query_codes), np.asarray(database_codes)
        ql, dl = np.asarray(query_labels), np.asarray(database_labels)
        for name, a in [("query_codes", qc), ("database_codes", dc), ("query_labels", ql),
                        ("database_labels", dl)]:
            if a.ndim != 2:
                raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
        if qc.shape[1] != dc.shape[1]:
            raise ValueError(f"code lengths differ: {qc.shape[1]} vs {dc.shape[1]} bits")
        if ql.shape[1] != dl.shape[1]:
            raise ValueError(f"label widths differ: {ql.shape[1]} vs {dl.shape[1]}")
        if len(qc) != len(ql) or len(dc) != len(dl):
            raise ValueError(f"codes and labels disagree on row counts: queries {len(qc)} vs "
                             f"{len(ql)}, database {len(dc)} vs {len(dl)}")
        if len(dc) == 0:
            raise ValueError("the database is empty")
        self.bits, self.nq, self.n = qc.shape[1], len(qc), len(dc)
        packed_q, packed_db = pack_codes(qc), pack_codes(dc)
        self.dtype = _distance_dtype(packed_q.shape[1])
        self.q_words = _words(packed_q)
        self.db_words_t = np.ascontiguousarray(_words(packed_db).T)
        self.relevance = _Relevance(ql, dl)

    def map_rows(self, per_row: Callable[[np.ndarray, np.ndarray], object], width: int,
                 threads: int | None) -> np.ndarray:
        """(nq, width) float64: per_row(d, rel) for each query's distances d and relevance rel."""
        out = np.zeros((self.nq, width))
        rows = max(1, min(256, _BLOCK_BYTES // self.n))
        starts = range(0, self.nq, rows)
        workers = max(1, min(_threads(threads), len(starts)))
        buffers = threading.local()  # one distance block per thread, reused

        def run(s: int) -> None:
            if not hasattr(buffers, "d"):
                buffers.d = np.empty((min(rows, self.nq), self.n), self.dtype)
            e = min(s + rows, self.nq)
            d = buffers.d[: e - s]
            _hamming_into(d, self.q_words[s:e], self.db_words_t)
            for i in range(s, e):
                out[i] = per_row(d[i - s], self.relevance(i))

        if workers == 1:
            for s in starts:
                run(s)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, starts))
        return out


def _threads(threads: int | None) -> int:
    """None: the CPUs this process may run on, at most 8."""
    if threads is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return max(1, min(8, cpus))
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


def _cutoff(topk: int | None, n: int) -> int:
    """Items of the ranking a metric looks at: all when topk is None or 0."""
    if not topk:
        return n
    if topk < 0:
        raise ValueError(f"topk must be positive (or None/0 for all), got {topk}")
    return min(int(topk), n)


def _relevant_ranks(d: np.ndarray, rel: np.ndarray, limit: int) -> np.ndarray:
    """Ascending 0-based positions of the relevant items among the first `limit` of the ranking."""
    if limit >= d.shape[0]:
        ranked = np.argsort(d, kind="stable")
    else:  # only the smallest Hamming ball holding `limit` items needs sorting
        lo, hi = 0, int(d.max())  # smallest radius r with |{d <= r}| >= limit, by bisection
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if np.count_nonzero(d <= mid) >= limit else (mid + 1, hi)
        ball = np.flatnonzero(d <= lo)
        ranked = ball[np.argsort(d[ball], kind="stable")[:limit]]
    return np.flatnonzero(rel[ranked])


def _ap(ranks: np.ndarray) -> float:
    """AP from the 0-based ranks of the retrieved relevant items: mean of hits / position."""
    if ranks.size == 0:
        return 0.0
    return float(np.mean(np.arange(1, ranks.size + 1) / (ranks + 1.0)))


def _mean(values: np.ndarray):
    """Mean over queries (axis 0); refuses an empty query set instead of returning NaN."""
    if values.shape[0] == 0:
        raise ValueError("no queries")
    return values.mean(0)


# ------------------------------------------------------------------------------------- metrics


def average_precision(query_codes, database_codes, query_labels, database_labels,
                      topk: int | None = None, *, threads: int | None = None) -> np.ndarray:
    """Per-query AP (nq,) float64 over the first topk of the ranking (all when None or 0).

    The definition of DeepHash / ADSH (CalcTopMap): rank the database by Hamming distance, ties
    in database order, keep the first topk; with r_1 < r_2 < ... < r_m the 1-based positions of
    the relevant items kept, AP = (1/m) sum_j j / r_j. A query with m = 0 scores 0.
    """
    p = _Problem(query_codes, database_codes, query_labels, database_labels)
    limit = _cutoff(topk, p.n)
    return p.map_rows(lambda d, rel: _ap(_relevant_ranks(d, rel, limit)), 1, threads)[:, 0]


def mean_average_precision(query_codes, database_codes, query_labels, database_labels,
                           topk: int | None = None, *, threads: int | None = None) -> float:
    """mAP@topk (mAP@all when topk is None or 0): the mean of `average_precision`."""
    return float(_mean(average_precision(query_codes, database_codes, query_labels,
                                         database_labels, topk, threads=threads)))


def average_precision_tie_aware(query_codes, database_codes, query_labels, database_labels, *,
                                threads: int | None = None) -> np.ndarray:
    """Per-query tie-aware AP (nq,): the expected AP over all orderings within distance ties.

    He, Cakir, Bargal, Sclaroff, "Hashing as Tie-Aware Learning to Rank", CVPR 2018. Per Hamming
    distance d: n_d items of which r_d relevant; N_d = sum_{d'<d} n_d' items and
    R_d = sum_{d'<d} r_d' relevant ones rank before the tie group; R = sum_d r_d. A relevant item
    of the group sits at group position t, uniform on 1..n_d, with (t-1)(r_d-1)/(n_d-1) relevant
    items of its group expected before it, so

        AP_T = (1/R) sum_d (r_d/n_d) sum_{t=1}^{n_d} (R_d + 1 + (t-1)(r_d-1)/(n_d-1)) / (N_d + t)

    (the fraction is 0 when n_d = 1). With H_m the harmonic numbers and a = R_d + 1,
    b = (r_d-1)/(n_d-1), the inner sum is b n_d + (a - b (N_d + 1)) (H_{N_d+n_d} - H_{N_d}).
    A query with R = 0 scores 0. There is no topk: a cut inside a tie group has no closed form.
    """
    p = _Problem(query_codes, database_codes, query_labels, database_labels)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, p.n + 1))])
    buckets = p.bits + 1

    def per_row(d: np.ndarray, rel: np.ndarray) -> float:
        n_d = np.bincount(d, minlength=buckets)
        r_d = np.bincount(d[rel], minlength=buckets)
        R = r_d.sum()
        if R == 0:
            return 0.0
        g = np.flatnonzero(r_d)  # tie groups holding a relevant item
        n_g, r_g = n_d[g], r_d[g]
        N_g = (np.cumsum(n_d) - n_d)[g]
        a = (np.cumsum(r_d) - r_d)[g] + 1.0
        b = np.where(n_g > 1, (r_g - 1) / np.maximum(n_g - 1, 1), 0.0)
        inner = b * n_g + (a - b * (N_g + 1)) * (harmonic[N_g + n_g] - harmonic[N_g])
        return float(np.sum(r_g / n_g * inner) / R)

    return p.map_rows(per_row, 1, threads)[:, 0]


def mean_average_precision_tie_aware(query_codes, database_codes, query_labels, database_labels,
                                     *, threads: int | None = None) -> float:
    """Tie-aware mAP: the mean of `average_precision_tie_aware`."""
    return float(_mean(average_precision_tie_aware(query_codes, database_codes, query_labels,
                                                   database_labels, threads=threads)))


def precision_recall_curve(query_codes, database_codes, query_labels, database_labels, *,
                           threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall), each (k+1,): retrieval within Hamming radius 0..k, query-averaged.

    For radius r a query retrieves the items at distance <= r. Precision of an empty retrieval
    set counts as 0, and so does the recall of a query that has no relevant item; both are
    averaged over all queries.
    """
    p = _Problem(query_codes, database_codes, query_labels, database_labels)
    buckets = p.bits + 1

    def per_row(d: np.ndarray, rel: np.ndarray) -> np.ndarray:
        within = np.cumsum(np.bincount(d, minlength=buckets))
        hits = np.cumsum(np.bincount(d[rel], minlength=buckets))
        precision = hits / np.maximum(within, 1)  # hits = 0 wherever within = 0
        recall = hits / hits[-1] if hits[-1] else np.zeros(buckets)
        return np.concatenate([precision, recall])

    mean = _mean(p.map_rows(per_row, 2 * buckets, threads))
    return mean[:buckets], mean[buckets:]


def precision_at_n(query_codes, database_codes, query_labels, database_labels,
                   ns: Iterable[int], *, threads: int | None = None) -> dict[int, float]:
    """{N: mean precision of the first N of the ranking} (ties in database order).

    When N exceeds the database size n the whole database is retrieved: precision over n items.
    """
    ns = [int(N) for N in ns]
    if not ns or min(ns) < 1:
        raise ValueError(f"ns must be positive integers, got {ns}")
    p = _Problem(query_codes, database_codes, query_labels, database_labels)
    limit = min(max(ns), p.n)
    sizes = np.minimum(ns, p.n)

    def per_row(d: np.ndarray, rel: np.ndarray) -> np.ndarray:
        return np.searchsorted(_relevant_ranks(d, rel, limit), ns) / sizes

    return {N: float(v) for N, v in zip(ns, _mean(p.map_rows(per_row, len(ns), threads)))}


def precision_within_radius(query_codes, database_codes, query_labels, database_labels,
                            radius: int = 2, *, threads: int | None = None) -> float:
    """Mean over queries of the precision of the items within Hamming distance <= radius.

    A query with no item inside the radius scores 0 (and still counts in the mean).
    """
    p = _Problem(query_codes, database_codes, query_labels, database_labels)

    def per_row(d: np.ndarray, rel: np.ndarray) -> float:
        inside = d <= radius
        retrieved = np.count_nonzero(inside)
        return np.count_nonzero(inside & rel) / retrieved if retrieved else 0.0

    return float(_mean(p.map_rows(per_row, 1, threads)[:, 0]))


def per_query_metrics(query_codes, database_codes, query_labels, database_labels,
                      topk: int | None = None, precision_at: int = 1000, *,
                      threads: int | None = None) -> dict[str, np.ndarray]:
    """One ranking per query, three metrics: {"ap_all", "ap_topk", "p_at_n"}, each (nq,).

    ap_all: `average_precision` over the whole ranking; ap_topk: over its first topk (equal to
    ap_all when topk is None or 0); p_at_n: precision of the first `precision_at` items. Each
    value depends only on its own query row, so shards of the queries give the same rows.
    """
    if precision_at < 1:
        raise ValueError(f"precision_at must be >= 1, got {precision_at}")
    p = _Problem(query_codes, database_codes, query_labels, database_labels)
    limit = _cutoff(topk, p.n)
    size = min(precision_at, p.n)

    def per_row(d: np.ndarray, rel: np.ndarray) -> tuple[float, float, float]:
        ranks = _relevant_ranks(d, rel, p.n)
        ap_all = _ap(ranks)
        ap_topk = _ap(ranks[: np.searchsorted(ranks, limit)]) if limit < p.n else ap_all
        return ap_all, ap_topk, np.searchsorted(ranks, precision_at) / size

    values = p.map_rows(per_row, 3, threads)
    return {"ap_all": values[:, 0], "ap_topk": values[:, 1], "p_at_n": values[:, 2]}
