"""DoRA's weight decomposition analysis (DoRA §3.2, eqs. 2-4, Figure 2), on plain arrays.

W = m · V/||V||_c with ||·||_c the norm of each output channel: on a torch weight (out, in) that is the
norm of each row (`norm(dim=1)`), as in DoRA's and PEFT's code. For a fine-tuned (or merged LoRA/DoRA)
weight W against the pretrained W0, over the k = out rows n:

    ΔM = (1/k) Σ_n | ||W_n|| − ||W0_n|| |          (eq. 3, absolute, not relative)
    ΔD = (1/k) Σ_n ( 1 − cos(W_n, W0_n) )         (eq. 4)

Figure 2 scatters (x = ΔD, y = ΔM) of the query matrices for every layer and checkpoint, one panel per
method with a least-squares line; the paper's Pearson correlations are FT −0.62, DoRA −0.31, LoRA +0.83.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from analysis.correlation import pearson
from analysis.linalg import as_float64
from analysis.names import parse_module_name

__all__ = [
    "magnitude_direction",
    "trajectory",
    "regression",
    "correlations",
    "PAPER_CORRELATIONS",
]

PAPER_CORRELATIONS = {"FT": -0.62, "LoRA": 0.83, "DoRA": -0.31}


def _row_norms(W0, W) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(‖W0_n‖, ‖W_n‖, cos(W_n, W0_n)) per output row n of two (out, in) matrices."""
    W0 = as_float64(W0, name="W0")
    W = as_float64(W, name="W")
    if W0.shape != W.shape or W0.ndim != 2:
        raise ValueError(f"W0 {W0.shape} and W {W.shape} must be the same (out, in) matrix; pair them by module")
    m0 = np.linalg.norm(W0, axis=1)
    m = np.linalg.norm(W, axis=1)
    zero = np.flatnonzero((m0 == 0) | (m == 0))
    if zero.size:
        raise ValueError(f"rows {zero[:5].tolist()} have zero norm, so their direction is undefined; drop them")
    cos = np.einsum("ij,ij->i", W, W0) / (m * m0)
    return m0, m, cos


def _delta_m(m0: np.ndarray, m: np.ndarray, relative: bool) -> float:
    return float(np.mean(np.abs(m - m0) / (m0 if relative else 1.0)))


def _delta_d(cos: np.ndarray) -> float:
    return float(np.mean(1.0 - np.clip(cos, -1.0, 1.0)))


def magnitude_direction(W0, W, *, relative: bool = False) -> tuple[float, float]:
    """(ΔM, ΔD) between a pretrained weight W0 and a fine-tuned W, both (out, in) torch layout.

    ``relative=True`` gives ΔM as the mean of |‖W_n‖ − ‖W0_n‖| / ‖W0_n‖ instead (a labelled extra for comparing
    matrices of different scale; not the paper's eq. 3)."""
    m0, m, cos = _row_norms(W0, W)
    return _delta_m(m0, m, relative), _delta_d(cos)


def trajectory(
    base_weights: Mapping[str, object],
    weights_by_step: Mapping[int, Mapping[str, object]],
    *,
    kinds: Iterable[str] | None = ("q",),
    method: str | None = None,
):
    """ΔM, ΔD per (step, module) for one run: a DataFrame with step, module, layer, matrix, dM, dD.

    weights_by_step: {step: {module: W}} of full (merged) weights, e.g. `Run.weight_trajectory()`.
    kinds filters the attention matrices (the paper's Figure 2 uses the query, Figure 7 the value);
    None keeps all modules. `method` (FT / LoRA / DoRA) is added as a column when given.
    """
    import pandas as pd

    rows = []
    for step in sorted(weights_by_step):
        for name, W in weights_by_step[step].items():
            layer, kind = parse_module_name(name)
            if kinds is not None and kind not in kinds:
                continue
            if name not in base_weights:
                raise KeyError(f"no pretrained weight for {name!r}; load the base model of this run")
            m0, m, cos = _row_norms(base_weights[name], W)
            dM, dD, dM_rel = _delta_m(m0, m, False), _delta_d(cos), _delta_m(m0, m, True)
            rows.append({"step": int(step), "module": name, "layer": layer, "matrix": kind, "dM": dM, "dD": dD,
                         "dM_rel": dM_rel})
    df = pd.DataFrame(rows, columns=["step", "module", "layer", "matrix", "dM", "dD", "dM_rel"])
    if method is not None:
        df.insert(0, "method", method)
    return df


def regression(dD: np.ndarray, dM: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, Pearson r) of the least-squares line ΔM ≈ slope·ΔD + intercept."""
    x = np.asarray(dD, dtype=np.float64)
    y = np.asarray(dM, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError(f"need at least two points with different ΔD for a line, got {x.size}")
    xc, yc = x - x.mean(), y - y.mean()
    slope = float(xc @ yc / (xc @ xc))
    intercept = float(y.mean() - slope * x.mean())
    return slope, intercept, pearson(x, y)


def correlations(df, *, by: str = "method", y: str = "dM", bootstrap: int = 0, seed: int = 0):
    """Per method: number of points, slope, intercept, Pearson r (pooled: the paper's reading) and the paper's
    r beside it; Spearman ρ, the mean within-step r, the partial r given the step, and (``bootstrap`` > 0) a
    95 % interval of the pooled r over layers (see ``analysis.correlation``). ``y`` is ``dM`` (eq. 3) or
    ``dM_rel`` (relative ΔM). The per-step rs are in ``.attrs["within_step"]``: {method: {step: r}}."""
    import pandas as pd

    from analysis.correlation import bootstrap_over_clusters, partial_given_groups, spearman, within_groups

    rows, within = [], {}
    for key, g in df.groupby(by, sort=False):
        x, v = g["dD"].to_numpy(), g[y].to_numpy()
        slope, intercept, r = regression(x, v)
        row = {by: key, "points": len(g), "slope": slope, "intercept": intercept, "pearson_r": r,
               "paper_r": PAPER_CORRELATIONS.get(str(key), np.nan), "spearman_r": spearman(x, v)}
        if "step" in g:  # points of several checkpoints: the within-step readings
            per_step = within_groups(x, v, g["step"].to_numpy())
            within[str(key)] = {str(k): float(r_) for k, r_ in per_step.items()}
            row["within_step_mean_r"] = float(np.nanmean(list(per_step.values()))) if per_step else np.nan
            row["partial_r"] = partial_given_groups(x, v, g["step"].to_numpy())
        if bootstrap and "layer" in g:
            row["ci_low"], row["ci_high"] = bootstrap_over_clusters(x, v, g["layer"].to_numpy(), n=bootstrap, seed=seed)
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["within_step"] = within
    return out
