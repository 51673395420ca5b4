"""ΔW versus W (LoRA §7.3, Table 7, App. H.4): how strongly W is projected onto ΔW's subspace.

For a weight W (out, in) and an update ΔW, project W onto r-dimensional subspaces and take the norm
||Uᵀ W Vᵀ||_F, with U (out, r) / V (r, in) the top-r left / right singular directions of

* ``delta``:  ΔW itself (from the formed matrix, or from the LoRA factors without forming it),
* ``own``:    W itself, which equals sqrt(σ_1² + … + σ_r²) of W,
* ``random``: a random matrix. Here: independent Haar-random orthonormal r-frames for U and V, which is
  exactly the distribution of the top-r singular vectors of an i.i.d. Gaussian matrix; E||·||_F² =
  r²||W||_F²/(out·in), so the expected value is ≈ r·||W||_F/d (``random_expected``).

The amplification factor is ||ΔW||_F / ``delta`` (H.4).

Factored route: ΔW = s·B A with B (out, r), A (r, in). With B = Q_B R_B and Aᵀ = Q_A R_A,
ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, so an r×r SVD of the core gives ΔW's singular triplets exactly, in
O((out + in) r²) instead of a d×d SVD.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from analysis.linalg import TopSingular, as_float64, haar_frame, thin_qr, thin_svd
from analysis.names import parse_module_name

__all__ = [
    "Directions",
    "delta_directions",
    "factored_directions",
    "random_directions",
    "projection_norm",
    "amplification",
    "amplification_from_factors",
    "amplification_study",
    "ROW_KEYS",
    "stable_seed",
]

ROW_KEYS = ("r", "delta", "own", "random", "random_expected", "norm_W", "norm_delta", "norm_delta_r", "factor")


@dataclass(frozen=True)
class Directions:
    """Top singular triplets of a matrix: U (out, r), s (r,), Vh (r, in)."""

    U: np.ndarray
    s: np.ndarray
    Vh: np.ndarray

    @property
    def r(self) -> int:
        return len(self.s)

    def truncate(self, r: int) -> Directions:
        if not 1 <= r <= self.r:
            raise ValueError(f"r={r} directions requested, only {self.r} available; use 1..{self.r}")
        return Directions(self.U[:, :r], self.s[:r], self.Vh[:r])


def delta_directions(delta_W, r: int) -> Directions:
    """Top-r singular triplets of a formed ΔW (out, in), by a full float64 SVD."""
    D = as_float64(delta_W, name="delta_W")
    if D.ndim != 2:
        raise ValueError(f"delta_W must be 2-D (out, in), got shape {D.shape}")
    U, s, Vh = thin_svd(D)
    return Directions(U, s, Vh).truncate(r)


def factored_directions(A, B, scaling: float = 1.0, r: int | None = None) -> Directions:
    """Singular triplets of ΔW = scaling · B @ A without forming it: QR of B and Aᵀ, then an r×r SVD."""
    A = as_float64(A, name="A")
    B = as_float64(B, name="B")
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"LoRA factors must be A (r, in) and B (out, r) with the same r, got A {A.shape}, B {B.shape}; "
            "check that A and B belong to the same module"
        )
    QB, RB = thin_qr(B)
    QA, RA = thin_qr(A.T)
    Uc, s, Vch = thin_svd(float(scaling) * (RB @ RA.T))
    d = Directions(QB @ Uc, s, Vch @ QA.T)
    return d.truncate(r) if r is not None else d


def random_directions(shape: tuple[int, int], r: int, rng: np.random.Generator) -> Directions:
    """Haar-random r-frames for the output and input spaces (the top-r singular vectors of a Gaussian)."""
    out_f, in_f = shape
    return Directions(haar_frame(out_f, r, rng), np.ones(r), haar_frame(in_f, r, rng).T)


def projection_norm(W: np.ndarray, U: np.ndarray, Vh: np.ndarray) -> float:
    """||Uᵀ W Vhᵀ||_F (the paper's ||Uᵀ W Vᵀ||_F with V holding right singular vectors as rows)."""
    return float(np.linalg.norm(U.T @ (W @ Vh.T)))


def _as_top(W) -> TopSingular:
    return W if isinstance(W, TopSingular) else TopSingular(W)


def _row(top: TopSingular, dirs: Directions, r: int, norm_delta: float, rng: np.random.Generator) -> dict:
    out_f, in_f = top.shape
    if dirs.U.shape[0] != out_f or dirs.Vh.shape[1] != in_f:
        raise ValueError(
            f"ΔW is {dirs.U.shape[0]}×{dirs.Vh.shape[1]} but W is {out_f}×{in_f}; "
            "pair each update with the base weight of the same module"
        )
    rand = random_directions(top.shape, r, rng)
    # one pass over W for both rows: W @ [V_delta | V_random], in float64
    WV = top.matmul(np.hstack([dirs.Vh.T, rand.Vh.T]))
    delta = float(np.linalg.norm(dirs.U.T @ WV[:, :r]))
    random_row = float(np.linalg.norm(rand.U.T @ WV[:, r:]))
    norm_W = top.frobenius
    return {
        "r": int(r),
        "delta": delta,
        "own": top.own_norm(r),
        "random": random_row,
        "random_expected": float(r * norm_W / np.sqrt(out_f * in_f)),
        "norm_W": norm_W,
        "norm_delta": norm_delta,
        "norm_delta_r": float(np.sqrt(np.sum(dirs.s**2))),
        "factor": norm_delta / delta if delta > 0 else float("inf"),
    }


def amplification(W, delta_W, r: int, *, seed: int | Sequence[int] = 0) -> dict:
    """The Table 7 row for one weight matrix: see the module docstring for every key.

    W: the pretrained weight (out, in), or a `TopSingular` of it (its top directions are then cached
    across calls). delta_W: the formed update (out, in), including the α/r scaling.
    """
    top = _as_top(W)
    D = as_float64(delta_W, name="delta_W")
    dirs = delta_directions(D, r)
    return _row(top, dirs, r, float(np.linalg.norm(D)), np.random.default_rng(seed))


def amplification_from_factors(
    W, A, B, scaling: float, r: int | None = None, *, seed: int | Sequence[int] = 0
) -> dict:
    """`amplification` with ΔW = scaling · B A given by its LoRA factors (never formed)."""
    top = _as_top(W)
    full = factored_directions(A, B, scaling)
    r = full.r if r is None else r
    norm_delta = float(np.sqrt(np.sum(full.s**2)))  # ||ΔW||_F: ΔW has rank <= r_lora
    return _row(top, full.truncate(r), r, norm_delta, np.random.default_rng(seed))


def stable_seed(seed: int, *keys) -> list[int]:
    """A seed sequence for numpy from an int and any labels, identical across processes and platforms."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return [int(seed), int.from_bytes(digest, "little")]


def amplification_study(
    base_weights: Mapping[str, object],
    updates: Mapping[object, Mapping[str, object]],
    *,
    r: int | None = None,
    modules: Iterable[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    top_kwargs: Mapping | None = None,
):
    """Table 7 for many modules and several updates, W's SVD computed once per module.

    base_weights: {module: W0 (out, in)}. updates: {label (e.g. the run's rank): {module: update}}, each
    update either a formed ΔW (then `r` is required) or LoRA factors {"A", "B", "scaling"} as returned
    by `lowrank.results.Run.factors()`. Returns a long DataFrame: one row per (label, module) with
    module, layer, matrix, label and the `ROW_KEYS`.
    """
    import pandas as pd

    names = list(modules) if modules is not None else sorted(
        {m for upd in updates.values() for m in upd if m in base_weights}
    )
    missing = [m for m in names if m not in base_weights]
    if missing:
        raise KeyError(f"no base weight for {missing[:3]}...; load the base model the runs were trained from")
    rows = []
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="amplification", unit="module")
    for name in it:
        top = TopSingular(base_weights[name], **dict(top_kwargs or {}))
        # W's top directions, once, for the largest r any update needs
        ranks = []
        for upd in updates.values():
            if name in upd:
                u = upd[name]
                ranks.append(r or (np.shape(u["A"])[0] if isinstance(u, Mapping) else None))
        if any(k is None for k in ranks):
            raise ValueError(f"{name}: a formed ΔW needs r=...; pass the rank to project onto")
        if ranks:
            top.get(max(ranks))
        layer, kind = parse_module_name(name)
        for label, upd in updates.items():
            if name not in upd:
                continue
            u = upd[name]
            # the random row is seeded per (module, label): independent across rows, reproducible
            row_seed = stable_seed(seed, name, label)
            if isinstance(u, Mapping):
                row = amplification_from_factors(top, u["A"], u["B"], float(u.get("scaling", 1.0)), r, seed=row_seed)
            else:
                row = amplification(top, u, r, seed=row_seed)
            rows.append({"label": label, "module": name, "layer": layer, "matrix": kind, **row})
    cols = ["label", "module", "layer", "matrix", *ROW_KEYS]
    return pd.DataFrame(rows, columns=cols)
