"""Retrieval on binary codes: bit packing, Hamming ranking, and the metrics papers report.

Codes B: (n, k) hold ±1 in any int or float dtype; a value > 0 is bit 1 and anything else,
0 included, is -1. Codes are packed 8 bits to a byte and compared as 64-bit words, so a Hamming
distance is XOR + popcount (`np.bitwise_count`), never a float product.

Ranking rule (every metric except the tie-aware AP): the database sorted by Hamming distance to
the query, ties in database order (index ascending). Relevant: shares at least one label with the
query; labels are 0/1 rows (a value > 0 is a label). Every metric is computed per query first, so
a query's value depends on its own row only. A database split into row blocks (one per worker)
gives the same values without any worker holding it whole: see `block_histograms` below.

Speed: the metrics never materialise a distance row. Compiled kernels (`kernels`) compute,
per query, a histogram of the k+1 possible distances with the relevant count per distance (XOR +
popcount, fused); the tie-aware AP, the PR curve and the radius precision come from it alone,
and the AP / P@N from one more pass in database order that puts each relevant item at its rank
(no sort). Queries run in parallel on numba's threads (`threads`; default: torch's count).
`hamming_distances` and `ranking` remain for callers that want the rows themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from dadh_dist import kernels

_TILE = 1 << 17  # uint64 words per XOR tile (1 MiB): still in cache when popcount reads it
MAX_BITS = 32767
"""The longest codes the metrics take: the kernels' key 2·distance + relevant is a uint16."""


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

    dtype: uint8 when a row has at most 255 bits (ceil(k/8) <= 31 bytes), uint16 up to 65535
    bits, else uint32.
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
    bits = 8 * width_bytes
    return np.uint8 if bits <= 255 else np.uint16 if bits <= 65535 else np.uint32


def _hamming_into(out: np.ndarray, q_words: np.ndarray, db_words_t: np.ndarray) -> None:
    """out (c, n) = popcount(q XOR d) summed over words; q_words (c, W), db_words_t (W, n)."""
    c, n = out.shape
    step = max(1, min(n, max(64, _TILE // max(c, 1))))  # 1 for an empty database: no tiles
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


def _label_words(labels: np.ndarray) -> np.ndarray:
    """(n, W) unsigned words holding each row's label set as bits, in the narrowest word."""
    packed = np.packbits(labels, axis=1)
    width = max(1, packed.shape[1])
    size = 1 if width == 1 else 2 if width == 2 else 4 if width <= 4 else 8
    padded = np.zeros((packed.shape[0], -(-width // size) * size), np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view(f"u{size}")


class _Problem:
    """Query and database codes packed once, labels turned into a relevance test once.

    Relevance for the kernels: single-label data (one label a row everywhere) compares class ids
    (`q_cls`, `db_cls`); otherwise label sets are bit masks (`q_lab`, `db_lab`) and an item is
    relevant iff the AND is non-zero. The unused pair is a one-byte placeholder per row.
    """

    def __init__(self, query_codes, database_codes, query_labels, database_labels, *,
                 single: bool | None = None, block: bool = False):
        """single: None to decide from these labels; a block of a split database passes what
        every block agreed (the database is single-label only if every block is). block: the
        database is one block of a larger one, and may be empty."""
        qc, dc = np.asarray(query_codes), np.asarray(database_codes)
        ql, dl = np.asarray(query_labels), np.asarray(database_labels)
        for name, a in [("query_codes", qc), ("database_codes", dc), ("query_labels", ql),
                        ("database_labels", dl)]:
            if a.ndim != 2:
                raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
        if qc.shape[1] != dc.shape[1]:
            raise ValueError(f"code lengths differ: {qc.shape[1]} vs {dc.shape[1]} bits")
        if qc.shape[1] > MAX_BITS:
            raise ValueError(f"codes of {qc.shape[1]} bits: the metrics take at most {MAX_BITS}")
        if ql.shape[1] != dl.shape[1]:
            raise ValueError(f"label widths differ: {ql.shape[1]} vs {dl.shape[1]}")
        if len(qc) != len(ql) or len(dc) != len(dl):
            raise ValueError(f"codes and labels disagree on row counts: queries {len(qc)} vs "
                             f"{len(ql)}, database {len(dc)} vs {len(dl)}")
        if len(dc) == 0 and not block:
            raise ValueError("the database is empty")
        self.bits, self.nq, self.n = qc.shape[1], len(qc), len(dc)
        self.q_words = _words(pack_codes(qc))
        self.db_words = _words(pack_codes(dc))
        ql, dl = ql > 0, dl > 0
        db_single = bool((dl.sum(1) == 1).all()) if single is None else bool(single)
        self.single = bool((ql.sum(1) == 1).all()) and db_single
        if self.single:  # one label a row: compare class ids, one byte an item
            dtype = np.uint8 if ql.shape[1] <= 256 else np.int32
            self.q_cls, self.db_cls = ql.argmax(1).astype(dtype), dl.argmax(1).astype(dtype)
            self.q_lab, self.db_lab = np.zeros((self.nq, 1), np.uint8), np.zeros((1, 1), np.uint8)
        else:
            self.q_cls, self.db_cls = np.zeros(self.nq, np.uint8), np.zeros(1, np.uint8)
            self.q_lab, self.db_lab = _label_words(ql), _label_words(dl)

    def _args(self):
        return (self.q_words, self.db_words, self.single, self.q_cls, self.db_cls, self.q_lab,
                self.db_lab, self.bits + 1)

    def _scratch(self, threads: int) -> np.ndarray:
        """One key row (2·distance + relevant, n items) per parallel chunk of queries."""
        dtype = np.uint8 if 2 * self.bits + 1 <= 255 else np.uint16
        return np.empty((max(1, min(threads, self.nq)), max(1, self.n)), dtype)

    def histograms(self, threads: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(counts, hits), each (nq, k+1) int64: items and relevant items at each distance."""
        with kernels.threads(_threads(threads)) as t:
            h = kernels.histograms(*self._args(), self._scratch(t))
        return h[:, 0], h[:, 1]

    def rank_metrics(self, limit: int, ns, threads: int | None) -> np.ndarray:
        """(nq, 2 + len(ns)): AP@all, AP@limit, relevant items among the first N of each ns."""
        if self.n >= 2**31:  # the kernel packs two counts below n into one int64
            raise ValueError(f"at most 2**31 - 1 database codes, got {self.n}")
        ns = np.asarray(ns, np.int64).reshape(-1)
        with kernels.threads(_threads(threads)) as t:
            return kernels.rank_metrics(*self._args(), int(limit), ns, self._scratch(t))


def _threads(threads: int | None) -> int:
    """None: `kernels.default_threads()` (torch's thread count when torch is loaded)."""
    if threads is None:
        return kernels.default_threads()
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
    return p.rank_metrics(_cutoff(topk, p.n), [], threads)[:, 1]


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
    n_d, r_d = p.histograms(threads)  # (nq, k+1) each
    R = r_d.sum(1)
    N_d = np.cumsum(n_d, 1) - n_d
    a = np.cumsum(r_d, 1) - r_d + 1.0
    b = np.where(n_d > 1, (r_d - 1) / np.maximum(n_d - 1, 1), 0.0)
    inner = b * n_d + (a - b * (N_d + 1)) * (harmonic[N_d + n_d] - harmonic[N_d])
    # only tie groups holding a relevant item contribute (r_d / n_d is 0 elsewhere)
    terms = np.where(r_d > 0, r_d / np.maximum(n_d, 1) * inner, 0.0)
    return np.where(R > 0, terms.sum(1) / np.maximum(R, 1), 0.0)


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
    return precision_recall_from_histograms(*p.histograms(threads))


def precision_recall_from_histograms(counts: np.ndarray, hits: np.ndarray,
                                     ) -> tuple[np.ndarray, np.ndarray]:
    """`precision_recall_curve` from per-query distance histograms (nq, k+1): items and relevant
    items at each distance (`block_histograms` summed over the blocks)."""
    within, hits = np.cumsum(counts, 1), np.cumsum(hits, 1)
    precision = hits / np.maximum(within, 1)  # hits = 0 wherever within = 0
    total = hits[:, -1:]
    recall = np.where(total > 0, hits / np.maximum(total, 1), 0.0)
    return _mean(precision), _mean(recall)


def precision_at_n(query_codes, database_codes, query_labels, database_labels,
                   ns: Iterable[int], *, threads: int | None = None) -> dict[int, float]:
    """{N: mean precision of the first N of the ranking} (ties in database order).

    When N exceeds the database size n the whole database is retrieved: precision over n items.
    """
    ns = [int(N) for N in ns]
    if not ns or min(ns) < 1:
        raise ValueError(f"ns must be positive integers, got {ns}")
    p = _Problem(query_codes, database_codes, query_labels, database_labels)
    found = p.rank_metrics(p.n, ns, threads)[:, 2:]
    precision = _mean(found / np.minimum(ns, p.n))
    return {N: float(v) for N, v in zip(ns, precision)}


def precision_within_radius(query_codes, database_codes, query_labels, database_labels,
                            radius: int = 2, *, threads: int | None = None) -> float:
    """Mean over queries of the precision of the items within Hamming distance <= radius.

    A query with no item inside the radius scores 0 (and still counts in the mean).
    """
    p = _Problem(query_codes, database_codes, query_labels, database_labels)
    counts, hits = p.histograms(threads)
    inside = slice(0, max(0, min(int(radius), p.bits) + 1))  # distances 0..radius
    retrieved, relevant = counts[:, inside].sum(1), hits[:, inside].sum(1)
    return float(_mean(np.where(retrieved > 0, relevant / np.maximum(retrieved, 1), 0.0)))


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
    values = p.rank_metrics(_cutoff(topk, p.n), [precision_at], threads)
    return {"ap_all": values[:, 0], "ap_topk": values[:, 1],
            "p_at_n": values[:, 2] / min(precision_at, p.n)}


# --------------------------------------------------------------- a database split into blocks
#
# Blocks are consecutive row ranges of the database, in order (worker r holds rows
# [start_r, stop_r)). The ranking of a query over the whole database follows from each block's
# histogram (items, relevant items) per distance: an item of block b at distance d has every
# block's items at distances < d and blocks 0..b-1's items at d before it, then its own block's
# items at d in database order. So each block places its relevant items at their positions in
# the whole ranking and sums its share of AP; the shares add up to the single-process values
# (AP to rounding: each block's share is a compensated sum, and the W shares are added once).
#
#     hist = block_histograms(q, B_b, q_labels, labels_b, single=...)   # (nq, 2, k+1), each b
#     every = gather(hist)                                              # (W, nq, 2, k+1)
#     before = block_offsets(every, b)
#     shares = block_rank_sums(q, B_b, ..., *before, limit=..., ns=[N]) # (nq, 3 + len(ns))
#     per_query = combine_rank_sums(Σ_b shares, every, n, N, limit)


def block_histograms(query_codes, block_codes, query_labels, block_labels, *, single: bool,
                     threads: int | None = None) -> np.ndarray:
    """(nq, 2, k+1) int64: per query, [0] the block's items and [1] its relevant items at each
    Hamming distance. single: every database row of every block has one label (the blocks'
    agreement; the queries are checked here). An empty block gives zeros."""
    p = _Problem(query_codes, block_codes, query_labels, block_labels, single=single, block=True)
    if p.n == 0:
        return np.zeros((p.nq, 2, p.bits + 1), np.int64)
    with kernels.threads(_threads(threads)) as t:
        return kernels.histograms(*p._args(), p._scratch(t))


def block_offsets(every: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(items_before, hits_before), each (nq, k+1) int64: for block `rank` and each distance d,
    the items (relevant items) that rank before its first item at d. every: (W, nq, 2, k+1)
    all blocks' `block_histograms`, in database order."""
    every = np.asarray(every, np.int64)
    if every.ndim != 4 or every.shape[2] != 2 or not 0 <= rank < every.shape[0]:
        raise ValueError(f"every must be (W, nq, 2, k+1) with rank < W, got {every.shape} "
                         f"and rank {rank}")
    total = every.sum(0)  # (nq, 2, k+1)
    before = np.cumsum(total, 2) - total + every[:rank].sum(0)
    return before[:, 0], before[:, 1]


def block_rank_sums(query_codes, block_codes, query_labels, block_labels, items_before,
                    hits_before, *, limit: int | None, ns: Iterable[int], single: bool,
                    threads: int | None = None) -> np.ndarray:
    """(nq, 3 + len(ns)) float64, this block's share of: Σ hits/position over the relevant
    items (AP@all's numerator), the same over positions <= limit (all when None or 0), the count
    of relevant items at positions <= limit, and per N of ns the relevant items among the
    first N. Positions are in the whole database's ranking (`block_offsets`)."""
    p = _Problem(query_codes, block_codes, query_labels, block_labels, single=single, block=True)
    ns = np.asarray(list(ns), np.int64).reshape(-1)
    items_before = np.ascontiguousarray(items_before, np.int64)
    hits_before = np.ascontiguousarray(hits_before, np.int64)
    if items_before.shape != (p.nq, p.bits + 1) or hits_before.shape != items_before.shape:
        raise ValueError(f"items_before and hits_before must be {(p.nq, p.bits + 1)}, got "
                         f"{items_before.shape} and {hits_before.shape}")
    whole = items_before[:, -1].max(initial=0) + p.n  # at most the database size
    if whole >= 2**31:  # the kernel packs two counts below n into one int64
        raise ValueError(f"at most 2**31 - 1 database codes, got at least {whole}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be positive (or None/0 for all), got {limit}")
    cut = int(limit) if limit else 2**62
    if p.n == 0:
        return np.zeros((p.nq, 3 + ns.shape[0]))
    with kernels.threads(_threads(threads)) as t:
        return kernels.block_rank_sums(*p._args(), items_before, hits_before, cut, ns,
                                       p._scratch(t))


def combine_rank_sums(summed: np.ndarray, every: np.ndarray, n: int, precision_at: int,
                      limit: int | None) -> dict[str, np.ndarray]:
    """`per_query_metrics` from the blocks' `block_rank_sums` added up (with ns=[precision_at])
    and their histograms `every` (W, nq, 2, k+1): {"ap_all", "ap_topk", "p_at_n"}, each (nq,).
    ap_topk equals ap_all when limit is None or 0."""
    summed = np.asarray(summed, np.float64)
    if precision_at < 1:
        raise ValueError(f"precision_at must be >= 1, got {precision_at}")
    relevant = np.asarray(every, np.int64)[:, :, 1].sum((0, 2))  # (nq,)
    ap_all = np.where(relevant > 0, summed[:, 0] / np.maximum(relevant, 1), 0.0)
    kept = summed[:, 2]
    ap_topk = (np.where(kept > 0, summed[:, 1] / np.maximum(kept, 1), 0.0) if limit
               else ap_all)
    return {"ap_all": ap_all, "ap_topk": ap_topk,
            "p_at_n": summed[:, 3] / min(int(precision_at), int(n))}
