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
