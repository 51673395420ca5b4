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


def _threads_from_argv(default: str = "1") -> str:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return default


# BLAS threads must be fixed before numpy loads. Default 1: the work streams W from memory (bandwidth-
# bound), and on a shared 2-core machine a second spinning BLAS thread makes it many times slower.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _threads_from_argv())

import numpy as np  # noqa: E402

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
            W = np.ascontiguousarray(self._base[p1][:, p2] * s1[:, None] * s2[None, :])  # C order, as loaded
        self.gen_time += time.perf_counter() - t
        return W


def lora_factors(d, r, rng):
    A = rng.standard_normal((r, d)) / np.sqrt(d)
    B = 0.02 * rng.standard_normal((d, r))
    return {"A": A.astype(np.float32), "B": B.astype(np.float32), "scaling": ALPHA / r}


def _cpu_now() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(args) -> dict:
    import pandas as pd

    from analysis import figures
    from analysis.amplification import amplification_study
    from analysis.linalg import TopSingular
    from analysis.subspace import similarity
    from analysis.tables import per_layer, table7, write_table

    ranks = (8, 64)
    modules = [(layer, kind) for layer in range(args.layers) for kind in ("q", "v")]
    names = [f"model.layers.{layer}.self_attn.{kind}_proj" for layer, kind in modules]
    # inputs first, not timed: a real analysis reads them from the runs (4.3 GB of float32 for 64 W's)
    weights = Weights(args.weights, args.d, args.seed)
    base, updates = {}, {r: {} for r in ranks}
    for index, name in enumerate(names):
        base[name] = weights.get(index)
        frng = np.random.default_rng([args.seed, 1000 + index])
        for r in ranks:
            updates[r][name] = lora_factors(args.d, r, frng)

    timers, cpu_timers = {}, {}
    t_start, cpu_start = time.perf_counter(), _cpu_now()
    t, c = t_start, cpu_start
    study = amplification_study(base, updates, seed=args.seed, jobs=args.jobs, top_kwargs={"method": args.svd},
                                progress=sys.stderr.isatty())
    timers["table7 (W's top-64 SVD + rows)"], cpu_timers["table7 (W's top-64 SVD + rows)"] = (
        time.perf_counter() - t, _cpu_now() - c)
    t, c = time.perf_counter(), _cpu_now()
    phis = {(layer, kind): similarity(updates[8][n]["A"], updates[64][n]["A"]) for (layer, kind), n in
            zip(modules, names)}
    timers["fig3 phi (all layers)"], cpu_timers["fig3 phi (all layers)"] = time.perf_counter() - t, _cpu_now() - c
    t, c = time.perf_counter(), _cpu_now()
    out = Path(args.figures_dir or tempfile.mkdtemp(prefix="analysis_speed_"))
    mid = args.layers // 2
    write_table(table7(study, layer=mid, matrix="q"), out / "table7", digits=3)
    pl = per_layer(study)
    write_table(pl, out / "table7_per_layer", digits=4)
    figures.save(figures.table7_plot(pl), out / "table7_per_layer")
    figures.save(figures.figure3(phis[(mid, "q")], phis[(mid, "v")], ranks=ranks, layer=mid), out / "fig3")
    timers["outputs (tables, 2 figures)"], cpu_timers["outputs (tables, 2 figures)"] = (
        time.perf_counter() - t, _cpu_now() - c)
    analysis_total = time.perf_counter() - t_start
    analysis_cpu = _cpu_now() - cpu_start

    # accuracy of the truncated SVD: exact spectrum known for the power-law weights (not timed)
    own_err = None
    if weights.spectrum is not None:
        own_err = max(abs(row["own"] - np.sqrt(np.sum(weights.spectrum[: int(row["r"])] ** 2)))
                      / np.sqrt(np.sum(weights.spectrum[: int(row["r"])] ** 2)) for _, row in study.iterrows())
    probe = TopSingular(base[names[0]], method=args.svd)
    probe.get(max(ranks))
    info = probe.info
    return {
        "benchmark": f"LoRA Table 7 + Figure 3 analysis, {args.layers} layers x (Wq, Wv), d={args.d}",
        "weights": args.weights,
        "d": args.d,
        "layers": args.layers,
        "matrices": len(modules),
        "ranks": list(ranks),
        "svd_method": args.svd,
        "jobs": args.jobs,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "analysis_seconds": round(analysis_total, 2),
        # CPU time of this process and its workers over the timed part: what it costs on idle cores
        "analysis_cpu_seconds": round(analysis_cpu, 2),
        "budget_seconds": 60,
        "within_budget": bool(analysis_total < 60),
        "breakdown_seconds": {k: round(v, 2) for k, v in timers.items()},
        "breakdown_cpu_seconds": {k: round(v, 2) for k, v in cpu_timers.items()},
        "input_generation_seconds_not_timed": round(weights.gen_time, 2),
        "lanczos_probe": {"method": info.method, "subspace_dim": info.subspace_dim, "matmuls": info.matmuls,
                          "converged": info.converged, "value_change": info.value_change,
                          "iteration_dtype": info.iteration_dtype},
        "own_row_max_rel_error_vs_exact": float(own_err) if own_err is not None else None,
        "table7_median": {f"{m} r={r}": {k: round(float(v), 4) for k, v in g.items()} for (m, r), g in
                          study.groupby(["matrix", "r"])[["delta", "own", "random", "random_expected", "factor"]]
                          .median().iterrows()},
        "outputs_dir": str(out),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "load_avg_before": None, "load_avg_at_end": list(os.getloadavg())},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", choices=["powerlaw", "gaussian"], default="powerlaw")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--svd", choices=["auto", "full", "lanczos"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="1", help="BLAS threads (read before numpy loads; default 1)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for Table 7 (default 2: the 2 cores)")
    p.add_argument("--figures-dir", default=None, help="where the tables and figures go (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analysis_speed.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    load_before = list(os.getloadavg())
    result = run(args)
    result["machine"]["load_avg_before"] = load_before
    lz = result["lanczos_probe"]
    lines = [
        f"{result['benchmark']}, weights={result['weights']}, W's SVD: {result['svd_method']}, "
        f"{result['jobs']} worker process(es) x {result['blas_threads']} BLAS thread(s)",
        f"{'part':<36}{'wall s':>10}{'CPU s':>10}",
        *(f"{k:<36}{v:>10.2f}{result['breakdown_cpu_seconds'][k]:>10.2f}"
          for k, v in result["breakdown_seconds"].items()),
        f"{'analysis total':<36}{result['analysis_seconds']:>10.2f}{result['analysis_cpu_seconds']:>10.2f}"
        f"   (budget 60 s wall: {'OK' if result['within_budget'] else 'OVER'})",
        f"{'(inputs generated first, not timed)':<36}{result['input_generation_seconds_not_timed']:>10.2f}",
        f"load average before/after: {load_before[0]:.1f} / {result['machine']['load_avg_at_end'][0]:.1f} "
        f"on {os.cpu_count()} CPUs",
        f"Lanczos (one matrix): subspace dim {lz['subspace_dim']}, {lz['matmuls']} block products, "
        f"converged {lz['converged']}, last Ky Fan rise {lz['value_change']:.1e}",
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
    key = (f"{result['weights']}_{result['layers']}x2_d{result['d']}_{result['svd_method']}"
           f"_jobs{args.jobs}_threads{args.threads}")
    existing[key] = result
    from experiments.portable import portable

    out.write_text(json.dumps(portable(existing), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
