"""Every reading of DoRA Figure 2's correlation against scipy on planted data."""

from __future__ import annotations

import numpy as np
import pytest

stats = pytest.importorskip("scipy.stats")

from analysis.correlation import (bootstrap_over_clusters, partial_given_groups, pearson, spearman,  # noqa: E402
                                  within_groups)


@pytest.fixture
def planted():
    """Points whose pooled correlation is positive (both grow with the step) while, within each step,
    ΔM falls with ΔD: the situation where the readings disagree."""
    rng = np.random.default_rng(0)
    steps = np.repeat([1, 2, 3, 4], 6)
    layers = np.tile(np.arange(6), 4)
    x = steps * 1.0 + rng.normal(0, 0.3, steps.size)
    y = 2.0 * steps - 0.8 * (x - steps) + rng.normal(0, 0.1, steps.size)
    y[3] = y[3] + 1.0  # a tie-free outlier
    return x, y, steps, layers


def test_pearson_and_spearman_match_scipy(planted):
    x, y, _, _ = planted
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    tied = np.round(x)  # ties get average ranks, as scipy's
    assert spearman(tied, y) == pytest.approx(stats.spearmanr(tied, y)[0], abs=1e-12)


def test_within_step_and_partial_match_scipy(planted):
    x, y, steps, _ = planted
    per_step = within_groups(x, y, steps)
    for s in np.unique(steps):
        assert per_step[s] == pytest.approx(stats.pearsonr(x[steps == s], y[steps == s])[0], abs=1e-12)
        assert per_step[s] < 0  # the planted within-step trade-off
    assert pearson(x, y) > 0
    # partial r given the step: residuals of least squares on one-hot step indicators, then scipy's Pearson
    D = (steps[:, None] == np.unique(steps)[None, :]).astype(float)
    rx = x - D @ np.linalg.lstsq(D, x, rcond=None)[0]
    ry = y - D @ np.linalg.lstsq(D, y, rcond=None)[0]
    got = partial_given_groups(x, y, steps)
    assert got == pytest.approx(stats.pearsonr(rx, ry)[0], abs=1e-12) and got < 0


def test_bootstrap_over_layers_matches_scipy_when_each_layer_is_one_point():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    lo, hi = bootstrap_over_clusters(x, y, np.arange(40), n=4000, seed=0)
    ref = stats.bootstrap((x, y), lambda a, b: stats.pearsonr(a, b)[0], paired=True, vectorized=False,
                          n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.03) and hi == pytest.approx(ref.high, abs=0.03)
    assert lo < pearson(x, y) < hi


def test_bootstrap_resamples_whole_layers(planted):
    x, y, steps, layers = planted
    # one layer only: every resample is that layer, so the interval collapses onto its r
    one = layers == 2
    lo, hi = bootstrap_over_clusters(x[one], y[one], layers[one], n=50)
    assert lo == pytest.approx(pearson(x[one], y[one])) and hi == pytest.approx(lo)


def test_relative_magnitude_change():
    from analysis.decomposition import magnitude_direction

    W0 = np.array([[3.0, 4.0], [1.0, 0.0]])           # row norms 5 and 1
    W = np.array([[6.0, 8.0], [1.0, 0.0]])            # row norms 10 and 1: ΔM = mean(5, 0), relative mean(1, 0)
    assert magnitude_direction(W0, W)[0] == pytest.approx(2.5)
    assert magnitude_direction(W0, W, relative=True)[0] == pytest.approx(0.5)
