import math

import pytest
import torch

from dadh_dist import objective as obj


def _labels_single(n, c, gen):
    y = torch.zeros(n, c)
    y[torch.arange(n), torch.randint(0, c, (n,), generator=gen)] = 1
    return y


def _labels_multi(n, c, gen):
    y = (torch.rand(n, c, generator=gen) < 0.3).float()
    y[y.sum(1) == 0, 0] = 1
    return y


def test_similar01_hand_case():
    a = torch.tensor([[1, 0, 0], [0, 1, 1]])
    b = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert obj.similar01(a, b).tolist() == [[1, 0, 0], [1, 1, 0]]


def test_balance_ratio_hand_case():
    # Ω classes [0, 1], database classes [0, 0, 1, 2]: similar pairs 2 + 1 = 3 of 8.
    eye = torch.eye(3)
    r = obj.balance_ratio(eye[[0, 1]], eye[[0, 0, 1, 2]])
    assert r == pytest.approx(3 / 5)
    sim = obj.SoftSimilarity(r)
    assert sim.apply(torch.tensor([1.0, 0.0])).tolist() == pytest.approx([1.0, -0.6])


@pytest.mark.parametrize("multi", [False, True])
def test_balance_ratio_matches_dense(multi):
    gen = torch.Generator().manual_seed(1)
    make = _labels_multi if multi else _labels_single
    yo, yd = make(20, 5, gen), make(57, 5, gen)
    s01 = obj.similar01(yo, yd)
    expect = float(s01.sum()) / float((1 - s01).sum())
    assert obj.balance_ratio(yo, yd, chunk_rows=7) == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("multi", [False, True])
def test_similarity_times_equals_dense(multi):
    gen = torch.Generator().manual_seed(2)
    make = _labels_multi if multi else _labels_single
    ya, yb = make(33, 6, gen), make(41, 6, gen)
    U = torch.randn(41, 8, generator=gen, dtype=torch.float64)
    sim = obj.SoftSimilarity(0.37)
    dense = sim.apply(obj.similar01(ya, yb).double()) @ U
    fast = obj.similarity_times(sim, ya, yb, U, chunk_rows=5)
    torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)
    sq = obj.similarity_sq_row_sums(sim, ya, yb, chunk_rows=5)
    torch.testing.assert_close(sq, (sim.apply(obj.similar01(ya, yb).double()) ** 2).sum(1))


@pytest.mark.parametrize("multi", [False, True])
def test_factored_code_loss_equals_naive(multi):
    gen = torch.Generator().manual_seed(3)
    make = _labels_multi if multi else _labels_single
    n, m, k = 300, 40, 16
    y_db = make(n, 7, gen)
    omega = torch.randperm(n, generator=gen)[:m]
    B = torch.where(torch.rand(n, k, generator=gen) < 0.5, -1.0, 1.0)
    sim = obj.make_similarity("soft", y_db[omega], y_db)
    stats = obj.code_stats(B, sim, y_db[omega], y_db, chunk_rows=64)
    rows = torch.tensor([3, 17, 0, 39])
    X = torch.tanh(torch.randn(4, k, generator=gen, dtype=torch.float32))
    S_M = sim.apply(obj.similar01(y_db[omega][rows], y_db))
    fast = obj.code_loss(X, stats, rows, k)
    naive = obj.code_loss_naive(X, B, S_M, k)
    assert float(fast) == pytest.approx(float(naive), rel=1e-5)
    # gradients agree too
    Xa = X.clone().requires_grad_(True)
    Xb = X.clone().requires_grad_(True)
    obj.code_loss(Xa, stats, rows, k).backward()
    obj.code_loss_naive(Xb, B, S_M, k).backward()
    torch.testing.assert_close(Xa.grad, Xb.grad, rtol=1e-4, atol=1e-3)


def test_pair_loss_hand_case():
    # One pair, k = 2: Θ = ½·(1·1 + 0·1) = 0.5
    X = torch.tensor([[1.0, 0.0]])
    Y = torch.tensor([[1.0, 1.0]])
    similar = obj.pair_loss(X, Y, torch.tensor([[1.0]]))
    dissimilar = obj.pair_loss(X, Y, torch.tensor([[0.0]]))
    assert float(similar) == pytest.approx(math.log(1 + math.e**0.5) - 0.5)
    assert float(dissimilar) == pytest.approx(math.log(1 + math.e**0.5))


def test_quant_loss_hand_case():
    X = torch.tensor([[0.5, -0.5]])
    B = torch.tensor([[1.0, 1.0]])
    assert float(obj.quant_loss(X, B)) == pytest.approx(0.25 + 2.25)


def test_stream_loss_switches_and_normalisation():
    gen = torch.Generator().manual_seed(4)
    n, m, k = 50, 10, 8
    y = _labels_single(n, 3, gen)
    omega = torch.arange(m)
    B = torch.where(torch.rand(n, k, generator=gen) < 0.5, -1.0, 1.0)
    sim = obj.make_similarity("soft", y[omega], y)
    stats = obj.code_stats(B, sim, y[omega], y)
    rows = torch.arange(4)
    X = torch.tanh(torch.randn(4, k, generator=gen))
    other = torch.tanh(torch.randn(m, k, generator=gen))
    s01 = obj.similar01(y[omega][rows], y[omega])
    w = obj.LossWeights(alpha=2.0, gamma=3.0, eta=5.0, pair_norm="pairs", bits=k)
    total, terms = obj.stream_loss(X, other, s01, B[omega][rows], stats, rows, w, batch_total=4)
    assert float(terms["pair"]) == pytest.approx(float(obj.pair_loss(X, other, s01)) / (4 * m))
    assert float(terms["quant"]) == pytest.approx(float(obj.quant_loss(X, B[rows])) / (4 * n))
    assert float(terms["code"]) == pytest.approx(float(obj.code_loss(X, stats, rows, k)) / (4 * n))
    expect = 2 * terms["pair"] + 3 * terms["quant"] + 5 * terms["code"]
    assert float(total) == pytest.approx(float(expect))
    # L_pair and L_code switched off
    w_off = obj.LossWeights(alpha=0.0, gamma=3.0, eta=0.0, pair_norm="shared", bits=k)
    total_off, terms_off = obj.stream_loss(X, other, s01, B[rows], stats, rows, w_off, 4)
    assert set(terms_off) == {"quant"}
    assert float(total_off) == pytest.approx(3 * float(terms["quant"]))


def test_effective_weights_are_resolved_once_from_the_switches():
    from dadh_dist.config import ObjectiveConfig

    on = obj.LossWeights.from_config(ObjectiveConfig(alpha=2.0, gamma=3.0, eta=5.0, bits=12))
    assert (on.alpha, on.gamma, on.eta, on.bits) == (2.0, 3.0, 5.0, 12)
    off = obj.LossWeights.from_config(ObjectiveConfig(alpha=2.0, gamma=3.0, eta=5.0,
                                                      use_pair=False, use_code=False))
    assert (off.alpha, off.gamma, off.eta) == (0.0, 3.0, 0.0)
    assert obj.LossWeights.from_config(ObjectiveConfig(use_quant=False)).gamma == 0.0
