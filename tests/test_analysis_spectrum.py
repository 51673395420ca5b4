"""ΔW spectrum against planted low-rank matrices (known singular values)."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.spectrum import effective_rank, energy_top, singular_values, stable_rank


def _planted(sigmas, shape=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((shape[0], len(sigmas))))
    V, _ = np.linalg.qr(rng.standard_normal((shape[1], len(sigmas))))
    return (U * np.asarray(sigmas)) @ V.T


def test_planted_low_rank_spectrum():
    sig = np.array([4.0, 2.0, 1.0, 0.5])
    s = singular_values(_planted(sig))
    assert s[:4] == pytest.approx(sig, rel=1e-10) and np.all(s[4:] < 1e-10)
    total = (sig ** 2).sum()
    assert energy_top(s, 1) == pytest.approx(16 / total, rel=1e-10)
    assert energy_top(s, 4) == pytest.approx(1.0, rel=1e-12) and energy_top(s, 64) == pytest.approx(1.0)
    p = sig / sig.sum()
    assert effective_rank(s) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-8)
    assert stable_rank(s) == pytest.approx(total / 16, rel=1e-10)


def test_flat_spectrum_has_full_effective_rank():
    s = singular_values(_planted(np.ones(8)))
    assert effective_rank(s) == pytest.approx(8.0, rel=1e-6) and stable_rank(s) == pytest.approx(8.0, rel=1e-8)
    # a rank-8 update keeps 4/8 of the energy in its top 4 directions
    assert energy_top(s, 4) == pytest.approx(0.5, rel=1e-8)
