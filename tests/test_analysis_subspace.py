"""φ (LoRA eq. 4) against planted ground truth: subspaces with chosen principal angles, nested spans,
random bases (E φ = max(i, j)/d), and a direct loop over the definition."""

import numpy as np
import pytest

from analysis.linalg import TopSingular, haar_frame
from analysis.subspace import (
    chance_level,
    principal_cosines,
    random_gaussian_similarity,
    right_singular_basis,
    similarity,
    similarity_from_bases,
    weight_similarity,
)


def planted_bases(d, p, q, cosines, rng):
    """U1 (d, p), U2 (d, q) orthonormal with U1ᵀU2 = diag(cosines) padded with zeros."""
    k = len(cosines)
    Q = haar_frame(d, p + q, rng)
    U1 = Q[:, :p]
    U2 = Q[:, p : p + q].copy()
    for t, c in enumerate(cosines):
        U2[:, t] = c * Q[:, t] + np.sqrt(1 - c * c) * Q[:, p + t]
    assert k <= min(p, q)
    return U1, U2


def factor_with_right_vectors(U, rng, *, ordered=True):
    """A (r, d) whose right singular vectors are U's columns, in U's order when `ordered`."""
    r = U.shape[1]
    O = haar_frame(r, r, rng)
    if ordered:
        s = np.linspace(3.0, 1.0, r)  # distinct and decreasing: the SVD returns U's columns in order
        return O @ (s[:, None] * U.T)
    return rng.standard_normal((r, r)) @ U.T  # same row space, arbitrary singular directions


def phi_by_definition(U1, U2):
    p, q = U1.shape[1], U2.shape[1]
    out = np.empty((p, q))
    for i in range(1, p + 1):
        for j in range(1, q + 1):
            out[i - 1, j - 1] = np.linalg.norm(U1[:, :i].T @ U2[:, :j], "fro") ** 2 / min(i, j)
    return out


def test_planted_principal_angles_give_mean_cos_squared():
    rng = np.random.default_rng(0)
    cos = np.array([0.95, 0.7, 0.4, 0.1, 0.0, 0.55])
    U1, U2 = planted_bases(200, 6, 6, cos, rng)
    A1 = factor_with_right_vectors(U1, rng, ordered=False)
    A2 = factor_with_right_vectors(U2, rng, ordered=False)
    phi = similarity(A1, A2)
    # the full-span value depends only on the spans: mean of the squared cosines of the principal angles
    assert phi[-1, -1] == pytest.approx(np.mean(cos**2), abs=1e-10)
    assert np.sort(principal_cosines(right_singular_basis(A1), right_singular_basis(A2))) == pytest.approx(
        np.sort(cos), abs=1e-10
    )


def test_planted_ordered_directions_give_every_entry():
    rng = np.random.default_rng(1)
    cos = np.array([0.9, 0.6, 0.3])
    p, q = 4, 9
    U1, U2 = planted_bases(150, p, q, cos, rng)
    phi = similarity(factor_with_right_vectors(U1, rng), factor_with_right_vectors(U2, rng))
    c2 = np.concatenate([cos**2, np.zeros(p)])
    expected = np.array([[c2[: min(i, j)].sum() / min(i, j) for j in range(1, q + 1)] for i in range(1, p + 1)])
    assert phi.shape == (p, q)
    assert np.max(np.abs(phi - expected)) < 1e-10


def test_cumsum_formula_matches_the_definition_loop():
    rng = np.random.default_rng(2)
    A1, A2 = rng.standard_normal((8, 64)), rng.standard_normal((16, 64))
    U1, U2 = right_singular_basis(A1), right_singular_basis(A2)
    assert np.max(np.abs(similarity(A1, A2) - phi_by_definition(U1, U2))) < 1e-12
    assert np.max(np.abs(similarity_from_bases(U1, U2) - phi_by_definition(U1, U2))) < 1e-12


def test_nested_spans_give_one():
    rng = np.random.default_rng(3)
    U = haar_frame(300, 64, rng)
    A64 = np.linspace(5, 1, 64)[:, None] * U.T  # its top-8 right singular vectors are U[:, :8]
    A8 = haar_frame(8, 8, rng) @ (np.linspace(5, 4, 8)[:, None] * U[:, :8].T)
    phi = similarity(A8, A64)
    assert phi.shape == (8, 64)
    assert np.max(np.abs(phi - 1.0)) < 1e-10
    # and φ is in [0, 1] with φ(A, A) = 1
    assert np.allclose(similarity(A64, A64), 1.0, atol=1e-10)


def test_orthogonal_spans_give_zero():
    rng = np.random.default_rng(4)
    Q = haar_frame(100, 20, rng)
    phi = similarity(Q[:, :8].T, Q[:, 8:20].T)
    assert np.max(phi) < 1e-12


def test_random_bases_sit_at_chance_level():
    # E φ(i, j) = max(i, j)/d exactly for independent Haar bases; average 300 draws
    d, p, q, n = 128, 8, 16, 300
    rng = np.random.default_rng(5)
    draws = np.stack([similarity_from_bases(haar_frame(d, p, rng), haar_frame(d, q, rng)) for _ in range(n)])
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(n)
    expected = chance_level(p, q, d)
    assert np.all(np.abs(mean - expected) < 5 * se + 1e-12)
    # Figure 4's random panel: two Gaussian A's, at chance level everywhere (dark)
    phi = random_gaussian_similarity((64, 2048), seed=0)
    assert phi.shape == (64, 64) and phi.max() < 0.2
    assert abs(phi[-1, -1] - 64 / 2048) < 0.01


def test_left_variant_uses_B_columns():
    rng = np.random.default_rng(6)
    B1, B2 = rng.standard_normal((50, 4)), rng.standard_normal((50, 6))
    phi = similarity(B1, B2, side="left")
    assert np.allclose(phi, similarity(B1.T, B2.T), atol=1e-12)
    with pytest.raises(ValueError, match="side='middle'"):
        similarity(B1, B2, side="middle")


def test_weight_similarity_uses_W_right_singular_vectors():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((80, 60))
    A = rng.standard_normal((4, 60))
    V = np.linalg.svd(W)[2].T  # numpy, independent of the module's scipy SVD
    phi = weight_similarity(W, A, top=10)
    assert phi.shape == (10, 4)
    assert np.allclose(phi, phi_by_definition(V[:, :10], right_singular_basis(A)), atol=1e-10)
    # default: top 10% of the input dimension; a TopSingular is accepted and reused
    assert weight_similarity(TopSingular(W), A).shape == (6, 4)


def test_mismatched_factors_name_the_fix():
    with pytest.raises(ValueError, match="same d"):
        similarity(np.ones((2, 5)) + np.eye(2, 5), np.ones((2, 6)) + np.eye(2, 6))


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(4, 32, generator=g), torch.randn(8, 32, generator=g)
    assert np.allclose(similarity(A1, A2), similarity(A1.numpy(), A2.numpy()), atol=1e-12)
