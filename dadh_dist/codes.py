"""The code step: B with the streams fixed, by discrete cyclic coordinate descent
(docs/design.md §2).

With F, G (m×k) fixed, γ·L_quant + η·L_code depends on B (n×k, ±1) only through

    min_B  η·tr(B·H·Bᵀ) − tr(Bᵀ·Q),
    H = FᵀF + GᵀG                                   (k×k)
    Q = 2ηk·S_Ωᵀ·(F + G) + 2γ·(F̄ + Ḡ)               (n×k; F̄, Ḡ: rows of Ω at their database
                                                      positions, zero elsewhere)

(‖B_Ω − F‖² contributes −2·tr(B_Ωᵀ·F) and ‖F·Bᵀ − kS‖² contributes tr(B·FᵀF·Bᵀ) − 2k·tr(Bᵀ·SᵀF)
up to constants, since every bit is ±1). Bit column c is solved exactly with the others fixed:

    B[:, c] = sign( Q[:, c] − 2η·B[:, ĉ]·H[ĉ, c] )          (ĉ = every column but c)

and a zero keeps the previous bit (+1 before the first step), so on a ±1 matrix no column
update can increase the objective. Every row of
the update depends on its own row of Q and on the shared H only, so any block of rows can be
solved on its own: workers split the rows and gather the blocks (see `loop.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dadh_dist import kernels
from dadh_dist.objective import SoftSimilarity, class_similarity_rows, similarity_times

DCC_BLOCK_ROWS = 128  # rows a compiled DCC block holds: B and Q transposed, 2·64 KiB at k = 64


def code_hessian(F: torch.Tensor, G: torch.Tensor | None) -> torch.Tensor:
    """H = FᵀF + GᵀG (k×k, float64)."""
    F = F.double()
    H = F.T @ F
    if G is not None:
        G = G.double()
        H = H + G.T @ G
    return H


@dataclass
class ClassQ:
    """Rows of Q without the (r, k) matrix, for single-label data (or any data at η = 0):

        Q[i] = class_rows[classes[i]] + Σ_{e: at[e] = i} add[e]

    class_rows: (c, k) float64, 2ηk·(S_Ωᵀ·U) of a row of each class; classes: (r,) int64;
    at: (e,) int64, ascending, the slice's local rows that are in Ω; add: (e, k) float64, their
    2γ·U. `dcc` builds each block's rows of Q from these (`kernels.dcc_classes`).
    """

    class_rows: torch.Tensor
    classes: torch.Tensor
    at: torch.Tensor
    add: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.classes.shape[0], self.class_rows.shape[1]

    def dense(self) -> torch.Tensor:
        """The (r, k) float64 Q itself, written in one pass (`kernels.class_linear`)."""
        with kernels.threads():
            return torch.from_numpy(kernels.class_linear(*self._arrays()))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(t.contiguous().numpy() for t in (self.class_rows, self.classes, self.at,
                                                      self.add))


def code_linear(
    rows: slice,
    labels_db: torch.Tensor,
    omega: torch.Tensor,
    F: torch.Tensor,
    G: torch.Tensor | None,
    sim: SoftSimilarity,
    *,
    gamma: float,
    eta: float,
    bits: int,
    chunk_rows: int = 8192,
    by_class: bool = False,
) -> torch.Tensor | ClassQ:
    """Rows `rows` of Q = 2ηk·S_Ωᵀ·(F+G) + 2γ·(F̄+Ḡ)  → (len(rows), k) float64.

    labels_db: (n, c); omega: (m,) database indices of Ω; F, G: (m, k). The same as
    `code_linear_rows` with the rows' and Ω's labels taken from labels_db.
    """
    start, stop, step = rows.indices(labels_db.shape[0])
    if step != 1:
        raise ValueError(f"code_linear: rows must be contiguous, got step {step}")
    return code_linear_rows(start, labels_db[start:stop], omega, labels_db[omega], F, G, sim,
                            gamma=gamma, eta=eta, bits=bits, chunk_rows=chunk_rows,
                            by_class=by_class)


def code_linear_rows(
    start: int,
    labels_rows: torch.Tensor,
    omega: torch.Tensor,
    labels_omega: torch.Tensor,
    F: torch.Tensor,
    G: torch.Tensor | None,
    sim: SoftSimilarity,
    *,
    gamma: float,
    eta: float,
    bits: int,
    chunk_rows: int = 8192,
    by_class: bool = False,
) -> torch.Tensor | ClassQ:
    """Rows [start, start + r) of Q from those rows' labels (r, c) and Ω's (m, c) alone: what a
    worker holding one block of the database needs (`blocks.solve`).  → (r, k) float64.

    On CPU, when the rows and Ω are single-label (one-hot) or η = 0, Q is written by class: the
    c class rows of S_Ωᵀ·U, a class index a row, the γ term added at the Ω rows, in one pass
    with no n×k temporaries; `by_class=True` returns that form unwritten (a `ClassQ`, which
    `dcc` reads block by block, so the code step never holds Q). Multi-label data and other
    devices take the torch form (`_code_linear_torch`), which gives the same values.
    """
    stop = start + labels_rows.shape[0]
    on_cpu = torch.get_default_device().type == "cpu" and all(
        t is None or t.device.type == "cpu" for t in (labels_rows, omega, F, G))
    Qc = _by_class(start, stop, labels_rows, labels_omega, omega, F, G, sim, gamma, eta, bits) \
        if on_cpu else None
    if Qc is None:
        return _code_linear_torch(start, labels_rows, labels_omega, omega, F, G, sim, gamma,
                                  eta, bits, chunk_rows)
    return Qc if by_class else Qc.dense()


def _by_class(start, stop, labels_rows, labels_omega, omega, F, G, sim, gamma, eta, bits,
              ) -> ClassQ | None:
    """`code_linear_rows` as a `ClassQ`, or None where some row or Ω row is not one-hot (η > 0).

    The same float operations as `_code_linear_torch`'s single-label path: the class rows
    scaled by 2ηk (as its gathered rows are), added to 0, then the 2γ·U rows in Ω's order.
    """
    U = F.double() if G is None else F.double() + G.double()
    r, k = stop - start, U.shape[1]
    if eta > 0:
        classes, bad = _one_hot_classes(labels_rows)
        if bad or _one_hot_classes(labels_omega)[1]:
            return None
        class_rows = 2.0 * eta * bits * class_similarity_rows(sim, labels_omega, U)
    else:  # Q has no S term: one zero class row serves every row, whatever the labels
        classes = torch.zeros(r, dtype=torch.int64)
        class_rows = torch.zeros(1, k, dtype=torch.float64)
    if gamma > 0:
        inside = (omega >= start) & (omega < stop)
        at, order = torch.sort(omega[inside].long() - start, stable=True)
        add = (2.0 * gamma * U[inside])[order]
    else:
        at, add = torch.zeros(0, dtype=torch.int64), torch.zeros(0, k, dtype=torch.float64)
    return ClassQ(class_rows.contiguous(), classes, at.contiguous(), add.contiguous())


def _one_hot_classes(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(classes (r,) int64, how many rows are not one-hot): `kernels.single_label_classes`."""
    if labels.dtype == torch.bool:
        labels = labels.to(torch.uint8)
    if labels.dtype in (torch.float16, torch.bfloat16):
        labels = labels.float()  # exact: 0 and 1 stay 0 and 1, other values stay other
    classes, bad = kernels.single_label_classes(labels.contiguous().numpy())
    return torch.from_numpy(classes), int(bad)


def _code_linear_torch(start, labels_rows, labels_omega, omega, F, G, sim, gamma, eta, bits,
                       chunk_rows):
    """`code_linear_rows` in torch on the tensors' device (multi-label data; CUDA tensors)."""
    U = F.double() if G is None else F.double() + G.double()
    Q = (torch.empty if eta > 0 else torch.zeros)(labels_rows.shape[0], U.shape[1],
                                                  dtype=torch.float64)
    if eta > 0:  # in place: Q's own memory and one chunk, no n×k temporaries (note 4 of §2)
        similarity_times(sim, labels_rows, labels_omega, U, chunk_rows, out=Q)
        Q.mul_(2.0 * eta * bits)
    if gamma > 0:
        stop = start + labels_rows.shape[0]
        inside = (omega >= start) & (omega < stop)
        Q.index_add_(0, omega[inside] - start, 2.0 * gamma * U[inside])
    return Q


def code_objective(B: torch.Tensor, H: torch.Tensor, Q: torch.Tensor, eta: float) -> float:
    """η·tr(B·H·Bᵀ) − tr(Bᵀ·Q) in float64."""
    Bd = B.double()
    return float(eta * ((Bd @ H) * Bd).sum() - (Bd * Q).sum())


def dcc(
    B: torch.Tensor,
    H: torch.Tensor,
    Q: torch.Tensor | ClassQ,
    eta: float,
    sweeps: int = 1,
    on_column=None,
    *,
    block_rows: int = DCC_BLOCK_ROWS,
) -> torch.Tensor:
    """Discrete cyclic coordinate descent on a block of rows.  → new B block (int8, ±1).

    B: (r, k) previous codes (±1, or 0 before the first step); H: (k, k); Q: (r, k) float64, or
    its `ClassQ` form. `on_column(c, B)` is called after each column update (tests check
    monotonicity with it).

    CPU tensors go to the compiled kernel (`kernels.dcc`, or `kernels.dcc_classes` for a
    `ClassQ`: rows in blocks of `block_rows`, blocks in parallel on `kernels.default_threads()`
    threads); tensors on another device take the torch form below, on that device. The kernels
    sum each coupling over j = 0..k-1 in order, so their bits do not depend on the blocks or
    threads; torch's matmul (CPU or GPU) sums in its own order, so the torch form can differ
    where a z is within rounding of 0. Tests hold the kernels to a plain loop in that order, and
    to the torch form where the sums are exact.
    """
    if any(t.device.type != "cpu" for t in (B, H)) or (
            isinstance(Q, torch.Tensor) and Q.device.type != "cpu"):
        Q = Q.dense().to(B.device) if isinstance(Q, ClassQ) else Q
        return _dcc_torch(B, H, Q, eta, sweeps, on_column)
    if tuple(Q.shape) != tuple(B.shape) or tuple(H.shape) != (B.shape[1],) * 2:
        raise ValueError(f"dcc: B {tuple(B.shape)}, H {tuple(H.shape)}, Q {tuple(Q.shape)}")
    out = B.to(torch.int8).contiguous().clone()
    Hn = H.double().contiguous().numpy()
    k = Hn.shape[0]
    if isinstance(Q, ClassQ):
        by_class = Q._arrays()

        def sweep(columns, count):
            kernels.dcc_classes(out.numpy(), Hn, *by_class, 2.0 * eta, columns, count, block_rows)
    else:
        Qn = Q.double().contiguous().numpy()

        def sweep(columns, count):
            kernels.dcc(out.numpy(), Hn, Qn, 2.0 * eta, columns, count, block_rows)
    with kernels.threads():
        if on_column is None:
            sweep(np.arange(k), sweeps)
        else:  # one column a call, so the caller sees B after every update
            for _ in range(sweeps):
                for c in range(k):
                    sweep(np.array([c]), 1)
                    on_column(c, out)
    return out


def _dcc_torch(B, H, Q, eta, sweeps, on_column) -> torch.Tensor:
    """`dcc` in torch, on the tensors' device (the form for CUDA tensors)."""
    B = B.to(torch.int8).clone()
    Bd = B.double()
    for _ in range(sweeps):
        for c in range(H.shape[0]):
            # B[:, ĉ]·H[ĉ, c] = B·H[:, c] − B[:, c]·H[c, c]
            coupling = Bd @ H[:, c] - Bd[:, c] * H[c, c]
            z = Q[:, c] - 2.0 * eta * coupling
            new = torch.sign(z)
            # tie rule: a zero keeps the previous bit (+1 where there is none yet)
            new = torch.where(z == 0, torch.where(Bd[:, c] == 0, 1.0, Bd[:, c]), new)
            Bd[:, c] = new
            B[:, c] = new.to(torch.int8)
            if on_column is not None:
                on_column(c, B)
    return B
