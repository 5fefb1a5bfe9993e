import itertools

import pytest
import torch

from dadh_dist import codes
from dadh_dist import objective as obj


def _problem(n=120, m=30, k=12, c=5, multi=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if multi:
        y = (torch.rand(n, c, generator=gen) < 0.3).float()
        y[y.sum(1) == 0, 0] = 1
    else:
        y = torch.zeros(n, c)
        y[torch.arange(n), torch.randint(0, c, (n,), generator=gen)] = 1
    omega = torch.randperm(n, generator=gen)[:m]
    F = torch.tanh(torch.randn(m, k, generator=gen))
    G = torch.tanh(torch.randn(m, k, generator=gen))
    B0 = torch.where(torch.rand(n, k, generator=gen) < 0.5, -1, 1).to(torch.int8)
    sim = obj.make_similarity("soft", y[omega], y)
    return y, omega, F, G, B0, sim


def _dense_Q(y, omega, F, G, sim, gamma, eta, k):
    """Q = 2ηk·S_Ωᵀ(F+G) + 2γ(F̄+Ḡ) with the explicit n×m similarity matrix."""
    S = sim.apply(obj.similar01(y[omega], y).double())  # (m, n)
    U = F.double() + G.double()
    bar = torch.zeros(y.shape[0], k, dtype=torch.float64)
    bar[omega] = U
    return 2 * eta * k * S.T @ U + 2 * gamma * bar


@pytest.mark.parametrize("multi", [False, True])
def test_factored_Q_equals_dense(multi):
    y, omega, F, G, _, sim = _problem(multi=multi)
    Q = codes.code_linear(slice(None), y, omega, F, G, sim, gamma=7.0, eta=2.0, bits=12,
                          chunk_rows=16)
    torch.testing.assert_close(Q, _dense_Q(y, omega, F, G, sim, 7.0, 2.0, 12))


def test_objective_matches_J_up_to_constant():
    """η·tr(BHBᵀ) − tr(BᵀQ) differs from γ·L_quant + η·L_code by a B-independent constant."""
    y, omega, F, G, B0, sim = _problem(n=40, m=10, k=6)
    gamma, eta, k = 3.0, 0.5, 6
    H = codes.code_hessian(F, G)
    Q = codes.code_linear(slice(None), y, omega, F, G, sim, gamma=gamma, eta=eta, bits=k)
    S = sim.apply(obj.similar01(y[omega], y).double())

    def J(B):
        Bd = B.double()
        quant = ((Bd[omega] - F.double()) ** 2).sum() + ((Bd[omega] - G.double()) ** 2).sum()
        code = ((F.double() @ Bd.T - k * S) ** 2).sum() + ((G.double() @ Bd.T - k * S) ** 2).sum()
        return float(gamma * quant + eta * code)

    B1 = -B0
    B2 = B0.clone()
    B2[:, 0] *= -1
    d1 = J(B1) - codes.code_objective(B1, H, Q, eta)
    d0 = J(B0) - codes.code_objective(B0, H, Q, eta)
    d2 = J(B2) - codes.code_objective(B2, H, Q, eta)
    assert d1 == pytest.approx(d0, rel=1e-9) and d2 == pytest.approx(d0, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_column_update_never_increases_objective(seed):
    y, omega, F, G, B0, sim = _problem(seed=seed)
    eta = 1.5
    H = codes.code_hessian(F, G)
    Q = codes.code_linear(slice(None), y, omega, F, G, sim, gamma=200.0, eta=eta, bits=12)
    values = [codes.code_objective(B0, H, Q, eta)]
    codes.dcc(B0, H, Q, eta, sweeps=3,
              on_column=lambda c, B: values.append(codes.code_objective(B, H, Q, eta)))
    assert len(values) == 1 + 3 * 12
    steps = torch.tensor(values[1:]) - torch.tensor(values[:-1])
    assert (steps <= 1e-9 * abs(values[0])).all()
    assert values[-1] < values[0]


def test_column_update_is_exact_minimiser():
    """On a tiny case each column update is the best of all 2^r choices for that column."""
    y, omega, F, G, B0, sim = _problem(n=6, m=4, k=3, c=2)
    eta = 0.7
    H = codes.code_hessian(F, G)
    Q = codes.code_linear(slice(None), y, omega, F, G, sim, gamma=5.0, eta=eta, bits=3)
    B1 = codes.dcc(B0, H, Q, eta, sweeps=1, on_column=None)
    # re-run column 0 only by brute force from B0
    best = None
    for col in itertools.product([-1, 1], repeat=6):
        Bc = B0.clone()
        Bc[:, 0] = torch.tensor(col, dtype=torch.int8)
        v = codes.code_objective(Bc, H, Q, eta)
        best = v if best is None or v < best else best
    after_col0 = []
    codes.dcc(B0, H, Q, eta,
              on_column=lambda c, B: after_col0.append(B.clone()) if c == 0 else None)
    assert codes.code_objective(after_col0[0], H, Q, eta) == pytest.approx(best)
    assert set(B1.unique().tolist()) <= {-1, 1}


def test_tie_rule_keeps_previous_bit():
    H = torch.eye(2, dtype=torch.float64)
    Q = torch.zeros(3, 2, dtype=torch.float64)  # every z is 0 when H is diagonal and Q = 0
    B = torch.tensor([[1, -1], [-1, -1], [0, 0]], dtype=torch.int8)
    out = codes.dcc(B, H, Q, eta=1.0)
    assert out.tolist() == [[1, -1], [-1, -1], [1, 1]]


@pytest.mark.parametrize("multi", [False, True])
def test_row_blocks_equal_whole(multi):
    y, omega, F, G, B0, sim = _problem(n=101, multi=multi)
    eta, gamma, k = 1.0, 50.0, 12
    H = codes.code_hessian(F, G)
    Q = codes.code_linear(slice(None), y, omega, F, G, sim, gamma=gamma, eta=eta, bits=k)
    whole = codes.dcc(B0, H, Q, eta)
    for bounds in ([0, 50, 101], [0, 34, 68, 101], [0, 1, 100, 101]):
        parts = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            Q = codes.code_linear(slice(a, b), y, omega, F, G, sim, gamma=gamma, eta=eta, bits=k,
                                   chunk_rows=9)
            parts.append(codes.dcc(B0[a:b], H, Q, eta))
        assert torch.equal(torch.cat(parts), whole)


def test_one_stream_and_switches():
    y, omega, F, _, B0, sim = _problem()
    H = codes.code_hessian(F, None)
    torch.testing.assert_close(H, F.double().T @ F.double())
    # η = 0: only Ω rows feel Q; they take sign(F), the rest keep their bits
    Q = codes.code_linear(slice(None), y, omega, F, None, sim, gamma=1.0, eta=0.0, bits=12)
    B = codes.dcc(B0, H, Q, eta=0.0)
    assert torch.equal(B[omega], torch.sign(F).to(torch.int8))
    rest = torch.ones(y.shape[0], dtype=torch.bool)
    rest[omega] = False
    assert torch.equal(B[rest], B0[rest])


# ------------------------------------------------------------------ Q by class (single-label)


def code_linear_reference(rows, y, omega, F, G, sim, gamma, eta, k):
    """Q as `code_linear` wrote it before the class form and the in-place writes, plainly:
    zeros, += 2ηk·(S_Ωᵀ·U) (single-label: the class rows gathered; multi-label: the affine of
    S01·U), then `index_add_` of 2γ·U at Ω."""
    U = F.double() if G is None else F.double() + G.double()
    y_rows, y_omega = y[rows], y[omega]
    Q = torch.zeros(y_rows.shape[0], U.shape[1], dtype=torch.float64)
    if eta > 0:
        col_sum = U.sum(0, keepdim=True)
        if obj.is_single_label(y_rows) and obj.is_single_label(y_omega):
            class_rows = (1.0 + sim.r) * (y_omega.double().T @ U) - sim.r * col_sum
            s_u = class_rows[y_rows.argmax(1)]
        else:
            s_u = (1.0 + sim.r) * (obj.similar01(y_rows, y_omega).double() @ U) - sim.r * col_sum
        Q += 2.0 * eta * k * s_u
    if gamma > 0:
        start, stop, _ = rows.indices(y.shape[0])
        inside = (omega >= start) & (omega < stop)
        Q.index_add_(0, omega[inside] - start, 2.0 * gamma * U[inside])
    return Q


def _tie_problem(n, m, k, c, seed, integer):
    """Single-label, few classes; integer=True: F, G in {-1, 0, 1} and r = 1, so Q and the
    couplings are integers and many z are exactly 0 (the tie rule decides them)."""
    y, omega, F, G, B0, sim = _problem(n=n, m=m, k=k, c=c, seed=seed)
    if integer:
        gen = torch.Generator().manual_seed(seed + 1)
        F = torch.randint(-1, 2, F.shape, generator=gen).float()
        G = torch.randint(-1, 2, G.shape, generator=gen).float()
        sim = obj.SoftSimilarity(1.0)
    B0[torch.rand(B0.shape, generator=torch.Generator().manual_seed(seed)) < 0.3] = 0
    return y, omega, F, G, B0, sim


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_class_Q_is_todays_Q_and_gives_the_same_B(integer, seed):
    n, k = 300, 16
    y, omega, F, G, B0, sim = _tie_problem(n, 60, k, 3, seed, integer)
    ties = 0
    for rows in (slice(None), slice(0, 128), slice(77, 300), slice(129, 200), slice(5, 5)):
        start, stop, _ = rows.indices(n)
        assert ((omega < start) | (omega >= stop)).any() or start == 0 and stop == n
        for gamma, eta in ((200.0, 1.0), (0.0, 1.0), (3.0, 0.0), (0.0, 0.0), (0.5, 2.5)):
            for G_ in (G, None):
                ref = code_linear_reference(rows, y, omega, F, G_, sim, gamma, eta, k)
                kw = dict(gamma=gamma, eta=eta, bits=k)
                Qc = codes.code_linear(rows, y, omega, F, G_, sim, by_class=True, **kw)
                assert isinstance(Qc, codes.ClassQ)
                assert Qc.shape == tuple(ref.shape)
                Q = codes.code_linear(rows, y, omega, F, G_, sim, **kw)
                assert Q.dtype == torch.float64 and torch.equal(Q, ref)
                assert torch.equal(Qc.dense(), ref)
                H = codes.code_hessian(F, G_)
                for sweeps in (1, 2):
                    want = codes._dcc_torch(B0[rows], H, ref, eta, sweeps, None)
                    for block in (1, 7, 128):
                        got = codes.dcc(B0[rows], H, Qc, eta, sweeps, block_rows=block)
                        assert torch.equal(got, want), (rows, gamma, eta, sweeps, block)
                Bd = B0[rows].double()
                ties += int((ref[:, 0] - 2 * eta * (Bd @ H[:, 0] - Bd[:, 0] * H[0, 0]) == 0).sum())
    if integer:  # the case is meant to exercise the tie rule
        assert ties > 50


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int64])
def test_class_Q_label_dtypes_and_repeated_omega(dtype):
    y, omega, F, G, B0, sim = _problem(n=90, m=20, k=8, c=4, seed=4)
    omega = torch.cat([omega, omega[:5]])  # repeated indices add up in Ω's order, as index_add_
    F, G = torch.cat([F, F[:5] * 0.3]), torch.cat([G, G[:5] * -2.0])
    y = y.to(dtype)
    for rows in (slice(None), slice(10, 70)):
        ref = code_linear_reference(rows, y, omega, F, G, sim, 50.0, 1.0, 8)
        Qc = codes.code_linear(rows, y, omega, F, G, sim, gamma=50.0, eta=1.0, bits=8,
                               by_class=True)
        assert isinstance(Qc, codes.ClassQ) and torch.equal(Qc.dense(), ref)
        H = codes.code_hessian(F, G)
        assert torch.equal(codes.dcc(B0[rows], H, Qc, 1.0), codes.dcc(B0[rows], H, ref, 1.0))


def test_rows_that_are_not_one_hot_take_the_torch_form():
    """Multi-label rows, or rows that sum to 1 without being 0/1 (the old path's test was the
    sum), at η > 0: the torch form, so Q is what it was; at η = 0 the labels do not matter."""
    y, omega, F, G, _, sim = _problem(n=80, m=20, k=6, c=3, multi=True, seed=5)
    half = torch.zeros(80, 3)
    half[torch.arange(80), torch.arange(80) % 3] = 1
    half[omega[0]] = torch.tensor([0.5, 0.5, 0.0])  # in Ω only
    half[-1] = torch.tensor([0.25, 0.0, 0.75])  # in the rows only
    for labels in (y, half):
        for rows in (slice(None), slice(3, 80)):
            ref = code_linear_reference(rows, labels, omega, F, G, sim, 9.0, 1.0, 6)
            Q = codes.code_linear(rows, labels, omega, F, G, sim, gamma=9.0, eta=1.0, bits=6,
                                  by_class=True)
            assert isinstance(Q, torch.Tensor) and torch.equal(Q, ref)
            for chunk in (1, 7):  # the chunks write Q in place
                assert torch.equal(codes.code_linear(rows, labels, omega, F, G, sim, gamma=9.0,
                                                     eta=1.0, bits=6, chunk_rows=chunk), ref)
            Qc = codes.code_linear(rows, labels, omega, F, G, sim, gamma=9.0, eta=0.0, bits=6,
                                   by_class=True)
            assert isinstance(Qc, codes.ClassQ)
            assert torch.equal(Qc.dense(), code_linear_reference(rows, labels, omega, F, G, sim,
                                                                 9.0, 0.0, 6))


def test_dcc_checks_shapes():
    y, omega, F, G, B0, sim = _problem(n=50, m=10, k=6)
    Qc = codes.code_linear(slice(0, 40), y, omega, F, G, sim, gamma=1.0, eta=1.0, bits=6,
                           by_class=True)
    with pytest.raises(ValueError, match="dcc"):
        codes.dcc(B0, codes.code_hessian(F, G), Qc, 1.0)
