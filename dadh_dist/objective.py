"""The DADH objective (docs/design.md §2): similarity from labels and the three loss terms.

    J = α·L_pair + γ·L_quant + η·L_code

    L_pair  = Σ_{i∈M} Σ_{j∈Ω} [ log(1 + e^{Θ_ij}) − S01_ij·Θ_ij ],  Θ_ij = ½ F_i·G_j
    L_quant = ‖B_M − F_M‖²
    L_code  = ‖F_M·Bᵀ − k·S_M‖²                          (S_M: |M|×n, against all n codes)

written for one stream's mini-batch `F_M` against the other stream's detached buffer.

Normalisation (so that the learning rate depends on neither n nor m): L_quant and L_code are
divided by |M|·n, the ADSH convention, which keeps γ and η in the units the papers report and
makes the code step (which minimises the same unnormalised γ·L_quant + η·L_code) consistent with
the network step. L_pair is divided by its own pair count |M|·m (`pair_norm="pairs"`, default);
`pair_norm="shared"` divides it by |M|·n like the others.

The L_code term is never built as an |M|×n matrix. Expanding the square,

    ‖F_M·Bᵀ − k·S_M‖² = Σ_i F_i·(BᵀB)·F_iᵀ − 2k·F_i·(S_M·B)_i + k²·Σ_j S_ij²,

so with `BᵀB` (k×k), the rows `S_Ω·B` (m×k) and `Σ_j S_ij²` (m) computed once per outer
iteration (`CodeStats`), one step costs O(|M|·k²) whatever n is. For single-label data
`S_Ω·B` itself is O(m·c·k) through per-class sums of B; multi-label data is chunked over n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

# --------------------------------------------------------------------------------------------
# Similarity from labels


def similar01(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """S01_ij = 1 if y_i·y_j > 0 else 0.  labels: (a, c), (b, c) 0/1 → (a, b) float32."""
    return (labels_a.float() @ labels_b.float().T > 0).float()


def is_single_label(labels: torch.Tensor) -> bool:
    return bool((labels.sum(1) == 1).all())


@dataclass
class SoftSimilarity:
    """S = (1 + r)·S01 − r: similar pairs 1, dissimilar −r (docs/design.md §2).

    `r` = #similar / #dissimilar over the sampled m×n block (ADSH's balancing); `pm1`
    similarity is the same form with r = 1.
    """

    r: float

    def apply(self, s01: torch.Tensor) -> torch.Tensor:
        return (1.0 + self.r) * s01 - self.r


def balance_ratio(
    labels_omega: torch.Tensor, labels_db: torch.Tensor, chunk_rows: int = 8192
) -> float:
    """r = #similar / #dissimilar pairs between Ω (m) and the database (n)."""
    m, n = labels_omega.shape[0], labels_db.shape[0]
    if is_single_label(labels_omega) and is_single_label(labels_db):
        similar = float((labels_omega.double().sum(0) * labels_db.double().sum(0)).sum())
    else:
        similar = 0.0
        for start in range(0, n, chunk_rows):
            similar += float(similar01(labels_db[start : start + chunk_rows], labels_omega).sum())
    dissimilar = m * n - similar
    return similar / dissimilar if dissimilar > 0 else 1.0


def make_similarity(
    kind: str, labels_omega: torch.Tensor, labels_db: torch.Tensor, chunk_rows: int = 8192
) -> SoftSimilarity:
    if kind == "pm1":
        return SoftSimilarity(1.0)
    return SoftSimilarity(balance_ratio(labels_omega, labels_db, chunk_rows))


# --------------------------------------------------------------------------------------------
# S·B without an n×m matrix


def similarity_times(
    sim: SoftSimilarity,
    labels_rows: torch.Tensor,
    labels_cols: torch.Tensor,
    U: torch.Tensor,
    chunk_rows: int = 8192,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """S(rows, cols) · U  for S = (1+r)·S01 − r.  labels_rows (a, c), labels_cols (b, c), U (b, k).

    Single-label: S01 = Y_rows·Y_colsᵀ, so S01·U = Y_rows·(Y_colsᵀ·U) in O((a + b)·c·k).
    Multi-label: S01 is built in blocks of `chunk_rows` rows, so peak memory is chunk_rows × b.
    out: an (a, k) tensor of U's dtype to write the result into, in place (no a×k temporaries).
    """
    U = U.to(torch.float64) if U.dtype == torch.float64 else U.float()
    if out is None:
        out = torch.empty(labels_rows.shape[0], U.shape[1], dtype=U.dtype)
    if is_single_label(labels_rows) and is_single_label(labels_cols):
        # each row's S01·U is its class's sum of U: look it up instead of multiplying (c, k)
        return torch.index_select(class_similarity_rows(sim, labels_cols, U), 0,
                                  labels_rows.argmax(1), out=out)
    for start in range(0, labels_rows.shape[0], chunk_rows):
        block = similar01(labels_rows[start : start + chunk_rows], labels_cols).to(U.dtype)
        out[start : start + chunk_rows] = block @ U
    return out.mul_(1.0 + sim.r).sub_(sim.r * U.sum(0, keepdim=True))


def class_similarity_rows(
    sim: SoftSimilarity, labels_cols: torch.Tensor, U: torch.Tensor
) -> torch.Tensor:
    """(c, k): row y is S(row, cols)·U for every single-label row of class y.

    labels_cols: (b, c) single-label; U: (b, k) float32 or float64. S01·U of such a row is its
    class's sum of U, Y_colsᵀ·U (c, k), and 1ᵀU (1, k) is the same for every row.
    """
    class_sums = labels_cols.to(U.dtype).T @ U
    return (1.0 + sim.r) * class_sums - sim.r * U.sum(0, keepdim=True)


def similarity_sq_row_sums(
    sim: SoftSimilarity,
    labels_rows: torch.Tensor,
    labels_cols: torch.Tensor,
    chunk_rows: int = 8192,
) -> torch.Tensor:
    """Σ_j S_ij² per row: #similar·1 + #dissimilar·r².  → (a,) float64."""
    ones = torch.ones(labels_cols.shape[0], 1, dtype=torch.float64)
    count = SoftSimilarity(0.0)  # r = 0 turns S into S01
    n_similar = similarity_times(count, labels_rows, labels_cols, ones, chunk_rows)[:, 0]
    n_dissimilar = labels_cols.shape[0] - n_similar
    return n_similar + n_dissimilar * sim.r**2


@dataclass
class CodeStats:
    """What the network step needs of B for one outer iteration (B is fixed during it).

    BtB: (k, k) = BᵀB;  SB: (m, k) = S_Ω·B;  S_sq: (m,) = Σ_j S_Ωj²;  n: database size.
    """

    BtB: torch.Tensor
    SB: torch.Tensor
    S_sq: torch.Tensor
    n: int

    def to(self, device) -> CodeStats:
        return CodeStats(self.BtB.to(device), self.SB.to(device), self.S_sq.to(device), self.n)


def code_stats(
    B: torch.Tensor,
    sim: SoftSimilarity,
    labels_omega: torch.Tensor,
    labels_db: torch.Tensor,
    chunk_rows: int = 8192,
) -> CodeStats:
    """BᵀB, S_Ω·B and Σ_j S² for Ω.  B: (n, k) ±1 (or 0 before the first code step)."""
    Bf = B.float()
    return CodeStats(
        BtB=Bf.T @ Bf,
        SB=similarity_times(sim, labels_omega, labels_db, Bf, chunk_rows).float(),
        S_sq=similarity_sq_row_sums(sim, labels_omega, labels_db, chunk_rows).float(),
        n=B.shape[0],
    )


# --------------------------------------------------------------------------------------------
# Loss terms


def pair_loss(
    X_M: torch.Tensor, Y_buf: torch.Tensor, S01_M: torch.Tensor
) -> torch.Tensor:
    """L_pair summed over the |M|×m block:  Σ log(1 + e^Θ) − S01·Θ,  Θ = ½ X_M·Y_bufᵀ.

    X_M: (|M|, k) this stream's outputs (with gradient); Y_buf: (m, k) the other stream's
    detached buffer; S01_M: (|M|, m).  Θ is symmetric in the two streams, so the same function
    serves f (X=F, Y=G) and g (X=G, Y=F).
    """
    theta = 0.5 * X_M @ Y_buf.T
    return (nnf.softplus(theta) - S01_M * theta).sum()


def quant_loss(X_M: torch.Tensor, B_M: torch.Tensor) -> torch.Tensor:
    """L_quant = ‖B_M − X_M‖² (sum)."""
    return ((B_M - X_M) ** 2).sum()


def code_loss(X_M: torch.Tensor, stats: CodeStats, rows: torch.Tensor, bits: int) -> torch.Tensor:
    """L_code = ‖X_M·Bᵀ − k·S_M‖² (sum), factored; `rows` index Ω positions of the batch."""
    quad = ((X_M @ stats.BtB) * X_M).sum()
    cross = (X_M * stats.SB[rows]).sum()
    const = stats.S_sq[rows].sum()
    return quad - 2.0 * bits * cross + bits**2 * const


def code_loss_naive(
    X_M: torch.Tensor, B: torch.Tensor, S_M: torch.Tensor, bits: int
) -> torch.Tensor:
    """Reference form of L_code with the explicit |M|×n matrix (tests and benchmarks only)."""
    return ((X_M @ B.float().T - bits * S_M) ** 2).sum()


@dataclass(frozen=True)
class LossWeights:
    """The objective's effective weights: a switched-off term (objective.use_*) weighs 0. Used by
    the network step, the code step and the logged total alike."""

    alpha: float
    gamma: float
    eta: float
    pair_norm: str
    bits: int

    @classmethod
    def from_config(cls, o) -> LossWeights:
        """From an `ObjectiveConfig`: α, γ, η, or 0 where use_pair, use_quant, use_code is off."""
        return cls(alpha=o.alpha if o.use_pair else 0.0, gamma=o.gamma if o.use_quant else 0.0,
                   eta=o.eta if o.use_code else 0.0, pair_norm=o.pair_norm, bits=o.bits)


def stream_loss(
    X_M: torch.Tensor,
    other_buf: torch.Tensor | None,
    S01_M: torch.Tensor | None,
    B_M: torch.Tensor,
    stats: CodeStats,
    rows: torch.Tensor,
    w: LossWeights,
    batch_total: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One stream's weighted, normalised loss on its (local share of the) mini-batch.

    `batch_total` is the global mini-batch size |M|: a worker holding a share of the batch
    divides by the global size, so the sum over workers equals the one-process loss.
    Returns the total and the unweighted normalised terms (detached) for logging.
    """
    n, m = stats.n, (other_buf.shape[0] if other_buf is not None else 0)
    total = X_M.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    if w.alpha > 0 and other_buf is not None:
        denom = batch_total * (m if w.pair_norm == "pairs" else n)
        term = pair_loss(X_M, other_buf, S01_M) / denom
        total = total + w.alpha * term
        terms["pair"] = term.detach()
    if w.gamma > 0:
        term = quant_loss(X_M, B_M) / (batch_total * n)
        total = total + w.gamma * term
        terms["quant"] = term.detach()
    if w.eta > 0:
        term = code_loss(X_M, stats, rows, w.bits) / (batch_total * n)
        total = total + w.eta * term
        terms["code"] = term.detach()
    return total, terms
