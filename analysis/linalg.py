"""Float64 linear-algebra building blocks shared by the analyses.

Owns: conversion of tensors/arrays to float64 numpy, thin SVDs, Haar-random orthonormal frames, and
`TopSingular`, the cached top-k singular triplets of one weight matrix (exact SVD for small matrices,
block Golub-Kahan-Lanczos with a residual-based convergence check for large ones).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

__all__ = [
    "as_float64",
    "thin_svd",
    "matmul64",
    "haar_frame",
    "thin_qr",
    "TopSingular",
    "block_lanczos_svd",
    "LanczosInfo",
]


def as_float64(x, *, name: str = "array") -> np.ndarray:
    """`x` (numpy array, torch tensor, nested list) as a C-contiguous float64 numpy array."""
    if hasattr(x, "detach"):  # torch tensor; no torch import needed here
        x = x.detach().to("cpu")
        if x.dtype.is_complex:
            raise TypeError(f"{name} is complex ({x.dtype}); the analyses expect real weights")
        x = x.double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} has {bad} non-finite entries; check the run's weights (NaN/inf after training?)")
    return np.ascontiguousarray(arr)


def matmul64(W: np.ndarray, X: np.ndarray, *, rows: int = 128) -> np.ndarray:
    """W @ X in float64 for a float32 (or float64) W, converting W a few rows at a time.

    The exact float64 product (float32 values are exact in float64), without a float64 copy of W: each
    pass streams the 4-byte original once instead of writing and re-reading an 8-byte copy."""
    X = np.asarray(X, dtype=np.float64)
    if W.dtype == np.float64:
        return W @ X
    out = np.empty((W.shape[0], X.shape[1]))
    for i in range(0, W.shape[0], rows):
        out[i : i + rows] = W[i : i + rows].astype(np.float64) @ X
    return out


def thin_svd(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD, singular values descending. scipy's gesdd (numpy's is far slower on this machine)."""
    try:
        return sla.svd(M, full_matrices=False, check_finite=False, lapack_driver="gesdd")
    except np.linalg.LinAlgError:  # gesdd can fail to converge on rare inputs; gesvd is the robust fallback
        return sla.svd(M, full_matrices=False, check_finite=False, lapack_driver="gesvd")


def haar_frame(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """An n×k matrix with orthonormal columns, uniformly (Haar) distributed on the Stiefel manifold.

    Q of a Gaussian matrix's QR with R's diagonal positive (Mezzadri 2007). This is the
    distribution of the top-k left (or right) singular vectors of an i.i.d. Gaussian n×n matrix.
    """
    if k > n:
        raise ValueError(f"cannot draw {k} orthonormal vectors in dimension {n}; use k <= {n}")
    return thin_qr(rng.standard_normal((n, k)))[0]


@dataclass(frozen=True)
class LanczosInfo:
    """How a truncated SVD was obtained and how far it can be trusted."""

    method: str  # "full" or "lanczos"
    k: int  # number of triplets returned
    subspace_dim: int  # Krylov dimension used (min(shape) for "full")
    matmuls: int  # products with W or Wᵀ (each with a block of vectors)
    value_change: float  # max_i |s_i(last step) - s_i(step before)| / s_1: the stop test for "values"
    max_rel_residual: float  # max_i ||W v_i - s_i u_i|| / s_1 of the returned (float64-polished) triplets
    converged: bool
    iteration_dtype: str = "float64"


def thin_qr(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thin QR of a tall block, R with a positive diagonal (so Q is unique), Q in Y's dtype, R float64.

    CholeskyQR2 in float64 (two b×b Choleskys and GEMMs: much faster than Householder on tall-skinny
    blocks here), accepted only if Q comes out orthonormal to 1e-12; Householder otherwise (a block too
    ill-conditioned for Cholesky, e.g. rank-deficient LoRA factors)."""
    Y64 = Y.astype(np.float64, copy=False)
    b = Y.shape[1]
    eye = np.eye(b)
    try:
        R1 = sla.cholesky(Y64.T @ Y64, lower=False, check_finite=False)
        Q = Y64 @ sla.solve_triangular(R1, eye, lower=False, check_finite=False)  # b×b inverse, then one GEMM
        R2 = sla.cholesky(Q.T @ Q, lower=False, check_finite=False)
        Q = Q @ sla.solve_triangular(R2, eye, lower=False, check_finite=False)
        R = R2 @ R1
        if not (np.all(np.isfinite(Q)) and np.abs(Q.T @ Q - eye).max() < 1e-12):
            raise np.linalg.LinAlgError("CholeskyQR2 lost orthogonality")
    except np.linalg.LinAlgError:
        Q, R = np.linalg.qr(Y64)
        sign = np.where(np.diag(R) < 0, -1.0, 1.0)
        Q, R = Q * sign, sign[:, None] * R
    return Q.astype(Y.dtype, copy=False), R


def block_lanczos_svd(
    W: np.ndarray,
    k: int,
    *,
    block: int | None = None,
    tol: float = 1e-4,
    criterion: str = "values",
    dtype=np.float32,
    max_dim: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, LanczosInfo]:
    """Top-k singular triplets of W by block Golub-Kahan-Lanczos bidiagonalisation, polished in float64.

    The Krylov bases of both sides are built with full reorthogonalisation in `dtype` (float32 by
    default: twice the GEMM speed, and the bases only need to be good to ~1e-6); the projected matrix
    Qᵀ W P is block upper bidiagonal and assembled from the QR factors, so a step costs two products of
    W with `block` vectors. Stop tests, checked every step:

    * ``criterion="values"`` (Table 7 needs singular values only): the top-k Ritz values moved by at most
      ``tol · s_1`` over the last ≥ 32 Krylov dimensions. Ritz values rise monotonically to the true
      values and converge superlinearly, so the remaining error is below that change;
    * ``criterion="kyfan"`` (Table 7's own row, sqrt(Σ_{i≤k} σ_i²)): that sum rose by less than a
      relative `tol` over the last ≥ 32 dimensions (on a d=4096 power-law spectrum the remaining error
      is ~10× below the last rise: tol=1e-4 leaves ≈ 5e-6);
    * ``criterion="residual"`` (singular vectors, e.g. Figure 8): max_i ||Wᵀu_i − s_i v_i|| ≤ tol · s_1.

    The returned triplets are then recomputed in float64: the top-k Ritz vectors are orthonormalised,
    M = Uᵀ W V is formed in float64 and its SVD rotates them, so s_i = σ_i(UᵀWV) exactly (lower bounds of
    W's singular values, by interlacing) and sqrt(Σ_{i≤r} s_i²) = ||U_rᵀ W V_r||_F to float64 precision.
    Stops unconverged (warning, ``info.converged=False``) when the subspace would pass `max_dim`.
    W may be float32 (a checkpoint tensor): the iteration then uses it as is and the polish multiplies in
    float64 a few rows at a time (`matmul64`).
    """
    if criterion not in {"kyfan", "values", "residual"}:
        raise ValueError(f"criterion={criterion!r}; use 'kyfan' (sqrt of the sum of the top-k σ²), 'values' "
                         "(each singular value) or 'residual' (vectors too)")
    m, n = W.shape
    p = min(m, n)
    if not 1 <= k <= p:
        raise ValueError(f"k={k} singular triplets requested from a {m}×{n} matrix; use 1 <= k <= {p}")
    # smaller blocks reach a given accuracy with a smaller Krylov space (higher polynomial degree per
    # dimension: k=64 on a d=4096 power-law spectrum needs dim ≈ 256 with b=16, 320 with b=32, 450 with
    # b=64), but each step streams W from memory once per side; b = k/2 was cheapest in CPU time here
    b = min(p, block or max(16, k // 2))
    lag = max(1, -(-32 // b))  # compare Ritz values >= 32 dimensions apart, so the test does not shrink with b
    max_dim = min(p, max_dim or p)
    Wi = W.astype(dtype, copy=False)
    rng = np.random.default_rng(seed)
    steps = max_dim // b
    # contiguous bases: one GEMM pair per reorthogonalisation instead of one per block
    Pb = np.empty((n, (steps + 1) * b), dtype=dtype)
    Qb = np.empty((m, steps * b), dtype=dtype)
    M = np.zeros((steps * b, steps * b))  # Qᵀ W P, block upper bidiagonal
    Pb[:, :b], _ = thin_qr(rng.standard_normal((n, b)).astype(dtype))
    matmuls = 0
    history: list[np.ndarray] = []
    change = rel = np.inf
    converged = False
    t = 0
    while True:
        lo, hi = t * b, (t + 1) * b
        Y = Wi @ Pb[:, lo:hi]
        matmuls += 1
        if t:
            Y -= Qb[:, lo - b : lo] @ M[lo - b : lo, lo:hi].astype(dtype)
            for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
                Y -= Qb[:, :lo] @ (Qb[:, :lo].T @ Y)
        Qb[:, lo:hi], R = thin_qr(Y)
        M[lo:hi, lo:hi] = R
        Z = Wi.T @ Qb[:, lo:hi]
        matmuls += 1
        Z -= Pb[:, lo:hi] @ R.T.astype(dtype)
        for _ in range(2):
            Z -= Pb[:, :hi] @ (Pb[:, :hi].T @ Z)
        Pb[:, hi : hi + b], S = thin_qr(Z)
        t += 1
        dim = hi
        if hi + b <= M.shape[1]:
            M[lo:hi, hi : hi + b] = S.T  # enters the projected matrix with the next block
        Md = M[:dim, :dim]
        kk = min(k, dim)
        if dim + lag * b < 2 * k and t < steps:  # too early to have converged: skip the small eigenproblem
            continue
        if criterion == "residual":
            X, sig, Yh = thin_svd(Md)
            res = np.linalg.norm(S @ X[-b:, :kk], axis=0)
            rel = float(res.max() / sig[0]) if sig[0] > 0 else 0.0
        else:  # values only: top-k eigenvalues of MᵀM (several times cheaper than an SVD of M, and the
            # squaring costs nothing at the top of the spectrum, where σ_i/σ_1 is far above sqrt(eps))
            ev = sla.eigh(Md.T @ Md, eigvals_only=True, subset_by_index=(dim - kk, dim - 1), check_finite=False)
            sig = np.sqrt(np.clip(ev[::-1], 0.0, None))
        history.append(sig[:kk].copy())
        if len(history) > lag and len(history[-1 - lag]) == kk:
            old = history[-1 - lag]
            if criterion == "kyfan":  # relative rise of sqrt(Σ_{i≤k} σ̃_i²), which only grows
                new_kf = float(np.sqrt(np.sum(sig[:kk] ** 2)))
                change = (new_kf - float(np.sqrt(np.sum(old**2)))) / new_kf if new_kf > 0 else 0.0
            else:
                change = float(np.max(np.abs(sig[:kk] - old)) / sig[0]) if sig[0] > 0 else 0.0
        if kk == k:
            converged = (rel if criterion == "residual" else change) <= tol
        if converged or t >= steps:
            break
    if kk < k:
        raise RuntimeError(f"block Lanczos reached only {dim} < k={k} directions; raise max_dim")
    if not converged:
        warnings.warn(
            f"top-{k} SVD of a {m}×{n} matrix stopped at subspace dim {dim} (value change {change:.1e}, "
            f"residual {rel:.1e}, tol={tol:.0e}); pass max_dim=None or method='full' for exact values",
            RuntimeWarning,
            stacklevel=2,
        )
    if criterion != "residual":
        X, sig, Yh = thin_svd(Md)
    # float64 polish: orthonormalise the top-k Ritz vectors and re-project W on them
    U0, _ = thin_qr(Qb[:, :dim].astype(np.float64) @ X[:, :k])
    V0, _ = thin_qr(Pb[:, :dim].astype(np.float64) @ Yh[:k].T)
    WV = matmul64(W, V0)
    Xp, s, Yph = thin_svd(U0.T @ WV)
    U, V = U0 @ Xp, V0 @ Yph.T
    res64 = np.linalg.norm(WV @ Yph.T - U * s, axis=0)
    info = LanczosInfo(
        "lanczos", k, dim, matmuls + 1, float(change), float(res64.max() / s[0]) if s[0] > 0 else 0.0,
        bool(converged), np.dtype(dtype).name,
    )
    return U, s, V.T, info


class TopSingular:
    """The top singular triplets of one weight matrix W, computed once and extended on demand.

    ``get(k)`` returns (U_k, s_k, Vh_k), U_k (out, k), Vh_k (k, in). Later calls with a smaller k reuse
    the stored triplets; a larger k (or vectors after values-only) recomputes once. Methods:

    * ``"full"``: exact float64 SVD (LAPACK gesdd);
    * ``"lanczos"``: `block_lanczos_svd`, float32 Krylov iteration + float64 polish; for singular values
      (Table 7's own row) it stops when sqrt(Σ_{i≤k} σ̃²) rises by < `tol` (relative, default 1e-4;
      measured error on a d=4096 power-law spectrum ≈ 5e-6 relative for ||U_rᵀWV_r||_F), for vectors
      (Figure 8) when the residuals are < `vector_tol`·s_1;
    * ``"auto"``: "full" when min(out, in) ≤ `full_below` or k > min(out, in)/8, else "lanczos".
    """

    def __init__(
        self,
        W,
        *,
        method: str = "auto",
        tol: float = 1e-4,
        vector_tol: float = 1e-5,
        full_below: int = 1536,
        block: int | None = None,
        max_dim: int | None = None,
        seed: int = 0,
    ):
        if method not in {"auto", "full", "lanczos"}:
            raise ValueError(f"method={method!r} is not one of 'auto', 'full', 'lanczos'")
        self._norm = None
        # A float32 original (a checkpoint tensor) is kept as is: the float32 Krylov iteration uses it
        # directly and every float64 product converts it a few rows at a time (`matmul64`); other inputs
        # become float64 once. `.W` (float64) is made only when asked for (exact SVD, callers).
        src = W.detach().cpu().numpy() if hasattr(W, "detach") and str(W.dtype) == "torch.float32" else W
        if isinstance(src, np.ndarray) and src.dtype == np.float32:
            self._src = np.ascontiguousarray(src)
            # one pass for both: float32 squares cannot overflow float64, so a finite norm means finite W
            if self._src.ndim == 2 and not np.isfinite(self.frobenius):
                raise ValueError("W has non-finite entries; check the run's weights (NaN/inf after training?)")
        else:
            self._src = as_float64(W, name="W")
        if self._src.ndim != 2:
            raise ValueError(f"W must be a 2-D weight matrix, got shape {self._src.shape}")
        self._W64 = self._src if self._src.dtype == np.float64 else None
        self.method = method
        self.tol = tol
        self.vector_tol = vector_tol
        self.full_below = full_below
        self.block = block
        self.max_dim = max_dim
        self.seed = seed
        self._U = self._s = self._Vh = None
        self._vectors_ok = False
        self.info: LanczosInfo | None = None

    @property
    def W(self) -> np.ndarray:
        """W as float64 (converted on first use when the input was float32)."""
        if self._W64 is None:
            self._W64 = self._src.astype(np.float64)
        return self._W64

    @property
    def shape(self) -> tuple[int, int]:
        return self._src.shape

    def matmul(self, X: np.ndarray) -> np.ndarray:
        """W @ X in float64."""
        return matmul64(self._W64 if self._W64 is not None else self._src, X)

    @property
    def frobenius(self) -> float:
        if self._norm is None:
            src, sq = self._src, 0.0
            for i in range(0, src.shape[0], 256):  # float64 accumulation without a float64 copy
                c = src[i : i + 256].astype(np.float64)
                sq += float(np.einsum("ij,ij->", c, c))
            self._norm = float(np.sqrt(sq))
        return self._norm

    def _use_full(self, k: int) -> bool:
        if self.method != "auto":
            return self.method == "full"
        p = min(self.shape)
        return p <= self.full_below or k > p // 8

    def get(self, k: int, *, vectors: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k (U, s, Vh). vectors=True asks for converged singular vectors, not only values."""
        p = min(self.shape)
        if not 1 <= k <= p:
            raise ValueError(f"asked for the top {k} singular directions of a {self.shape} matrix; use 1..{p}")
        stale = self._s is None or len(self._s) < k or (vectors and not self._vectors_ok)
        if stale:
            if self._use_full(k):
                U, s, Vh = thin_svd(self.W)
                self.info = LanczosInfo("full", p, p, 0, 0.0, 0.0, True)
                self._vectors_ok = True
            else:
                U, s, Vh, self.info = block_lanczos_svd(
                    self._src,
                    k,
                    block=self.block,
                    tol=self.vector_tol if vectors else self.tol,
                    criterion="residual" if vectors else "kyfan",
                    max_dim=self.max_dim,
                    seed=self.seed,
                )
                self._vectors_ok = vectors
            self._U, self._s, self._Vh = U, s, Vh
        return self._U[:, :k], self._s[:k], self._Vh[:k]

    def values(self, k: int) -> np.ndarray:
        return self.get(k)[1]

    def right(self, k: int) -> np.ndarray:
        """W's top-k right singular vectors as columns, (in, k): the input space that A's rows live in."""
        return self.get(k, vectors=True)[2].T

    def left(self, k: int) -> np.ndarray:
        """W's top-k left singular vectors as columns, (out, k): the output space of B's columns."""
        return self.get(k, vectors=True)[0]

    def own_norm(self, r: int) -> float:
        """||U_rᵀ W V_r||_F for W's own top-r directions = sqrt(sum of the top-r squared singular values)."""
        s = self.values(r)
        return float(np.sqrt(np.sum(s * s)))
