"""Retrieval metrics: a hand-computed case, brute-force references, and invariants."""

import itertools

import numpy as np
import pytest

from dadh_dist import retrieval

# ------------------------------------------------------------------------- naive references


def naive_distances(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Hamming distance of ±1 codes from the inner product: (k - q.d) / 2."""
    return (q.shape[1] - q.astype(np.float64) @ db.T.astype(np.float64)) / 2


def naive_relevance(ql: np.ndarray, dl: np.ndarray) -> np.ndarray:
    return ql.astype(np.float64) @ dl.T.astype(np.float64) > 0


def naive_ap(q, db, ql, dl, topk=None) -> np.ndarray:
    """CalcTopMap written as a loop: stable ranking, first topk, mean of hits / position."""
    dist, rel = naive_distances(q, db), naive_relevance(ql, dl)
    out = np.zeros(len(q))
    for i in range(len(q)):
        order = np.argsort(dist[i], kind="stable")[: topk or None]
        hits, total = 0, 0.0
        for position, j in enumerate(order, start=1):
            if rel[i, j]:
                hits += 1
                total += hits / position
        out[i] = total / hits if hits else 0.0
    return out


def ap_of_flags(flags) -> float:
    hits, total = 0, 0.0
    for position, f in enumerate(flags, start=1):
        if f:
            hits += 1
            total += hits / position
    return total / hits if hits else 0.0


def random_problem(rng, nq, n, k, classes, single):
    q = np.where(rng.random((nq, k)) < 0.5, 1, -1).astype(np.int8)
    db = np.where(rng.random((n, k)) < 0.5, 1, -1).astype(np.int8)
    if single:
        ql = np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, nq)]
        dl = np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, n)]
    else:  # some rows have no label at all: never relevant
        ql = (rng.random((nq, classes)) < 0.2).astype(np.uint8)
        dl = (rng.random((n, classes)) < 0.2).astype(np.uint8)
    return q, db, ql, dl


# ------------------------------------------------------------------------ bits and distances


@pytest.mark.parametrize("k", [8, 12, 32, 48, 64])
def test_pack_unpack_round_trip(k):
    rng = np.random.default_rng(k)
    codes = np.where(rng.random((37, k)) < 0.5, 1, -1).astype(np.int8)
    packed = retrieval.pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (37, -(-k // 8))
    back = retrieval.unpack_codes(packed, k)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)
    np.testing.assert_array_equal(retrieval.pack_codes(back), packed)


def test_pack_zero_counts_as_minus_one_and_dtype_does_not_matter():
    codes = np.array([[0.0, 1.0, -1.0, 0.25, -0.5, 0.0, 3.0, 1.0, 1.0]])
    expected = np.array([[-1, 1, -1, 1, -1, -1, 1, 1, 1]], np.int8)
    np.testing.assert_array_equal(retrieval.unpack_codes(retrieval.pack_codes(codes), 9), expected)
    np.testing.assert_array_equal(retrieval.pack_codes(codes), retrieval.pack_codes(expected))


@pytest.mark.parametrize("k", [8, 12, 33, 64, 72, 130, 300])
def test_hamming_distances_match_inner_product_reference(k, monkeypatch):
    monkeypatch.setattr(retrieval, "_TILE", 256)  # several tiles across the database
    rng = np.random.default_rng(k)
    q = np.where(rng.random((70, k)) < 0.5, 1, -1).astype(np.int8)
    db = np.where(rng.random((301, k)) < 0.5, 1, -1).astype(np.int8)
    d = retrieval.hamming_distances(retrieval.pack_codes(q), retrieval.pack_codes(db))
    assert d.dtype == (np.uint8 if k <= 255 else np.uint16)
    np.testing.assert_array_equal(d, naive_distances(q, db))


def test_hamming_distances_of_an_empty_database_and_of_long_codes():
    """An empty database is an (nq, 0) result (it was a zero tile step); beyond 65535 bits a
    distance needs more than uint16 (it wrapped around)."""
    rng = np.random.default_rng(0)
    q = np.where(rng.random((3, 16)) < 0.5, 1, -1).astype(np.int8)
    d = retrieval.hamming_distances(retrieval.pack_codes(q), retrieval.pack_codes(q[:0]))
    assert d.shape == (3, 0)
    for k in (65535, 65536, 70001):
        q = np.where(rng.random((2, k)) < 0.5, 1, -1).astype(np.int8)
        db = np.concatenate([-q[:1], q[:1], np.where(rng.random((1, k)) < 0.5, 1, -1)])
        d = retrieval.hamming_distances(retrieval.pack_codes(q), retrieval.pack_codes(db))
        assert d[0, 0] == k
        np.testing.assert_array_equal(d, naive_distances(q, db))


def test_ranking_is_stable_by_distance():
    np.testing.assert_array_equal(retrieval.ranking([2, 0, 1, 0, 2, 1]), [1, 3, 2, 5, 0, 4])
    d = np.random.default_rng(0).integers(0, 9, 500)
    np.testing.assert_array_equal(retrieval.ranking(d), np.argsort(d, kind="stable"))


# --------------------------------------------------------------------------- hand-computed mAP

# k = 4 bits, classes A = [1, 0], B = [0, 1].
HAND_Q = np.array([[1, 1, 1, 1], [-1, -1, -1, -1]])
HAND_QL = np.array([[1, 0], [0, 1]])
HAND_DB = np.array([
    [1, 1, 1, -1],  # 0: B   d(q0) = 1   d(q1) = 3
    [1, 1, 1, 1],  # 1: A        0          4
    [-1, 1, 1, -1],  # 2: A        2          2
    [1, -1, 1, 1],  # 3: A        1          3
    [-1, -1, -1, -1],  # 4: A        4          0
    [1, 1, -1, 1],  # 5: B        1          3
])
HAND_DL = np.array([[0, 1], [1, 0], [1, 0], [1, 0], [1, 0], [0, 1]])
# q0 (A): ranking 1(d0) 0(d1) 3(d1) 5(d1) 2(d2) 4(d4), relevant 1 0 1 0 1 1, i.e. at positions
#   1, 3, 5, 6: AP = (1/1 + 2/3 + 3/5 + 4/6) / 4 = 11/15; top 3 = 1 0 3: AP@3 = (1 + 2/3) / 2 = 5/6.
# q1 (B): ranking 4(d0) 2(d2) 0(d3) 3(d3) 5(d3) 1(d4), relevant 0 0 1 0 1 0, at positions 3 and 5:
#   AP = (1/3 + 2/5) / 2 = 11/30; top 3 = 4 2 0: AP@3 = 1/3.
# mAP = (11/15 + 11/30) / 2 = 11/20; mAP@3 = (5/6 + 1/3) / 2 = 7/12.


def test_hand_computed_map():
    ap = retrieval.average_precision(HAND_Q, HAND_DB, HAND_QL, HAND_DL)
    np.testing.assert_allclose(ap, [11 / 15, 11 / 30], rtol=1e-12)
    assert retrieval.mean_average_precision(HAND_Q, HAND_DB, HAND_QL, HAND_DL) == pytest.approx(
        11 / 20, rel=1e-12)


def test_hand_computed_map_at_k():
    ap = retrieval.average_precision(HAND_Q, HAND_DB, HAND_QL, HAND_DL, topk=3)
    np.testing.assert_allclose(ap, [5 / 6, 1 / 3], rtol=1e-12)
    assert retrieval.mean_average_precision(
        HAND_Q, HAND_DB, HAND_QL, HAND_DL, topk=3) == pytest.approx(7 / 12, rel=1e-12)
    # topk beyond the database, or 0, is the whole ranking
    for topk in (0, 6, 100):
        np.testing.assert_allclose(
            retrieval.average_precision(HAND_Q, HAND_DB, HAND_QL, HAND_DL, topk=topk),
            [11 / 15, 11 / 30], rtol=1e-12)


# ------------------------------------------------------------------------- random references


@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("k", [4, 12, 33, 64])
def test_average_precision_matches_naive(single, k):
    rng = np.random.default_rng(10 * k + single)
    q, db, ql, dl = random_problem(rng, 9, 240, k, 5 if single else 6, single)
    for topk in (None, 1, 7, 50, 240):
        np.testing.assert_allclose(
            retrieval.average_precision(q, db, ql, dl, topk), naive_ap(q, db, ql, dl, topk),
            rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("classes", [12, 20, 70, 300])
def test_label_widths_match_naive(classes):
    """Label sets packed into 16-, 32-, 64-bit and multi-word masks; single-label class ids."""
    rng = np.random.default_rng(classes)
    q, db, ql, dl = random_problem(rng, 6, 150, 16, classes, single=False)
    ql[:, 0] = dl[:, 0] = 0
    ql[0, 0] = dl[-1, 0] = 1  # relevance through the first label only, for one query
    for topk in (None, 20):
        np.testing.assert_allclose(retrieval.average_precision(q, db, ql, dl, topk),
                                   naive_ap(q, db, ql, dl, topk), rtol=1e-12)
    q, db, ql, dl = random_problem(rng, 6, 150, 16, classes, single=True)
    np.testing.assert_allclose(retrieval.average_precision(q, db, ql, dl),
                               naive_ap(q, db, ql, dl), rtol=1e-12)


def tie_aware_reference(q, db, ql, dl) -> np.ndarray:
    """Tie-aware AP by its per-group sum, item by item (no harmonic numbers)."""
    dist, rel = naive_distances(q, db), naive_relevance(ql, dl)
    out = np.zeros(len(q))
    for i in range(len(q)):
        R = rel[i].sum()
        if R == 0:
            continue
        N = Rb = 0
        total = 0.0
        for v in np.unique(dist[i]):
            group = dist[i] == v
            n_d, r_d = int(group.sum()), int((group & rel[i]).sum())
            b = (r_d - 1) / (n_d - 1) if n_d > 1 else 0.0
            total += r_d / n_d * sum((Rb + 1 + (t - 1) * b) / (N + t) for t in range(1, n_d + 1))
            N, Rb = N + n_d, Rb + r_d
        out[i] = total / R
    return out


@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("k, p_one", [(2, 0.5), (3, 0.8), (8, 0.9), (20, 0.5), (70, 0.95)])
def test_kernels_on_cases_full_of_ties(single, k, p_one):
    """Few bits or skewed bits: tie groups of tens to hundreds of items, where only database
    order decides the ranking. Every metric against its brute-force reference."""
    rng = np.random.default_rng(100 * k + single)
    nq, n = 11, 700
    q = np.where(rng.random((nq, k)) < p_one, 1, -1).astype(np.int8)
    db = np.where(rng.random((n, k)) < p_one, 1, -1).astype(np.int8)
    _, _, ql, dl = random_problem(rng, nq, n, 1, 3 if single else 5, single)
    dist = naive_distances(q, db)
    assert max(np.bincount(row.astype(int)).max() for row in dist) >= 30  # ties, and many
    for topk in (None, 1, 5, 37, n - 1, n, n + 5):
        np.testing.assert_allclose(retrieval.average_precision(q, db, ql, dl, topk),
                                   naive_ap(q, db, ql, dl, topk), rtol=1e-12, atol=1e-15)
    per = retrieval.per_query_metrics(q, db, ql, dl, topk=37, precision_at=50)
    np.testing.assert_allclose(per["ap_all"], naive_ap(q, db, ql, dl), rtol=1e-12)
    np.testing.assert_allclose(per["ap_topk"], naive_ap(q, db, ql, dl, 37), rtol=1e-12)
    rel = naive_relevance(ql, dl)
    ns = [1, 50, 333, n, 2 * n]
    got = retrieval.precision_at_n(q, db, ql, dl, ns)
    for N in ns:
        ref = [rel[i, np.argsort(dist[i], kind="stable")[:N]].mean() for i in range(nq)]
        assert got[N] == pytest.approx(np.mean(ref), rel=1e-12)
    assert per["p_at_n"].mean() == pytest.approx(got[50], rel=1e-12)
    precision, recall = retrieval.precision_recall_curve(q, db, ql, dl)
    ref_precision, ref_recall = naive_curves(q, db, ql, dl)
    np.testing.assert_allclose(precision, ref_precision.mean(0), rtol=1e-12)
    np.testing.assert_allclose(recall, ref_recall.mean(0), rtol=1e-12)
    for radius in (-1, 0, 1, k, k + 3):
        assert retrieval.precision_within_radius(q, db, ql, dl, radius) == pytest.approx(
            ref_precision[:, min(max(radius, 0), k)].mean() if radius >= 0 else 0.0, rel=1e-12)
    np.testing.assert_allclose(retrieval.average_precision_tie_aware(q, db, ql, dl),
                               tie_aware_reference(q, db, ql, dl), rtol=1e-12)


def test_threads_do_not_change_values():
    rng = np.random.default_rng(3)
    q, db, ql, dl = random_problem(rng, 23, 200, 16, 4, single=True)
    one = retrieval.per_query_metrics(q, db, ql, dl, topk=10, precision_at=30, threads=1)
    many = retrieval.per_query_metrics(q, db, ql, dl, topk=10, precision_at=30, threads=4)
    for key in one:
        np.testing.assert_array_equal(one[key], many[key])
    np.testing.assert_allclose(one["ap_all"], naive_ap(q, db, ql, dl), rtol=1e-12)


def test_query_without_relevant_items_scores_zero():
    q, db, ql, dl = HAND_Q, HAND_DB, np.array([[1, 0, 0], [0, 0, 1]]), np.c_[HAND_DL, np.zeros(6)]
    assert retrieval.average_precision(q, db, ql, dl)[1] == 0.0
    assert retrieval.average_precision_tie_aware(q, db, ql, dl)[1] == 0.0
    per = retrieval.per_query_metrics(q, db, ql, dl, topk=3, precision_at=2)
    assert [per[key][1] for key in ("ap_all", "ap_topk", "p_at_n")] == [0.0, 0.0, 0.0]
    assert per["ap_all"][0] == pytest.approx(11 / 15)
    precision, recall = retrieval.precision_recall_curve(q[1:], db, ql[1:], dl)
    assert precision.max() == 0.0 and recall.max() == 0.0


# ---------------------------------------------------------------------------------- tie-aware


def tie_aware_brute_force(q, db, ql, dl) -> np.ndarray:
    """Mean of AP over every ordering of the items inside each distance tie."""
    dist, rel = naive_distances(q, db), naive_relevance(ql, dl)
    out = []
    for i in range(len(q)):
        groups = [np.flatnonzero(dist[i] == v) for v in np.unique(dist[i])]
        aps = [ap_of_flags(rel[i, np.concatenate(orders)])
               for orders in itertools.product(*[itertools.permutations(g) for g in groups])]
        out.append(np.mean(aps))
    return np.array(out)


@pytest.mark.parametrize("seed", range(4))
def test_tie_aware_ap_is_mean_over_tie_orderings(seed):
    rng = np.random.default_rng(seed)
    q, db, ql, dl = random_problem(rng, 3, 7, 3, 2, single=bool(seed % 2))
    expected = tie_aware_brute_force(q, db, ql, dl)
    np.testing.assert_allclose(retrieval.average_precision_tie_aware(q, db, ql, dl), expected,
                               rtol=1e-12)
    assert retrieval.mean_average_precision_tie_aware(q, db, ql, dl) == pytest.approx(
        expected.mean(), rel=1e-12)


def test_tie_aware_on_hand_case():
    # q0's tie group at distance 1 is (0: B, 3: A, 5: B) at positions 2..4; 3! orderings
    ap = retrieval.average_precision_tie_aware(HAND_Q[:1], HAND_DB, HAND_QL[:1], HAND_DL)
    orderings = [[1, 1, 0, 0, 1, 1], [1, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 1]]  # A at 2, 3 or 4
    assert ap[0] == pytest.approx(np.mean([ap_of_flags(f) for f in orderings]), rel=1e-12)
    assert ap[0] != pytest.approx(11 / 15)  # differs from AP with ties in database order


def test_tie_aware_equals_ap_without_ties():
    rng = np.random.default_rng(5)
    k, n = 12, 12
    q = np.ones((2, k), np.int8)
    q[1, ::2] = -1
    db = np.repeat(q[:1], n, 0)
    flips = rng.permutation(n)  # item j differs from q0 in its first flips[j] bits: no ties
    for j, f in enumerate(flips):
        db[j, :f] = -1
    ql = np.eye(3, dtype=np.uint8)[[0, 1]]
    dl = np.eye(3, dtype=np.uint8)[rng.integers(0, 3, n)]
    dl[0] = [1, 1, 0]
    plain = retrieval.average_precision(q[:1], db, ql[:1], dl)
    assert plain[0] > 0
    np.testing.assert_allclose(retrieval.average_precision_tie_aware(q[:1], db, ql[:1], dl),
                               plain, rtol=1e-12)


# ------------------------------------------------------------------- PR, P@N, radius, per-query


def naive_curves(q, db, ql, dl):
    dist, rel = naive_distances(q, db), naive_relevance(ql, dl)
    k = q.shape[1]
    precision, recall = np.zeros((len(q), k + 1)), np.zeros((len(q), k + 1))
    for i in range(len(q)):
        for radius in range(k + 1):
            inside = dist[i] <= radius
            hits = np.sum(inside & rel[i])
            precision[i, radius] = hits / inside.sum() if inside.sum() else 0.0
            recall[i, radius] = hits / rel[i].sum() if rel[i].sum() else 0.0
    return precision, recall


@pytest.mark.parametrize("single", [True, False])
def test_precision_recall_curve_and_radius_match_naive(single):
    rng = np.random.default_rng(7)
    q, db, ql, dl = random_problem(rng, 12, 300, 10, 4, single)
    precision, recall = retrieval.precision_recall_curve(q, db, ql, dl)
    ref_precision, ref_recall = naive_curves(q, db, ql, dl)
    assert precision.shape == recall.shape == (11,)
    np.testing.assert_allclose(precision, ref_precision.mean(0), rtol=1e-12)
    np.testing.assert_allclose(recall, ref_recall.mean(0), rtol=1e-12)
    assert recall[-1] == pytest.approx((ref_recall[:, -1] > 0).mean())
    for radius in (0, 2, 4):
        assert retrieval.precision_within_radius(q, db, ql, dl, radius) == pytest.approx(
            ref_precision[:, radius].mean(), rel=1e-12)
    assert ref_precision[:, 0].min() == 0.0  # some query has an empty radius-0 ball


def test_precision_within_radius_hand_case():
    # q0 radius 2: items 1, 0, 3, 5, 2 -> 3 relevant of 5; q1: items 4, 2 -> none relevant
    value = retrieval.precision_within_radius(HAND_Q, HAND_DB, HAND_QL, HAND_DL)
    assert value == pytest.approx((3 / 5 + 0) / 2)


@pytest.mark.parametrize("single", [True, False])
def test_precision_at_n_matches_naive(single):
    rng = np.random.default_rng(11)
    q, db, ql, dl = random_problem(rng, 10, 250, 8, 5, single)
    dist, rel = naive_distances(q, db), naive_relevance(ql, dl)
    ns = [1, 5, 40, 250, 400]
    got = retrieval.precision_at_n(q, db, ql, dl, ns)
    for N in ns:
        ref = [rel[i, np.argsort(dist[i], kind="stable")[:N]].mean() for i in range(len(q))]
        assert got[N] == pytest.approx(np.mean(ref), rel=1e-12)
    assert retrieval.precision_at_n(HAND_Q, HAND_DB, HAND_QL, HAND_DL, [3]) == {
        3: pytest.approx((2 / 3 + 1 / 3) / 2)}


def test_per_query_metrics_rows_depend_only_on_their_query():
    rng = np.random.default_rng(13)
    q, db, ql, dl = random_problem(rng, 15, 220, 12, 6, single=False)
    full = retrieval.per_query_metrics(q, db, ql, dl, topk=25, precision_at=40)
    np.testing.assert_allclose(full["ap_all"], naive_ap(q, db, ql, dl), rtol=1e-12)
    np.testing.assert_allclose(full["ap_topk"], naive_ap(q, db, ql, dl, 25), rtol=1e-12)
    p40 = retrieval.precision_at_n(q, db, ql, dl, [40])[40]
    assert full["p_at_n"].mean() == pytest.approx(p40, rel=1e-12)
    rows = [7, 0, 12, 3]
    part = retrieval.per_query_metrics(q[rows], db, ql[rows], dl, topk=25, precision_at=40)
    for key in ("ap_all", "ap_topk", "p_at_n"):
        np.testing.assert_array_equal(part[key], full[key][rows])
    no_topk = retrieval.per_query_metrics(q, db, ql, dl)
    np.testing.assert_array_equal(no_topk["ap_topk"], no_topk["ap_all"])
    empty = retrieval.per_query_metrics(q[:0], db, ql[:0], dl)
    assert all(v.shape == (0,) for v in empty.values())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="code lengths"):
        retrieval.average_precision(HAND_Q[:, :3], HAND_DB, HAND_QL, HAND_DL)
    with pytest.raises(ValueError, match="topk"):
        retrieval.average_precision(HAND_Q, HAND_DB, HAND_QL, HAND_DL, topk=-1)
    with pytest.raises(ValueError, match="no queries"):
        retrieval.mean_average_precision(HAND_Q[:0], HAND_DB, HAND_QL[:0], HAND_DL)
    with pytest.raises(ValueError, match="bytes"):
        retrieval.unpack_codes(retrieval.pack_codes(HAND_Q), 9)


def test_codes_longer_than_the_kernels_take():
    """The kernels keep 2·distance + relevant in a uint16: MAX_BITS bits are exact, one more is
    refused (it wrapped around: an item at distance 33000 was counted at 232)."""
    k = 32767  # retrieval.MAX_BITS
    q = np.ones((1, k), np.int8)
    db = np.ones((3, k), np.int8)
    db[0] = -1  # distance k
    db[1, : k // 2] = -1
    ql, dl = np.eye(2, dtype=np.uint8)[[0]], np.eye(2, dtype=np.uint8)[[0, 1, 0]]
    counts, hits = retrieval._Problem(q, db, ql, dl).histograms(threads=1)
    d = naive_distances(q, db)[0].astype(np.int64)
    np.testing.assert_array_equal(counts[0], np.bincount(d, minlength=k + 1))
    np.testing.assert_array_equal(hits[0], np.bincount(d[[0, 2]], minlength=k + 1))
    longer = np.ones((1, k + 1), np.int8), np.ones((3, k + 1), np.int8)
    with pytest.raises(ValueError, match=f"{k + 1} bits"):
        retrieval.precision_recall_curve(*longer, ql, dl)
    with pytest.raises(ValueError, match=f"{k + 1} bits"):
        retrieval.block_histograms(*longer, ql, dl, single=True)


def test_top_k_of_codes_past_65535_bits_ranks_their_real_distances():
    """The top-k scratch took uint16 distances, which wrap past 65535 bits."""
    from dadh_dist import codesfile

    bits = 70_000
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 2, (4, bits), dtype=np.uint8)
    rows[1] = rows[0]
    rows[1, :66_000] ^= 1  # 66,000 bits away: 464 once wrapped, the nearest
    db = np.packbits(rows, axis=1)
    ids, dist = codesfile._topk_packed(db[:1], db, 4)
    want = retrieval.hamming_distances(db[:1], db)[0]
    assert want[1] == 66_000
    assert ids[0].tolist() == np.argsort(want, kind="stable").tolist()
    assert dist[0].tolist() == sorted(want.tolist())
