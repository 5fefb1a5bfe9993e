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

import numpy as np
import torch

from dadh_dist import kernels
from dadh_dist.objective import SoftSimilarity, similarity_times

DCC_BLOCK_ROWS = 128  # rows a compiled DCC block holds: B and Q transposed, 2·64 KiB at k = 64


def code_hessian(F: torch.Tensor, G: torch.Tensor | None) -> torch.Tensor:
    """H = FᵀF + GᵀG (k×k, float64)."""
    F = F.double()
    H = F.T @ F
    if G is not None:
        G = G.double()
        H = H + G.T @ G
    return H


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
) -> torch.Tensor:
    """Rows `rows` of Q = 2ηk·S_Ωᵀ·(F+G) + 2γ·(F̄+Ḡ)  → (len(rows), k) float64.

    labels_db: (n, c); omega: (m,) database indices of Ω; F, G: (m, k).
    """
    U = F.double() if G is None else F.double() + G.double()
    labels_rows = labels_db[rows]
    Q = torch.zeros(labels_rows.shape[0], U.shape[1], dtype=torch.float64)
    if eta > 0:
        Q += 2.0 * eta * bits * similarity_times(sim, labels_rows, labels_db[omega], U, chunk_rows)
    if gamma > 0:
        start, stop, _ = rows.indices(labels_db.shape[0])
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
    Q: torch.Tensor,
    eta: float,
    sweeps: int = 1,
    on_column=None,
    *,
    block_rows: int = DCC_BLOCK_ROWS,
) -> torch.Tensor:
    """Discrete cyclic coordinate descent on a block of rows.  → new B block (int8, ±1).

    B: (r, k) previous codes (±1, or 0 before the first step); H: (k, k); Q: (r, k) float64.
    `on_column(c, B)` is called after each column update (tests check monotonicity with it).

    CPU tensors go to the compiled kernel (`kernels.dcc`: rows in blocks of `block_rows`, blocks
    in parallel on `kernels.default_threads()` threads); tensors on another device take the
    torch form below, on that device. Tests hold the kernel bit-identical to the torch form on
    CPU; a GPU's matmul may sum in another order, so a z within rounding of 0 could differ there.
    """
    if any(t.device.type != "cpu" for t in (B, H, Q)):
        return _dcc_torch(B, H, Q, eta, sweeps, on_column)
    out = B.to(torch.int8).contiguous().clone()
    Hn = H.double().contiguous().numpy()
    Qn = Q.double().contiguous().numpy()
    k = Hn.shape[0]
    with kernels.threads():
        if on_column is None:
            kernels.dcc(out.numpy(), Hn, Qn, 2.0 * eta, np.arange(k), sweeps, block_rows)
        else:  # one column a call, so the caller sees B after every update
            for _ in range(sweeps):
                for c in range(k):
                    kernels.dcc(out.numpy(), Hn, Qn, 2.0 * eta, np.array([c]), 1, block_rows)
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
