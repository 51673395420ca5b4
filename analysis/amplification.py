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
import os
from contextlib import contextmanager
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
    "amplification_many",
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


def _rows(top: TopSingular, items: list[tuple[Directions, int, float, np.random.Generator]]) -> list[dict]:
    """Table 7 rows for several updates of one W, with a single float64 pass over W for all of them:
    W @ [V_delta(1) | V_random(1) | V_delta(2) | ...]."""
    out_f, in_f = top.shape
    blocks, rands = [], []
    for dirs, r, _, rng in items:
        if dirs.U.shape[0] != out_f or dirs.Vh.shape[1] != in_f:
            raise ValueError(
                f"ΔW is {dirs.U.shape[0]}×{dirs.Vh.shape[1]} but W is {out_f}×{in_f}; "
                "pair each update with the base weight of the same module"
            )
        rand = random_directions(top.shape, r, rng)
        rands.append(rand)
        blocks += [dirs.Vh.T, rand.Vh.T]
    WV = top.matmul(np.hstack(blocks))
    norm_W = top.frobenius
    rows, col = [], 0
    for (dirs, r, norm_delta, _), rand in zip(items, rands):
        delta = float(np.linalg.norm(dirs.U.T @ WV[:, col : col + r]))
        random_row = float(np.linalg.norm(rand.U.T @ WV[:, col + r : col + 2 * r]))
        col += 2 * r
        rows.append({
            "r": int(r),
            "delta": delta,
            "own": top.own_norm(r),
            "random": random_row,
            "random_expected": float(r * norm_W / np.sqrt(out_f * in_f)),
            "norm_W": norm_W,
            "norm_delta": norm_delta,
            "norm_delta_r": float(np.sqrt(np.sum(dirs.s**2))),
            "factor": norm_delta / delta if delta > 0 else float("inf"),
        })
    return rows


def _prepare(update, r: int | None) -> tuple[Directions, int, float]:
    """(top-r directions, r, ‖ΔW‖_F) of an update: LoRA factors {"A", "B", "scaling"} or a formed ΔW."""
    if isinstance(update, Mapping):
        full = factored_directions(update["A"], update["B"], float(update.get("scaling") or 1.0))
        r = full.r if r is None else r
        return full.truncate(r), r, float(np.sqrt(np.sum(full.s**2)))  # ΔW has rank <= r_lora
    if r is None:
        raise ValueError("a formed ΔW needs r=...; pass the rank to project onto")
    D = as_float64(update, name="delta_W")
    return delta_directions(D, r), r, float(np.linalg.norm(D))


def amplification_many(W, updates: Mapping, *, r: int | None = None, seeds: Mapping | None = None) -> dict:
    """Table 7 rows for several updates of the same W ({label: LoRA factors or formed ΔW}), sharing W's
    top-r SVD and one pass over W. `seeds`: {label: seed of the random row} (default 0 for all)."""
    top = _as_top(W)
    labels = list(updates)
    prepared = [_prepare(updates[k], r) for k in labels]
    top.get(max(p[1] for p in prepared))  # W's top directions once, for the largest r
    items = [(d, rr, nd, np.random.default_rng((seeds or {}).get(k, 0))) for k, (d, rr, nd) in zip(labels, prepared)]
    return dict(zip(labels, _rows(top, items)))


def amplification(W, delta_W, r: int, *, seed: int | Sequence[int] = 0) -> dict:
    """The Table 7 row for one weight matrix: see the module docstring for every key.

    W: the pretrained weight (out, in), or a `TopSingular` of it (its top directions are then cached
    across calls). delta_W: the formed update (out, in), including the α/r scaling.
    """
    dirs, r, norm_delta = _prepare(delta_W, r)
    return _rows(_as_top(W), [(dirs, r, norm_delta, np.random.default_rng(seed))])[0]


def amplification_from_factors(
    W, A, B, scaling: float, r: int | None = None, *, seed: int | Sequence[int] = 0
) -> dict:
    """`amplification` with ΔW = scaling · B A given by its LoRA factors (never formed)."""
    dirs, r, norm_delta = _prepare({"A": A, "B": B, "scaling": scaling}, r)
    return _rows(_as_top(W), [(dirs, r, norm_delta, np.random.default_rng(seed))])[0]


def stable_seed(seed: int, *keys) -> list[int]:
    """A seed sequence for numpy from an int and any labels, identical across processes and platforms."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return [int(seed), int.from_bytes(digest, "little")]


def _to_numpy(x):
    """Tensors become numpy arrays before crossing to a worker process (bfloat16, which numpy lacks, as float32)."""
    if not hasattr(x, "detach"):
        return x
    x = x.detach().cpu()
    return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()


def _study_task(task) -> tuple[str, dict]:
    name, W, mine, r, seeds, top_kwargs = task
    top = TopSingular(W, **top_kwargs)
    return name, amplification_many(top, mine, r=r, seeds=seeds)


@contextmanager
def _one_blas_thread_in_children():
    # spawned workers read these when numpy loads: one BLAS thread each, so `jobs` processes use `jobs`
    # cores without BLAS threads spinning against each other
    keys = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _in_workers(tasks, jobs: int):
    """`_study_task` over `tasks` in `jobs` spawned processes, yielding results as they finish; at most
    2 tasks in flight per worker, since each task's weights are pickled to the worker on submit."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    def portable(task):
        name, W, mine, r, seeds, kw = task
        mine = {k: ({kk: _to_numpy(vv) for kk, vv in u.items()} if isinstance(u, Mapping) else _to_numpy(u))
                for k, u in mine.items()}
        return name, _to_numpy(W), mine, r, seeds, kw

    pending = set()
    with _one_blas_thread_in_children(), ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        for task in tasks:
            if len(pending) >= 2 * jobs:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
            pending.add(pool.submit(_study_task, portable(task)))
        for f in pending:
            yield f.result()


def amplification_study(
    base_weights: Mapping[str, object],
    updates: Mapping[object, Mapping[str, object]],
    *,
    r: int | None = None,
    modules: Iterable[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    top_kwargs: Mapping | None = None,
    jobs: int = 1,
):
    """Table 7 for many modules and several updates, W's SVD computed once per module.

    base_weights: {module: W0 (out, in)}. updates: {label (e.g. the run's rank): {module: update}}, each
    update either a formed ΔW (then `r` is required) or LoRA factors {"A", "B", "scaling"} as returned
    by `lowrank.runner.results.Run.factors()`. Returns a long DataFrame: one row per (label, module) with
    module, layer, matrix, label and the `ROW_KEYS`. `jobs` > 1 spreads the modules over that many
    worker processes (one BLAS thread each); the rows are the same as with jobs=1.
    """
    import pandas as pd

    names = list(modules) if modules is not None else sorted(
        {m for upd in updates.values() for m in upd if m in base_weights}
    )
    missing = [m for m in names if m not in base_weights]
    if missing:
        raise KeyError(f"no base weight for {missing[:3]}...; load the base model the runs were trained from")
    if jobs < 1:
        raise ValueError(f"jobs={jobs}; use 1 (this process) or more worker processes")
    kw = dict(top_kwargs or {})

    def tasks():
        for name in names:
            mine = {label: upd[name] for label, upd in updates.items() if name in upd}
            if mine:
                # the random row is seeded per (module, label): independent across rows, reproducible
                seeds = {k: stable_seed(seed, name, k) for k in mine}
                yield name, base_weights[name], mine, r, seeds, kw

    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    with tqdm(total=len(names), desc="amplification", unit="module", disable=not progress) as bar:
        for name, rows_here in map(_study_task, tasks()) if jobs == 1 else _in_workers(tasks(), jobs):
            results[name] = rows_here
            bar.update()
    rows = []
    for name in (n for n in names if n in results):
        layer, kind = parse_module_name(name)
        for label, row in results[name].items():
            rows.append({"label": label, "module": name, "layer": layer, "matrix": kind, **row})
    cols = ["label", "module", "layer", "matrix", *ROW_KEYS]
    return pd.DataFrame(rows, columns=cols)
