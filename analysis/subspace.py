"""Normalised subspace similarity φ of LoRA §7.2 (eq. 4) and Appendix G, on plain arrays.

φ(A1, A2, i, j) = ||U1[:, :i]ᵀ U2[:, :j]||_F² / min(i, j) ∈ [0, 1], where U are the right singular
vectors of the LoRA factor A (rows of A = rank, so U = Vhᵀ: directions in the input space). Footnote 7's
variant uses B and its left singular vectors (`side="left"`). Figure 8 compares W's own top right
singular directions with A's (`weight_similarity`). Every (i, j) comes from one product M = U1ᵀU2:
φ = cumsum_i cumsum_j (M²) / min(i, j).

For independent Haar-random bases of dims i and j in R^d, E||U1ᵀU2||_F² = i·j/d exactly, so the chance
level is E φ = max(i, j)/d (`chance_level`).
"""

from __future__ import annotations

import numpy as np

from analysis.linalg import TopSingular, as_float64, thin_svd

__all__ = [
    "right_singular_basis",
    "left_singular_basis",
    "similarity_from_bases",
    "similarity",
    "weight_similarity",
    "random_gaussian_similarity",
    "principal_cosines",
    "chance_level",
]


def right_singular_basis(A, k: int | None = None) -> np.ndarray:
    """Right singular vectors of A (r, in) as columns, (in, min(r, in)), by descending singular value."""
    A = as_float64(A, name="A")
    if A.ndim != 2:
        raise ValueError(f"A must be 2-D (rank, in_features), got shape {A.shape}")
    _, _, Vh = thin_svd(A)
    return Vh[:k].T if k is not None else Vh.T


def left_singular_basis(B, k: int | None = None) -> np.ndarray:
    """Left singular vectors of B (out, r) as columns, (out, min(out, r)), by descending singular value."""
    B = as_float64(B, name="B")
    if B.ndim != 2:
        raise ValueError(f"B must be 2-D (out_features, rank), got shape {B.shape}")
    U, _, _ = thin_svd(B)
    return U[:, :k] if k is not None else U


def similarity_from_bases(U1: np.ndarray, U2: np.ndarray) -> np.ndarray:
    """φ for column-orthonormal bases U1 (d, p), U2 (d, q): a (p, q) matrix, phi[i-1, j-1] = φ(i, j)."""
    U1 = as_float64(U1, name="U1")
    U2 = as_float64(U2, name="U2")
    if U1.ndim != 2 or U2.ndim != 2 or U1.shape[0] != U2.shape[0]:
        raise ValueError(
            f"bases must be (d, p) and (d, q) with the same d, got {U1.shape} and {U2.shape}; "
            "compare factors of the same module (same in_features for A, out_features for B)"
        )
    M = U1.T @ U2
    S = np.cumsum(np.cumsum(M * M, axis=0), axis=1)
    i = np.arange(1, M.shape[0] + 1)[:, None]
    j = np.arange(1, M.shape[1] + 1)[None, :]
    return S / np.minimum(i, j)


def similarity(A1, A2, *, side: str = "right") -> np.ndarray:
    """φ(A1, A2, i, j) for all i ≤ rank(A1), j ≤ rank(A2) (LoRA eq. 4).

    side="right" (default, the paper's choice): A1, A2 are LoRA A factors (r, in); right singular vectors.
    side="left": A1, A2 are LoRA B factors (out, r); left singular vectors (footnote 7).
    """
    if side == "right":
        return similarity_from_bases(right_singular_basis(A1), right_singular_basis(A2))
    if side == "left":
        return similarity_from_bases(left_singular_basis(A1), left_singular_basis(A2))
    raise ValueError(f"side={side!r}; use 'right' for A factors (r, in) or 'left' for B factors (out, r)")


def weight_similarity(W, A, *, top: int | None = None, side: str = "right") -> np.ndarray:
    """Figure 8: φ(W, A, i, j) between W's top-i singular directions and A's top-j, i ≤ `top`.

    W may be a (out, in) weight or a `TopSingular` (reused across calls). With side="right" (default)
    W's right singular vectors (input space) meet A's right singular vectors; with side="left", W's left
    singular vectors meet B's left singular vectors. `top` defaults to 10% of the dimension (the paper
    plots up to the top-10% of W's directions).
    """
    ts = W if isinstance(W, TopSingular) else TopSingular(W)
    d = ts.shape[1] if side == "right" else ts.shape[0]
    top = top or max(1, int(np.ceil(0.1 * d)))
    if side == "right":
        return similarity_from_bases(ts.right(top), right_singular_basis(A))
    if side == "left":
        return similarity_from_bases(ts.left(top), left_singular_basis(A))
    raise ValueError(f"side={side!r}; use 'right' (A, input space) or 'left' (B, output space)")


def random_gaussian_similarity(shape: tuple[int, int], shape2: tuple[int, int] | None = None, *, seed: int = 0):
    """Figure 4's right panel: φ between two i.i.d. Gaussian matrices of A's shape (rank, in)."""
    rng = np.random.default_rng(seed)
    G1 = rng.standard_normal(shape)
    G2 = rng.standard_normal(shape2 or shape)
    return similarity(G1, G2)


def principal_cosines(U1: np.ndarray, U2: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between span(U1) and span(U2) (orthonormal columns)."""
    return np.clip(thin_svd(as_float64(U1).T @ as_float64(U2))[1], 0.0, 1.0)


def chance_level(p: int, q: int, d: int) -> np.ndarray:
    """E φ(i, j) = max(i, j)/d for independent uniformly random bases, as a (p, q) matrix."""
    i = np.arange(1, p + 1)[:, None]
    j = np.arange(1, q + 1)[None, :]
    return np.maximum(i, j) / d
