"""Correlations of ΔD and ΔM under every reading of DoRA Figure 2 (arXiv 2402.09353 §3.2), on plain arrays.

The paper reports one Pearson r per method over all (layer, checkpoint) points pooled, while its text
describes a trend within each checkpoint. Pooled points mix two effects: updates grow with training (both
ΔD and ΔM rise from one checkpoint to the next) and, within a checkpoint, layers trade magnitude against
direction. The readings here separate them:

- pooled Pearson r (the paper's number) and Spearman's ρ (ranks, robust to one dominant layer);
- within-checkpoint r: one Pearson r per step over the layers, and their mean;
- partial r given the step: Pearson r of ΔD and ΔM after removing each step's mean from both (the
  correlation that remains once step is controlled for as a categorical variable);
- a bootstrap interval over layers: layers resampled with replacement (all steps of a layer together).
"""

from __future__ import annotations

import numpy as np

__all__ = ["pearson", "spearman", "within_groups", "partial_given_groups", "bootstrap_over_clusters"]


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc @ xc) * (yc @ yc))
    return float(xc @ yc / denom) if denom > 0 else float("nan")


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.arange(1, v.size + 1)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
    """Spearman's ρ: the Pearson r of the ranks (average ranks for ties)."""
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def within_groups(x, y, groups) -> dict:
    """{group: Pearson r of the points in that group} (groups with fewer than 3 points are left out)."""
    x, y, groups = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(groups)
    return {g.item() if hasattr(g, "item") else g: pearson(x[groups == g], y[groups == g])
            for g in np.unique(groups) if (groups == g).sum() >= 3}


def partial_given_groups(x, y, groups) -> float:
    """Pearson r of x and y after subtracting each group's mean from both (partial r given the group)."""
    x, y, groups = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(groups)
    xr, yr = x.copy(), y.copy()
    for g in np.unique(groups):
        at = groups == g
        xr[at] -= x[at].mean()
        yr[at] -= y[at].mean()
    return pearson(xr, yr)


def bootstrap_over_clusters(x, y, clusters, *, n: int = 1000, level: float = 0.95, seed: int = 0,
                            stat=pearson) -> tuple[float, float]:
    """Percentile interval of ``stat(x, y)`` with whole clusters (layers) resampled with replacement."""
    x, y, clusters = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(clusters)
    names = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in names]
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(names), len(names))])
        stats.append(stat(x[idx], y[idx]))
    stats = np.asarray(stats)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))
