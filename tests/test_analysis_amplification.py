"""Table 7 against ground truth: chosen amplified directions give the chosen factor, the QR route equals a
full SVD of the formed ΔW, the own row is sqrt(Σ top-r σ²), the random row sits at r‖W‖_F/d, and the
truncated (Lanczos) SVD used at d=4096 agrees with the full SVD."""

import numpy as np
import pytest

from analysis import linalg
from analysis.amplification import (
    amplification,
    amplification_from_factors,
    amplification_study,
    delta_directions,
    factored_directions,
    projection_norm,
    random_directions,
)
from analysis.linalg import TopSingular, block_lanczos_svd, haar_frame


def weight_with_spectrum(s, rng, shape=None):
    m, n = shape or (len(s), len(s))
    U, V = haar_frame(m, len(s), rng), haar_frame(n, len(s), rng)
    return (U * s) @ V.T, U, V


def test_chosen_amplified_directions_give_the_chosen_factor():
    rng = np.random.default_rng(0)
    d = 120
    s = np.linspace(10.0, 0.1, d)
    W, U, V = weight_with_spectrum(s, rng)
    picked = [40, 77, 101, 115]  # directions W does not emphasise
    target_factor = 21.5
    proj = np.sqrt(np.sum(s[picked] ** 2))  # ‖UᵀWVᵀ‖_F on exactly those directions
    delta_s = np.array([4.0, 3.0, 2.0, 1.0])
    delta_s *= target_factor * proj / np.linalg.norm(delta_s)  # ‖ΔW‖_F = factor · projection
    dW = (U[:, picked] * delta_s) @ V[:, picked].T
    row = amplification(W, dW, r=4)
    assert row["delta"] == pytest.approx(proj, rel=1e-10)
    assert row["factor"] == pytest.approx(target_factor, rel=1e-10)
    assert row["norm_delta"] == pytest.approx(np.linalg.norm(dW), rel=1e-12)
    assert row["norm_W"] == pytest.approx(np.linalg.norm(s), rel=1e-12)
    assert row["own"] == pytest.approx(np.sqrt(np.sum(s[:4] ** 2)), rel=1e-10)


def test_factored_route_equals_full_svd_of_formed_delta():
    rng = np.random.default_rng(1)
    out_f, in_f, r, scaling = 70, 90, 8, 0.37
    A, B = rng.standard_normal((r, in_f)), rng.standard_normal((out_f, r))
    dW = scaling * B @ A
    f = factored_directions(A, B, scaling)
    U, s, Vh = np.linalg.svd(dW)  # numpy: independent of the module's scipy path
    assert f.s == pytest.approx(s[:r], rel=1e-12)
    assert np.allclose(f.U @ f.U.T, U[:, :r] @ U[:, :r].T, atol=1e-10)  # same subspaces (signs free)
    assert np.allclose(f.Vh.T @ f.Vh, Vh[:r].T @ Vh[:r], atol=1e-10)
    assert np.allclose((f.U * f.s) @ f.Vh, dW, atol=1e-10)
    W = rng.standard_normal((out_f, in_f))
    full, fact = amplification(W, dW, r), amplification_from_factors(W, A, B, scaling)
    for key in ("delta", "own", "random", "norm_W", "norm_delta", "factor"):
        assert fact[key] == pytest.approx(full[key], rel=1e-9), key
    # truncation to r' < r matches the formed route too
    assert amplification_from_factors(W, A, B, scaling, 3)["delta"] == pytest.approx(
        amplification(W, dW, 3)["delta"], rel=1e-9
    )


def test_own_row_is_root_sum_of_top_singular_values_squared():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((60, 50))
    s = np.linalg.svd(W, compute_uv=False)
    top = TopSingular(W)
    for r in (1, 4, 16):
        row = amplification(top, rng.standard_normal((60, r)) @ rng.standard_normal((r, 50)), r)
        assert row["own"] == pytest.approx(np.sqrt(np.sum(s[:r] ** 2)), rel=1e-12)
        U, _, Vh = top.get(r)
        assert projection_norm(top.W, U, Vh) == pytest.approx(row["own"], rel=1e-12)


def test_random_row_matches_r_norm_over_d():
    # E‖UᵀWV‖_F² = r²‖W‖_F²/d² for Haar frames; the mean of 400 draws within 5 standard errors
    rng = np.random.default_rng(3)
    d, r = 96, 4
    W = rng.standard_normal((d, d)) * np.linspace(3, 0.2, d)
    sq = []
    for _ in range(400):
        dirs = random_directions(W.shape, r, rng)
        sq.append(projection_norm(W, dirs.U, dirs.Vh) ** 2)
    sq = np.array(sq)
    expected = (r * np.linalg.norm(W) / d) ** 2
    assert abs(sq.mean() - expected) < 5 * sq.std(ddof=1) / np.sqrt(len(sq))
    row = amplification(W, rng.standard_normal((d, r)) @ rng.standard_normal((r, d)), r, seed=11)
    assert row["random_expected"] == pytest.approx(r * np.linalg.norm(W) / d)
    assert 0.2 * row["random_expected"] < row["random"] < 3 * row["random_expected"]
    # seeded: reproducible
    assert amplification(W, np.eye(d)[:, :r] @ np.eye(d)[:r], r, seed=11)["random"] == row["random"]


def test_haar_frames_are_orthonormal_and_unbiased():
    rng = np.random.default_rng(4)
    F = haar_frame(50, 5, rng)
    assert np.allclose(F.T @ F, np.eye(5), atol=1e-12)
    # E[F Fᵀ] = (k/n) I
    frames = [haar_frame(20, 3, rng) for _ in range(2000)]
    P = np.mean([F @ F.T for F in frames], axis=0)
    assert np.allclose(P, 3 / 20 * np.eye(20), atol=0.02)


@pytest.mark.parametrize("spectrum", ["gaussian", "decaying"])
def test_lanczos_top_singular_values_match_full_svd(spectrum):
    # the truncated SVD behind Table 7's own row at d=4096, checked at a size where a full SVD is cheap
    rng = np.random.default_rng(5)
    d, k = 600, 64
    if spectrum == "gaussian":  # flat Marchenko-Pastur spectrum: the hard case for truncated methods
        d, k = 400, 32
        W = rng.standard_normal((d, d))
    else:
        W, _, _ = weight_with_spectrum(np.arange(1, d + 1) ** -0.33, rng)
    s_true = np.linalg.svd(W, compute_uv=False)
    U, s, Vh, info = block_lanczos_svd(W, k)  # defaults: values criterion, tol 1e-4, float32 iteration
    assert info.converged and info.method == "lanczos" and info.iteration_dtype == "float32"
    assert info.subspace_dim < d
    assert np.all(s <= s_true[:k] * (1 + 1e-12))  # Ritz values are lower bounds (interlacing)
    for r in (8, k):  # the own row, sqrt(Σ σ²), to better than 1e-6 relative
        assert np.sqrt(np.sum(s[:r] ** 2)) == pytest.approx(np.sqrt(np.sum(s_true[:r] ** 2)), rel=1e-6)
    # and it is literally ‖U_rᵀ W V_r‖_F of the returned (orthonormal) directions
    assert np.allclose(U.T @ U, np.eye(k), atol=1e-10) and np.allclose(Vh @ Vh.T, np.eye(k), atol=1e-10)
    assert projection_norm(W, U[:, :8], Vh[:8]) == pytest.approx(np.sqrt(np.sum(s[:8] ** 2)), rel=1e-12)
    # TopSingular stops on the own row itself (Ky Fan criterion, tol 1e-4): ≈ 1e-5 relative, 5 digits
    top = TopSingular(W, method="lanczos")
    assert top.info is None and top.own_norm(k) == pytest.approx(np.sqrt(np.sum(s_true[:k] ** 2)), rel=2e-5)
    assert top.own_norm(k) <= np.sqrt(np.sum(s_true[:k] ** 2)) * (1 + 1e-12) and top.info.converged


def test_lanczos_vectors_with_residual_criterion():
    rng = np.random.default_rng(8)
    d, k = 400, 16
    W, _, V = weight_with_spectrum(np.arange(1, d + 1) ** -0.7, rng)
    U, s, Vh, info = block_lanczos_svd(W, k, criterion="residual", tol=1e-6, dtype=np.float64)
    s_true = np.arange(1, d + 1) ** -0.7
    assert info.converged
    assert np.max(np.abs(s - s_true[:k]) / s_true[:k]) < 1e-10
    assert np.max(np.linalg.norm(W @ Vh.T - U * s, axis=0)) / s[0] < 1e-6
    assert np.allclose(np.abs(Vh @ V[:, :k]), np.eye(k), atol=1e-5)  # the right singular vectors themselves
    # TopSingular asks for vectors when they are needed (Figure 8) and for values only otherwise
    top = TopSingular(W, method="lanczos")
    top.own_norm(k)
    assert top.info.value_change <= 1e-4
    Vk = top.right(k)
    assert top.info.max_rel_residual < 1e-5 and np.allclose(np.abs(Vk.T @ V[:, :k]), np.eye(k), atol=1e-3)


def test_lanczos_warns_when_capped():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((300, 300))
    with pytest.warns(RuntimeWarning, match="max_dim"):
        _, _, _, info = block_lanczos_svd(W, 32, tol=1e-12, max_dim=96)
    assert not info.converged


def test_study_computes_each_W_once_and_matches_single_rows(monkeypatch):
    rng = np.random.default_rng(7)
    names = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(3) for m in ("query", "value")]
    base = {n: rng.standard_normal((40, 40)) for n in names}
    updates = {
        r: {n: {"A": rng.standard_normal((r, 40)), "B": rng.standard_normal((40, r)), "scaling": 8 / r} for n in names}
        for r in (2, 8)
    }
    calls = []
    real = linalg.thin_svd
    monkeypatch.setattr(linalg, "thin_svd", lambda M: (calls.append(M.shape), real(M))[1])
    df = amplification_study(base, updates)
    assert calls.count((40, 40)) == len(names)  # one SVD of each W, reused for r=2 and r=8
    assert len(df) == 2 * len(names)
    assert set(df["matrix"]) == {"q", "v"} and sorted(df["layer"].unique()) == [0, 1, 2]
    row = df[(df["label"] == 8) & (df["module"] == names[3])].iloc[0]
    u = updates[8][names[3]]
    direct = amplification(base[names[3]], u["scaling"] * u["B"] @ u["A"], 8)
    for key in ("delta", "own", "norm_W", "norm_delta", "factor"):
        assert row[key] == pytest.approx(direct[key], rel=1e-9)
    # random rows are reproducible and independent across modules
    again = amplification_study(base, updates)
    assert np.array_equal(again["random"].to_numpy(), df["random"].to_numpy())
    assert df["random"].nunique() == len(df)
    # two worker processes give the same table
    par = amplification_study(base, updates, jobs=2)
    cols = ["delta", "own", "random", "norm_W", "norm_delta", "factor"]
    assert np.allclose(par[cols].to_numpy(), df[cols].to_numpy(), rtol=1e-12, atol=0)
    assert list(par["module"]) == list(df["module"]) and list(par["label"]) == list(df["label"])


def test_shape_mismatch_names_the_fix():
    with pytest.raises(ValueError, match="same module"):
        amplification(np.eye(5), np.ones((4, 5)), 1)
    with pytest.raises(ValueError, match="same module"):
        factored_directions(np.ones((2, 5)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="only 2 available"):
        delta_directions(np.eye(2), 3)


def test_float32_weights_give_the_float64_numbers():
    # checkpoints are float32: TopSingular keeps them as is and multiplies in float64 a few rows at a time
    from analysis.linalg import matmul64

    rng = np.random.default_rng(9)
    W32 = rng.standard_normal((300, 200)).astype(np.float32)
    W64 = W32.astype(np.float64)
    X = rng.standard_normal((200, 7))
    assert np.allclose(matmul64(W32, X, rows=64), W64 @ X, rtol=0, atol=1e-12)
    A, B = rng.standard_normal((4, 200)), rng.standard_normal((300, 4))
    r32 = amplification_from_factors(TopSingular(W32), A, B, 0.5, seed=1)
    r64 = amplification_from_factors(TopSingular(W64), A, B, 0.5, seed=1)
    for key in ("delta", "own", "random", "norm_W", "factor"):
        assert r32[key] == pytest.approx(r64[key], rel=1e-12), key
    lz32 = TopSingular(W32, method="lanczos").own_norm(16)
    assert lz32 == pytest.approx(np.sqrt(np.sum(np.linalg.svd(W64, compute_uv=False)[:16] ** 2)), rel=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        TopSingular(np.full((3, 3), np.nan, dtype=np.float32))
