"""The compiled kernels against plain references: bit-identical B, exact histograms and top-k.

The metric kernels (`retrieval.*`) are checked against brute-force references in
test_retrieval.py; here: the DCC kernels behind `codes.dcc` (Q given, or built by class), the
histogram kernel, and the top-k kernel behind `codesfile.topk`.
"""

import numpy as np
import pytest
import torch

from dadh_dist import codes, codesfile, kernels, retrieval

# ------------------------------------------------------------------------------------- DCC


def dcc_reference(B, H, Q, eta, sweeps=1):
    """The torch DCC of before the kernel, written plainly: column by column over all rows."""
    B = B.to(torch.int8).clone()
    Bd = B.double()
    for _ in range(sweeps):
        for c in range(H.shape[0]):
            coupling = Bd @ H[:, c] - Bd[:, c] * H[c, c]
            z = Q[:, c] - 2.0 * eta * coupling
            new = torch.where(z == 0, torch.where(Bd[:, c] == 0, 1.0, Bd[:, c]), torch.sign(z))
            Bd[:, c] = new
            B[:, c] = new.to(torch.int8)
    return B


def random_case(r, k, seed, integer=False, zeros=0.3):
    """B with ±1 and zeros, H symmetric, Q. integer=True: small integers, so many z are exactly 0
    in any summation order (the tie rule decides them)."""
    gen = torch.Generator().manual_seed(seed)
    B = torch.where(torch.rand(r, k, generator=gen) < 0.5, -1, 1).to(torch.int8)
    B[torch.rand(r, k, generator=gen) < zeros] = 0  # bits not set yet
    if integer:
        A = torch.randint(-2, 3, (k, k), generator=gen).double()
        H = A + A.T
        Q = torch.randint(-3, 4, (r, k), generator=gen).double() * 2
    else:
        F = torch.tanh(torch.randn(3 * k, k, generator=gen))
        H = codes.code_hessian(F, torch.tanh(torch.randn(3 * k, k, generator=gen)))
        Q = torch.randn(r, k, generator=gen, dtype=torch.float64) * 5 * k
    return B, H, Q


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("k", [1, 7, 32, 64, 70])
def test_dcc_kernel_is_bit_identical_to_reference(integer, k):
    B, H, Q = random_case(301, k, seed=k + 100 * integer, integer=integer)
    for eta in (0.0, 0.5, 1.0):
        for sweeps in (1, 3):
            ref = dcc_reference(B, H, Q, eta, sweeps)
            for block in (1, 5, 128, 1000):
                out = codes.dcc(B, H, Q, eta, sweeps, block_rows=block)
                assert out.dtype == torch.int8
                assert torch.equal(out, ref), (eta, sweeps, block)
    if integer:  # the case is meant to exercise the tie rule
        Bd = B.double()
        z0 = Q[:, 0] - 2.0 * (Bd @ H[:, 0] - Bd[:, 0] * H[0, 0])
        assert (z0 == 0).sum() > 5


def dcc_in_order(B, H, Q, eta, sweeps=1, order=None):
    """DCC as a plain loop whose couplings add j = 0..k-1 in order (`order`: another order)."""
    B = B.double().numpy().copy()
    H, Q = H.numpy(), Q.numpy()
    k = H.shape[0]
    for _ in range(sweeps):
        for c in range(k):
            acc = np.zeros(B.shape[0])
            for j in range(k) if order is None else order:
                acc = acc + B[:, j] * H[j, c]
            z = Q[:, c] - 2.0 * eta * (acc - B[:, c] * H[c, c])
            B[:, c] = np.where(z > 0, 1.0, np.where(z < 0, -1.0, np.where(B[:, c] == 0, 1.0,
                                                                           B[:, c])))
    return torch.from_numpy(B.astype(np.int8))


def test_dcc_kernel_adds_the_coupling_in_column_order():
    """H of wide dynamic range and Q at the coupling itself: every z is within rounding of 0, so
    the order of the sum decides bits (torch's matmul has an order of its own). The kernel's
    bits are the in-order loop's for any block size and thread count."""
    gen = torch.Generator().manual_seed(0)
    r, k = 200, 24
    B = torch.where(torch.rand(r, k, generator=gen) < 0.5, -1, 1).to(torch.int8)
    H = torch.randn(k, k, generator=gen, dtype=torch.float64) * torch.exp(
        6 * torch.randn(k, k, generator=gen, dtype=torch.float64))
    Bd = B.double()
    Q = 2.0 * (Bd @ H - Bd * torch.diagonal(H))  # z = 0 up to rounding, column by column
    want = dcc_in_order(B, H, Q, 1.0, 2)
    assert not torch.equal(want, dcc_in_order(B, H, Q, 1.0, 2, order=range(k - 1, -1, -1)))
    for block, count in ((1, 1), (7, 2), (128, 2)):
        with kernels.threads(count):
            out = B.numpy().copy()
            kernels.dcc(out, H.numpy(), Q.numpy(), 2.0, np.arange(k), 2, block)
        np.testing.assert_array_equal(out, want.numpy(), err_msg=str(block))


def test_dcc_from_zero_codes_and_tie_rule():
    """B = 0 (the first outer iteration) and Q = 0, H diagonal: every z is 0."""
    B, H, Q = random_case(50, 16, seed=3)
    zero = torch.zeros_like(B)
    assert torch.equal(codes.dcc(zero, H, Q, 1.0), dcc_reference(zero, H, Q, 1.0))
    H = torch.eye(2, dtype=torch.float64)
    Q = torch.zeros(3, 2, dtype=torch.float64)
    B = torch.tensor([[1, -1], [-1, -1], [0, 0]], dtype=torch.int8)
    assert codes.dcc(B, H, Q, 1.0).tolist() == [[1, -1], [-1, -1], [1, 1]]


def test_dcc_torch_form_equals_reference():
    """The form kept for CUDA tensors, run on CPU tensors here."""
    B, H, Q = random_case(120, 24, seed=5)
    assert torch.equal(codes._dcc_torch(B, H, Q, 1.0, 2, None), dcc_reference(B, H, Q, 1.0, 2))


def test_dcc_threads_and_callback_do_not_change_bits():
    B, H, Q = random_case(1000, 32, seed=7)
    ref = dcc_reference(B, H, Q, 1.0, 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernels.default_threads() == 1
        assert torch.equal(codes.dcc(B, H, Q, 1.0, 2, block_rows=64), ref)
    finally:
        torch.set_num_threads(before)
    seen = []
    out = codes.dcc(B, H, Q, 1.0, 2, on_column=lambda c, Bc: seen.append((c, Bc.clone())))
    assert torch.equal(out, ref) and [c for c, _ in seen] == list(range(32)) * 2
    assert torch.equal(seen[-1][1], ref)


def test_dcc_accepts_float_and_non_contiguous_inputs():
    B, H, Q = random_case(40, 8, seed=9)
    ref = dcc_reference(B, H, Q, 0.7)
    Qt = Q.T.contiguous().T  # same values, column-major
    assert not Qt.is_contiguous()
    assert torch.equal(codes.dcc(B.float(), H, Qt, 0.7), ref)
    assert codes.dcc(B[:0], H, Q[:0], 0.7).shape == (0, 8)


def class_case(r, k, c, e, seed):
    """class rows, a class a row, e additions at ascending rows (repeats, both ends) in [0, r)."""
    rng = np.random.default_rng(seed)
    class_rows = rng.integers(-3, 4, (c, k)).astype(np.float64) * 2  # integers: ties in z
    class_rows[0, 0] = -0.0
    classes = rng.integers(0, c, r).astype(np.int64)
    at = np.sort(np.concatenate([rng.integers(0, r, e), [0, r - 1, r - 1]])).astype(np.int64)
    scale = rng.choice([1.0, 0.3], at.size)[:, None]  # some rows' sums round
    add = rng.integers(-2, 3, (at.size, k)).astype(np.float64) * scale
    return class_rows, classes, at, add


def class_linear_reference(class_rows, classes, at, add):
    """Q plainly: zeros, += the gathered class rows, then the additions one by one in order."""
    Q = np.zeros((classes.size, class_rows.shape[1]))
    Q += class_rows[classes]
    for e in range(at.size):
        Q[at[e]] += add[e]
    return Q


@pytest.mark.parametrize("k", [1, 7, 64])
def test_class_linear_and_dcc_classes_match_references(k):
    class_rows, classes, at, add = class_case(301, k, 3, 40, seed=k)
    Q = class_linear_reference(class_rows, classes, at, add)
    with kernels.threads(2):
        np.testing.assert_array_equal(kernels.class_linear(class_rows, classes, at, add), Q)
    B, H, _ = random_case(301, k, seed=k, integer=True)
    Qt = torch.from_numpy(Q)
    for eta in (0.0, 0.5, 1.0):
        for sweeps in (1, 3):
            ref = dcc_reference(B, H, Qt, eta, sweeps)
            for block in (1, 5, 128, 1000):
                out = B.numpy().copy()
                with kernels.threads(2):
                    kernels.dcc_classes(out, H.numpy(), class_rows, classes, at, add, 2.0 * eta,
                                        np.arange(k), sweeps, block)
                np.testing.assert_array_equal(out, ref.numpy(), err_msg=str((eta, sweeps, block)))
    Bd = B.double()
    assert (Qt[:, 0] - 2.0 * (Bd @ H[:, 0] - Bd[:, 0] * H[0, 0]) == 0).sum() > 5  # ties
    none = np.zeros(0, np.int64), np.zeros((0, k))
    np.testing.assert_array_equal(kernels.class_linear(class_rows, classes, *none),
                                  class_rows[classes])


def single_label_reference(labels):
    """Rows that are 0/1 with exactly one 1, and the argmax of each (`is_single_label`'s test
    and `similarity_times`' lookup, restricted to 0/1 rows)."""
    one_hot = ((labels == 0) | (labels == 1)).all(1) & ((labels == 1).sum(1) == 1)
    return labels.argmax(1), one_hot


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32, np.float64])
def test_single_label_classes_matches_argmax(dtype):
    rng = np.random.default_rng(0)
    labels = np.eye(6, dtype=dtype)[rng.integers(0, 6, 200)]
    classes, bad = kernels.single_label_classes(labels)
    ref, one_hot = single_label_reference(labels)
    assert bad == 0 and one_hot.all()
    np.testing.assert_array_equal(classes, ref)
    labels[3] = 0  # no label
    labels[10, :2] = 1  # two labels
    labels[20, 5] = 2 if dtype in (np.uint8, np.int64) else 0.5  # sum != 1, or 0/1 broken
    classes, bad = kernels.single_label_classes(labels)
    ref, one_hot = single_label_reference(labels)
    assert bad == int((~one_hot).sum()) == 3
    np.testing.assert_array_equal(classes[one_hot], ref[one_hot])
    assert kernels.single_label_classes(labels[:0])[1] == 0


# ------------------------------------------------------------------------------- histograms


def random_codes(rng, nq, n, k, p_one=0.5):
    """±1 codes; p_one far from 0.5, or few bits, make distances tie a lot."""
    q = np.where(rng.random((nq, k)) < p_one, 1, -1).astype(np.int8)
    db = np.where(rng.random((n, k)) < p_one, 1, -1).astype(np.int8)
    return q, db


@pytest.mark.parametrize("k", [3, 16, 64, 65, 130, 200])
@pytest.mark.parametrize("single", [True, False])
def test_histograms_match_bincount(k, single):
    rng = np.random.default_rng(k)
    q, db = random_codes(rng, 13, 400, k, p_one=0.8)
    if single:
        ql = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 13)]
        dl = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 400)]
    else:
        ql = (rng.random((13, 70)) < 0.05).astype(np.uint8)
        dl = (rng.random((400, 70)) < 0.05).astype(np.uint8)
    p = retrieval._Problem(q, db, ql, dl)
    assert p.single == single
    counts, hits = p.histograms(threads=2)
    d = (k - q.astype(np.int64) @ db.T.astype(np.int64)) // 2
    rel = ql.astype(np.int64) @ dl.T.astype(np.int64) > 0
    for i in range(len(q)):
        np.testing.assert_array_equal(counts[i], np.bincount(d[i], minlength=k + 1))
        np.testing.assert_array_equal(hits[i], np.bincount(d[i][rel[i]], minlength=k + 1))


# ------------------------------------------------------------------------------------ top-k


def topk_reference(q, db, k):
    d = (q.shape[1] - q.astype(np.int64) @ db.T.astype(np.int64)) // 2
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, 1)


@pytest.mark.parametrize("bits", [2, 8, 13, 64, 100, 300])
def test_topk_kernel_is_the_stable_ranking(bits):
    rng = np.random.default_rng(bits)
    q, db = random_codes(rng, 17, 500, bits, p_one=0.7)
    for k in (1, 2, 10, 77, 499, 500, 900):
        ids, dist = codesfile.topk(retrieval.pack_codes(q), retrieval.pack_codes(db), k, bits)
        ref_ids, ref_dist = topk_reference(q, db, min(k, 500))
        assert ids.dtype == np.int64 and dist.dtype == np.int32
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(dist, ref_dist)


def test_topk_all_equal_distances_and_threads():
    q = np.ones((5, 16), np.int8)
    db = np.ones((50, 16), np.int8)  # every distance 0: the ranking is database order
    ids, dist = codesfile.topk(retrieval.pack_codes(q), retrieval.pack_codes(db), 7, 16)
    np.testing.assert_array_equal(ids, np.tile(np.arange(7), (5, 1)))
    assert (dist == 0).all()
    rng = np.random.default_rng(1)
    q, db = random_codes(rng, 9, 300, 24, p_one=0.9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = codesfile.topk(retrieval.pack_codes(q), retrieval.pack_codes(db), 20, 24)
    finally:
        torch.set_num_threads(before)
    many = codesfile.topk(retrieval.pack_codes(q), retrieval.pack_codes(db), 20, 24)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------- threading

CONCURRENT = """
import threading
import numpy as np
import torch
from dadh_dist import codes, codesfile, retrieval
rng = np.random.default_rng(0)
q = np.sign(rng.standard_normal((16, 64)))
db = np.sign(rng.standard_normal((20000, 64)))
y = np.eye(3)[rng.integers(0, 3, 20016)]
B = torch.zeros(5000, 64, dtype=torch.int8)
H = torch.eye(64, dtype=torch.float64)
Q = torch.from_numpy(rng.standard_normal((5000, 64)))
Qc = codes.ClassQ(torch.from_numpy(rng.standard_normal((3, 64))),
                  torch.from_numpy(rng.integers(0, 3, 5000)), torch.arange(0, 5000, 7),
                  torch.from_numpy(rng.standard_normal((715, 64))))
calls = [lambda: codesfile.topk(retrieval.pack_codes(q), retrieval.pack_codes(db), 10, 64)[0],
         lambda: retrieval.average_precision(q, db, y[:16], y[16:]),
         lambda: codes.dcc(B, H, Q, 1.0).numpy(),
         lambda: codes.dcc(B, H, Qc, 1.0).numpy(), lambda: Qc.dense().numpy()]
first = [f() for f in calls]
bad = []
def work(u):
    for _ in range(15):
        for f, ref in zip(calls, first):
            if not np.array_equal(f(), ref):
                bad.append(u)
threads = [threading.Thread(target=work, args=(u,)) for u in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
print("bad", len(bad))
"""


def test_kernels_called_from_several_python_threads():
    """numba's workqueue layer aborts the process on concurrent launches; `kernels.threads`
    serialises them. Run in a child so that a regression kills the child, not the test run."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CONCURRENT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["bad", "0"]
