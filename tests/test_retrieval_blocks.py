"""Retrieval over a database split into row blocks (one per worker): the combined per-block
values equal the single-process ones, and the block kernel matches a plain-Python loop."""

import numpy as np
import pytest

from dadh_dist import retrieval
from dadh_dist.distributed import even_split


def problem(rng, nq, n, k, classes, single, p_one=0.5):
    q = np.where(rng.random((nq, k)) < p_one, 1, -1).astype(np.int8)
    db = np.where(rng.random((n, k)) < p_one, 1, -1).astype(np.int8)
    if single:
        ql = np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, nq)]
        dl = np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, n)]
    else:  # some rows carry no label: never relevant
        ql = (rng.random((nq, classes)) < 0.25).astype(np.uint8)
        dl = (rng.random((n, classes)) < 0.25).astype(np.uint8)
    return q, db, ql, dl


def split_metrics(q, db, ql, dl, cuts, topk, precision_at):
    """What the workers compute: blocks [cuts[b], cuts[b+1]) of the database, in order."""
    single = bool((dl.sum(1) == 1).all())
    parts = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    every = np.stack([retrieval.block_histograms(q, db[s], ql, dl[s], single=single)
                      for s in parts])
    summed = 0
    for r, s in enumerate(parts):
        before = retrieval.block_offsets(every, r)
        summed = summed + retrieval.block_rank_sums(q, db[s], ql, dl[s], *before, limit=topk,
                                                    ns=[precision_at], single=single)
    return every, retrieval.combine_rank_sums(summed, every, len(db), precision_at, topk)


def cuts_for(n, workers):
    return [0] + [even_split(n, workers, r).stop for r in range(workers)]


@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("workers", [1, 2, 3, 5])
@pytest.mark.parametrize("k,p_one", [(8, 0.9), (32, 0.5), (70, 0.5)])
def test_blocks_give_the_single_process_metrics(single, workers, k, p_one):
    # k = 8 with p_one = 0.9: nearly every distance is 0-2, so almost everything is a tie
    rng = np.random.default_rng(100 * workers + k)
    q, db, ql, dl = problem(rng, 17, 203, k, 4, single, p_one)
    for topk, precision_at in [(None, 50), (30, 7), (1000, 500)]:  # 500 > n: precision over n
        every, got = split_metrics(q, db, ql, dl, cuts_for(len(db), workers), topk,
                                   precision_at)
        want = retrieval.per_query_metrics(q, db, ql, dl, topk=topk, precision_at=precision_at)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-12, err_msg=key)
        counts, hits = every[:, :, 0].sum(0), every[:, :, 1].sum(0)
        for a, b in zip(retrieval.precision_recall_from_histograms(counts, hits),
                        retrieval.precision_recall_curve(q, db, ql, dl)):
            np.testing.assert_array_equal(a, b)


def test_uneven_and_empty_blocks():
    rng = np.random.default_rng(7)
    q, db, ql, dl = problem(rng, 9, 40, 16, 3, True, 0.8)
    want = retrieval.per_query_metrics(q, db, ql, dl, topk=12, precision_at=10)
    for cuts in ([0, 0, 40], [0, 40, 40], [0, 1, 1, 39, 40], [0, 3, 20, 20, 40]):
        _, got = split_metrics(q, db, ql, dl, cuts, 12, 10)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-12, err_msg=key)


def test_query_with_no_relevant_item_scores_zero_on_every_split():
    rng = np.random.default_rng(3)
    q, db, ql, dl = problem(rng, 4, 30, 16, 3, True)
    dl[:] = 0
    dl[:, 0] = 1
    ql[:] = 0
    ql[:, 1] = 1  # no database row is relevant to any query
    ql[0] = [1, 0, 0]  # except for query 0: every row is
    _, got = split_metrics(q, db, ql, dl, cuts_for(30, 3), None, 5)
    assert np.all(got["ap_all"][1:] == 0) and np.all(got["p_at_n"][1:] == 0)
    assert got["ap_all"][0] == pytest.approx(1.0) and got["p_at_n"][0] == 1.0


def test_one_block_mixing_label_kinds_follows_the_agreed_flag():
    """A single-label block of a multi-label database must rank with label sets, as the others
    do: single=False is passed in, and the values still match the whole database's."""
    rng = np.random.default_rng(11)
    q, db, ql, dl = problem(rng, 6, 24, 16, 4, False)
    dl[:12] = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 12)]  # block 0: one label a row
    _, got = split_metrics(q, db, ql, dl, [0, 12, 24], None, 8)
    want = retrieval.per_query_metrics(q, db, ql, dl, precision_at=8)
    np.testing.assert_allclose(got["ap_all"], want["ap_all"], rtol=0, atol=1e-12)


def plain_block_rank_sums(q, db, ql, dl, items_before, hits_before, limit, ns):
    """The block kernel as a plain loop: each item's position in the whole ranking from the
    offsets, then the sums."""
    k = q.shape[1]
    dist = (k - q.astype(np.int64) @ db.T.astype(np.int64)) // 2
    rel = ql.astype(np.int64) @ dl.T.astype(np.int64) > 0
    out = np.zeros((len(q), 3 + len(ns)))
    for i in range(len(q)):
        items, hits = items_before[i].copy(), hits_before[i].copy()
        for j in range(len(db)):  # database order: a tie group's items arrive in rank order
            d = dist[i, j]
            items[d] += 1
            if rel[i, j]:
                hits[d] += 1
                position, x = items[d], hits[d] / items[d]
                out[i, 0] += x
                if limit is None or position <= limit:
                    out[i, 1] += x
                    out[i, 2] += 1
                for u, N in enumerate(ns):
                    out[i, 3 + u] += position <= N
    return out


@pytest.mark.parametrize("single", [True, False])
def test_block_kernel_matches_plain_loop(single):
    rng = np.random.default_rng(5)
    q, db, ql, dl = problem(rng, 8, 50, 12, 3, single, 0.7)
    every = np.stack([retrieval.block_histograms(q, db[s], ql, dl[s], single=single)
                      for s in (slice(0, 20), slice(20, 50))])
    items_before, hits_before = retrieval.block_offsets(every, 1)
    got = retrieval.block_rank_sums(q, db[20:], ql, dl[20:], items_before, hits_before,
                                    limit=9, ns=[3, 60], single=single)
    want = plain_block_rank_sums(q, db[20:], ql, dl[20:], items_before, hits_before, 9, [3, 60])
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    # the offsets: block 1 at distance d follows everything nearer and block 0's items at d
    total = every.sum(0)
    np.testing.assert_array_equal(items_before[:, 0], every[0, :, 0, 0])
    np.testing.assert_array_equal(items_before[:, 1], total[:, 0, 0] + every[0, :, 0, 1])


def test_block_inputs_are_checked():
    rng = np.random.default_rng(1)
    q, db, ql, dl = problem(rng, 3, 10, 8, 2, True)
    h = retrieval.block_histograms(q, db, ql, dl, single=True)
    with pytest.raises(ValueError, match="items_before"):
        retrieval.block_rank_sums(q, db, ql, dl, h[:, 0, :-1], h[:, 1, :-1], limit=None,
                                  ns=[1], single=True)
    with pytest.raises(ValueError, match="rank"):
        retrieval.block_offsets(h[None], 1)
    with pytest.raises(ValueError, match="precision_at"):
        retrieval.combine_rank_sums(np.zeros((3, 4)), h[None], 10, 0, None)
    empty = retrieval.block_histograms(q, db[:0], ql, dl[:0], single=True)
    assert empty.shape == (3, 2, 9) and not empty.any()
