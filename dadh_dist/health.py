"""Is a trained hash function doing anything? Collapse checks on codes and mAP (numpy only).

A run whose codes have collapsed (every query the same code, or mAP at the level a random
ranking reaches) looks like a finished run unless something says so. The training log,
final_metrics.json and evaluate's report all use `collapse_warning`.
"""

from __future__ import annotations

import numpy as np

# mAP within this much of the chance level counts as "learned nothing".
CHANCE_MARGIN = 0.05


def distinct_codes(codes: np.ndarray) -> int:
    """Number of distinct rows of a ±1 (or 0/1, or packed) code matrix."""
    codes = np.asarray(codes)
    if codes.shape[0] == 0:
        return 0
    return int(np.unique(np.ascontiguousarray(codes).reshape(codes.shape[0], -1), axis=0).shape[0])


def chance_map(query_labels: np.ndarray, db_labels: np.ndarray) -> float:
    """mAP of a random ranking: per query, the fraction of the database that is relevant
    (shares a label), averaged over every query (one without a relevant item counts 0, as it
    does in mAP)."""
    n = np.asarray(db_labels).shape[0]
    if np.asarray(query_labels).shape[0] == 0 or n == 0:
        return 0.0
    return chance_of(relevant_counts(query_labels, db_labels), n)


RELEVANT_BLOCK = 1 << 24
"""Query × database pairs per block of `relevant_counts`' multi-label path (128 MiB float64)."""


def relevant_counts(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """Per query, how many database items are relevant (share a label: y_q · y_d > 0). Single
    labels (one per row everywhere): the database's count of the query's class. Otherwise in
    blocks of queries of at most RELEVANT_BLOCK pairs: no (queries, n) matrix is held."""
    q = np.asarray(query_labels)
    d = np.asarray(db_labels)
    if q.size and d.size and (q.sum(1) == 1).all() and (d.sum(1) == 1).all():
        return d.sum(0, dtype=np.float64)[q.argmax(1)]
    q, d = q.astype(np.float64), d.astype(np.float64)
    relevant = np.zeros(q.shape[0])
    step = max(1, RELEVANT_BLOCK // max(d.shape[0], 1))
    for start in range(0, q.shape[0], step):
        relevant[start : start + step] = (q[start : start + step] @ d.T > 0).sum(1)
    return relevant


def best_precision_at(relevant: np.ndarray, N: int) -> float:
    """The highest P@N any ranking can reach: a query with fewer than N relevant items has at
    most that many among its first N (mean over queries of min(relevant, N) / N)."""
    relevant = np.asarray(relevant, np.float64)
    return float((np.minimum(relevant, N) / N).mean()) if len(relevant) and N > 0 else 0.0


def chance_of(relevant: np.ndarray, n: int) -> float:
    """`chance_map` from each query's count of relevant database items among n."""
    return float((np.asarray(relevant, np.float64) / n).mean()) if len(relevant) and n else 0.0


def collapse_warning(query_codes: np.ndarray, db_codes: np.ndarray | None,
                     query_labels: np.ndarray, db_labels: np.ndarray | None,
                     map_value: float | None, *, db_distinct: int | None = None,
                     db_rows: int | None = None, chance: float | None = None) -> str | None:
    """One line describing a collapse, or None when the codes look healthy.

    Collapsed when the queries share fewer distinct codes than there are classes among them
    (a hash function that cannot tell the classes apart), when the database codes do, or when
    mAP is within CHANCE_MARGIN of the chance level computed from the labels. A caller that holds
    only part of the database (a sharded evaluation) passes its distinct count, row count and
    chance level instead of `db_codes` and `db_labels`.
    """
    reasons = []
    classes = int((np.asarray(query_labels).sum(0) > 0).sum())
    floor = max(2, classes)
    nq = distinct_codes(query_codes)
    ndb = distinct_codes(db_codes) if db_distinct is None else db_distinct
    rows = db_codes.shape[0] if db_rows is None else db_rows
    if query_codes.shape[0] >= floor and nq < floor:
        reasons.append(f"{nq} distinct query code(s) for {classes} classes")
    if rows >= floor and ndb < floor:
        reasons.append(f"{ndb} distinct database code(s) for {classes} classes")
    if map_value is not None:
        if chance is None:
            chance = chance_map(query_labels, db_labels)
        if map_value <= chance + CHANCE_MARGIN:
            reasons.append(f"mAP {map_value:.3f} is at the chance level {chance:.3f}")
    if not reasons:
        return None
    return "codes collapsed: " + "; ".join(reasons)
