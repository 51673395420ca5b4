"""Benchmark: the full LoRA Table 7 + Figure 3 analysis at LLaMA-7B size, on this CPU.

32 layers × (Wq, Wv) at d = 4096, LoRA factors at r = 8 and r = 64 (random, seeded). Per matrix:
W's top-64 singular values once (block Lanczos, float32 iteration + float64 polish; reused for r = 8),
ΔW's directions from the factors (QR + r×r SVD), the ΔW / W / random rows of Table 7 for both ranks;
per layer φ(A_{r=8}, A_{r=64}) for Wq and Wv; then the Table 7 files (md/tex/csv), the per-layer plot
and Figure 3 (PNG + PDF) are written. This is what `python -m analysis amplification` and
`python -m analysis subspace` do on a real sweep, minus reading the runs.

Weights (not timed: a real analysis loads them from disk):
  powerlaw (default)  σ_i ∝ i^-0.33 with random singular vectors: the top-64 directions hold 21% of ‖W‖²,
                      as LLaMA2-7B's layer-16 Wq does (MiLoRA: 43.64² / 97.36² = 0.20). The exact singular
                      values are known, so the "own" row's error is measured on every matrix.
  gaussian            i.i.d. N(0, 1/d): a flat Marchenko-Pastur spectrum, the worst case for a truncated
                      SVD (no gap near σ_64); the exact values are not known at this size, so no error.

    python -m benchmarks.analysis_speed                       # writes benchmarks/results/analysis_speed.json
    python -m benchmarks.analysis_speed --weights gaussian --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ALPHA = 16.0
POWER = 0.33


def _signed_permutation(rng, d):
    return rng.permutation(d), rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=d)


class Weights:
    """Seeded random W (float32, like a loaded checkpoint), one at a time, with its exact spectrum if known."""

    def __init__(self, kind: str, d: int, seed: int):
        self.kind, self.d, self.seed = kind, d, seed
        self.gen_time = 0.0
        self.spectrum = None
        if kind == "powerlaw":
            t = time.perf_counter()
            import scipy.fft as sfft

            rng = np.random.default_rng(seed)
            s = np.arange(1, d + 1, dtype=np.float64) ** -POWER
            s *= 100.0 / np.linalg.norm(s)  # ‖W‖_F = 100, about LLaMA2-7B's 97
            M = np.diag(s)
            for axis in (0, 1):  # random orthogonal mixing on each side: signs, permutation, DCT, signs, DCT
                for _ in range(2):
                    perm, sign = _signed_permutation(rng, d)
                    M = np.take(M, perm, axis=axis) * (sign[:, None] if axis == 0 else sign[None, :])
                    M = sfft.dct(M, type=2, norm="ortho", axis=axis)
            self._base = M.astype(np.float32)
            self.spectrum = s
            self.gen_time += time.perf_counter() - t
        elif kind != "gaussian":
            raise ValueError(f"--weights {kind!r}; use powerlaw or gaussian")

    def get(self, index: int) -> np.ndarray:
        t = time.perf_counter()
        rng = np.random.default_rng([self.seed, index])
        if self.kind == "gaussian":
            W = rng.standard_normal((self.d, self.d), dtype=np.float32) / np.float32(np.sqrt(self.d))
        else:  # same spectrum, new singular vectors: W_l = P1 S1 W_base S2 P2 (signed permutations)
            p1, s1 = _signed_permutation(rng, self.d)
            p2, s2 = _signed_permutation(rng, self.d)
            W = self._base[p1][:, p2] * s1[:, None] * s2[None, :]
        self.gen_time += time.perf_counter() - t
        return W


def lora_factors(d, r, rng):
    A = rng.standard_normal((r, d)) / np.sqrt(d)
    B = 0.02 * rng.standard_normal((d, r))
    return {"A": A.astype(np.float32), "B": B.astype(np.float32), "scaling": ALPHA / r}


def run(args) -> dict:
    import pandas as pd

    from analysis import figures
    from analysis.amplification import amplification_from_factors, stable_seed
    from analysis.linalg import TopSingular
    from analysis.subspace import similarity
    from analysis.tables import per_layer, table7, write_table

    weights = Weights(args.weights, args.d, args.seed)
    ranks = (8, 64)
    timers = {"top_svd": 0.0, "table7_rows": 0.0, "phi": 0.0, "outputs": 0.0}
    cpu_timers = dict.fromkeys(timers, 0.0)
    rows, phis, infos, own_err = [], {}, [], []
    modules = [(layer, kind) for layer in range(args.layers) for kind in ("q", "v")]
    try:
        from tqdm.auto import tqdm

        it = tqdm(modules, desc="Table 7 + Fig. 3", unit="matrix", disable=not sys.stderr.isatty())
    except ImportError:  # pragma: no cover
        it = modules
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    gen_before = weights.gen_time  # weights.get() runs inside the loop; its time is taken out below
    for index, (layer, kind) in enumerate(it):
        W = weights.get(index)
        frng = np.random.default_rng([args.seed, 1000 + index])
        factors = {r: lora_factors(args.d, r, frng) for r in ranks}
        t, c = time.perf_counter(), time.process_time()
        top = TopSingular(W, method=args.svd)
        top.get(max(ranks))  # once per matrix, reused for r = 8
        timers["top_svd"] += time.perf_counter() - t
        cpu_timers["top_svd"] += time.process_time() - c
        infos.append(top.info)
        if weights.spectrum is not None:
            for r in ranks:
                exact = np.sqrt(np.sum(weights.spectrum[:r] ** 2))
                own_err.append(abs(top.own_norm(r) - exact) / exact)
        t, c = time.perf_counter(), time.process_time()
        name = f"model.layers.{layer}.self_attn.{kind}_proj"
        for r in ranks:
            f = factors[r]
            row = amplification_from_factors(top, f["A"], f["B"], f["scaling"], seed=stable_seed(args.seed, name, r))
            rows.append({"label": r, "module": name, "layer": layer, "matrix": kind, **row})
        timers["table7_rows"] += time.perf_counter() - t
        cpu_timers["table7_rows"] += time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        phis[(layer, kind)] = similarity(factors[8]["A"], factors[64]["A"])
        timers["phi"] += time.perf_counter() - t
        cpu_timers["phi"] += time.process_time() - c
        del W, top
    t, c = time.perf_counter(), time.process_time()
    study = pd.DataFrame(rows)
    out = Path(args.figures_dir or tempfile.mkdtemp(prefix="analysis_speed_"))
    mid = args.layers // 2
    write_table(table7(study, layer=mid, matrix="q"), out / "table7")
    pl = per_layer(study)
    write_table(pl, out / "table7_per_layer", digits=4)
    figures.save(figures.table7_plot(pl), out / "table7_per_layer")
    figures.save(figures.figure3(phis[(mid, "q")], phis[(mid, "v")], ranks=ranks, layer=mid), out / "fig3")
    timers["outputs"] = time.perf_counter() - t
    cpu_timers["outputs"] = time.process_time() - c
    elapsed = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    analysis_total = elapsed - (weights.gen_time - gen_before)
    return {
        "benchmark": "LoRA Table 7 + Figure 3 analysis, 32 layers x (Wq, Wv)" if args.layers == 32 else
                     f"LoRA Table 7 + Figure 3 analysis, {args.layers} layers x (Wq, Wv)",
        "weights": args.weights,
        "d": args.d,
        "layers": args.layers,
        "matrices": len(modules),
        "ranks": list(ranks),
        "svd_method": args.svd,
        "analysis_seconds": round(analysis_total, 2),
        # CPU time of this process (all its threads), generation included: with one BLAS thread it is what
        # the run costs on one idle core, whatever else the machine was doing
        "process_cpu_seconds_incl_generation": round(cpu, 2),
        "blas_threads_env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "budget_seconds": 60,
        "within_budget": bool(analysis_total < 60),
        "breakdown_seconds": {k: round(v, 2) for k, v in timers.items()},
        "breakdown_cpu_seconds": {k: round(v, 2) for k, v in cpu_timers.items()},
        "analysis_cpu_seconds": round(sum(cpu_timers.values()), 2),
        "weight_generation_seconds_not_timed": round(weights.gen_time, 2),
        "lanczos": {
            "methods": sorted({i.method for i in infos}),
            "subspace_dim_median": int(np.median([i.subspace_dim for i in infos])),
            "matmuls_median": int(np.median([i.matmuls for i in infos])),
            "all_converged": bool(all(i.converged for i in infos)),
            "max_value_change": float(max(i.value_change for i in infos)),
            "iteration_dtype": sorted({i.iteration_dtype for i in infos}),
        },
        "own_row_max_rel_error_vs_exact": float(max(own_err)) if own_err else None,
        "table7_median": {f"{m} r={r}": {k: round(float(v), 4) for k, v in g.items()} for (m, r), g in
                          study.groupby(["matrix", "r"])[["delta", "own", "random", "random_expected", "factor"]]
                          .median().iterrows()},
        "outputs_dir": str(out),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "load_avg_at_end": list(os.getloadavg())},
        "wall_seconds_including_generation": round(elapsed + gen_before, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", choices=["powerlaw", "gaussian"], default="powerlaw")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--svd", choices=["auto", "full", "lanczos"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figures-dir", default=None, help="where the tables and figures go (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analysis_speed.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    result = run(args)
    lz = result["lanczos"]
    lines = [
        f"{result['benchmark']}, d={result['d']}, weights={result['weights']}, W's SVD: {result['svd_method']}",
        f"{'part':<34}{'wall s':>10}{'CPU s':>10}",
        *(f"{k:<34}{v:>10.2f}{result['breakdown_cpu_seconds'][k]:>10.2f}"
          for k, v in result["breakdown_seconds"].items()),
        f"{'analysis total':<34}{result['analysis_seconds']:>10.2f}{result['analysis_cpu_seconds']:>10.2f}"
        f"   (budget 60 s wall: {'OK' if result['within_budget'] else 'OVER'})",
        f"{'(weight generation, not timed)':<34}{result['weight_generation_seconds_not_timed']:>10.2f}",
        f"BLAS threads: {result['blas_threads_env']['OPENBLAS_NUM_THREADS'] or 'default'}; "
        f"load average at the end {result['machine']['load_avg_at_end'][0]:.1f} on {os.cpu_count()} CPUs",
        f"Lanczos: median subspace dim {lz['subspace_dim_median']}, {lz['matmuls_median']} block products, "
        f"converged {lz['all_converged']}, max value change {lz['max_value_change']:.1e}",
    ]
    if result["own_row_max_rel_error_vs_exact"] is not None:
        lines.append(f"own row vs exact spectrum: max relative error {result['own_row_max_rel_error_vs_exact']:.1e}")
    print("\n".join(lines))
    med = result["table7_median"]
    print(f"{'median over layers':<18}{'ΔW':>10}{'W':>10}{'random':>10}{'r‖W‖/d':>10}{'factor':>10}")
    for k, v in med.items():
        print(f"{k:<18}{v['delta']:>10.3f}{v['own']:>10.3f}{v['random']:>10.3f}{v['random_expected']:>10.3f}"
              f"{v['factor']:>10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    existing[f"{result['weights']}_{result['layers']}x2_d{result['d']}_{result['svd_method']}"] = result
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
