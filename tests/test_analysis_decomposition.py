"""DoRA's (ΔM, ΔD) against hand-computed float64 examples, the per-row (output channel) convention,
and the regression / correlation helpers against numpy."""

import numpy as np
import pandas as pd
import pytest

from analysis.decomposition import PAPER_CORRELATIONS, correlations, magnitude_direction, regression, trajectory


def test_hand_computed_example():
    # rows = output channels. Row 0 doubles in length, same direction; row 1 turns 90° and doubles.
    W0 = np.array([[3.0, 4.0], [1.0, 0.0]])
    W = np.array([[6.0, 8.0], [0.0, 2.0]])
    dM, dD = magnitude_direction(W0, W)
    assert dM == pytest.approx((abs(10 - 5) + abs(2 - 1)) / 2, abs=1e-15)  # = 3
    assert dD == pytest.approx(((1 - 1.0) + (1 - 0.0)) / 2, abs=1e-15)  # = 0.5


def test_hand_computed_cosines():
    W0 = np.array([[1.0, 2.0, 2.0], [0.0, 0.0, 5.0], [2.0, 0.0, 0.0]])
    W = np.array([[2.0, 1.0, 2.0], [0.0, 3.0, 4.0], [-1.0, 0.0, 0.0]])
    # norms: W0 (3, 5, 2), W (3, 5, 1); cosines 8/9, 20/25, -1
    dM, dD = magnitude_direction(W0, W)
    assert dM == pytest.approx((0 + 0 + 1) / 3, abs=1e-15)
    assert dD == pytest.approx(((1 - 8 / 9) + (1 - 0.8) + (1 - (-1))) / 3, abs=1e-15)


def test_norm_is_per_output_row_not_column():
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((6, 4))
    W = W0 * np.array([1.0, 2.0, 1.0, 1.0, 3.0, 1.0])[:, None]  # rescale rows only: no direction change
    dM, dD = magnitude_direction(W0, W)
    assert dD == pytest.approx(0.0, abs=1e-15)
    m0 = np.linalg.norm(W0, axis=1)
    assert dM == pytest.approx(np.mean(np.abs(m0 * np.array([0, 1, 0, 0, 2, 0]))), rel=1e-14)
    # on the transpose (columns) the same change moves directions: the convention matters
    assert magnitude_direction(W0.T, W.T)[1] > 1e-3


def test_torch_and_errors():
    torch = pytest.importorskip("torch")
    W0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    W = W0 + 0.1
    assert magnitude_direction(W0, W) == pytest.approx(magnitude_direction(W0.numpy(), W.numpy()), rel=1e-12)
    with pytest.raises(ValueError, match="same"):
        magnitude_direction(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="zero norm"):
        magnitude_direction(np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((2, 2)))


def test_trajectory_filters_kinds_and_orders_steps():
    rng = np.random.default_rng(2)
    names = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    base = {n: rng.standard_normal((4, 4)) for n in names}
    traj = {s: {n: base[n] + 0.1 * s * rng.standard_normal((4, 4)) for n in names} for s in (200, 100)}
    df = trajectory(base, traj, kinds=["q"], method="LoRA")
    assert list(df["step"]) == [100, 100, 200, 200]
    assert set(df["matrix"]) == {"q"} and list(df["layer"]) == [0, 1, 0, 1]
    assert (df["method"] == "LoRA").all()
    dM, dD = magnitude_direction(base[names[2]], traj[200][names[2]])
    assert df.iloc[3]["dM"] == dM and df.iloc[3]["dD"] == dD


def test_regression_and_correlations_match_numpy():
    rng = np.random.default_rng(3)
    x = rng.random(24)
    rows = []
    for method, sign in (("FT", -1), ("LoRA", 1), ("DoRA", -1)):
        y = 0.5 + sign * 2.0 * x + 0.1 * rng.standard_normal(24)
        rows += [{"method": method, "dD": a, "dM": b} for a, b in zip(x, y)]
        slope, icpt, r = regression(x, y)
        ref_slope, ref_icpt = np.polyfit(x, y, 1)
        assert slope == pytest.approx(ref_slope, rel=1e-10) and icpt == pytest.approx(ref_icpt, rel=1e-10)
        assert r == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    corr = correlations(pd.DataFrame(rows)).set_index("method")
    assert corr.loc["FT", "pearson_r"] < 0 < corr.loc["LoRA", "pearson_r"]
    assert corr.loc["DoRA", "paper_r"] == PAPER_CORRELATIONS["DoRA"] == -0.31
    with pytest.raises(ValueError, match="two points"):
        regression([1.0], [2.0])
