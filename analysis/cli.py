"""`python -m analysis <analysis> <run or sweep dirs> [options]`: the papers' figures and tables from runs.

    subspace       LoRA Fig. 3   φ(A_{r=8}, A_{r=64}, i, j) for Wq, Wv at one layer (+ 8×8 zoom)
    seeds          LoRA Fig. 4   φ(A_{r=64}, A'_{r=64}) across two seeds, with a random Gaussian panel
    layers         LoRA Figs. 6-7  the same for several layers
    wsubspace      LoRA Fig. 8   W's top-i right singular directions against A's, several r and random
    amplification  LoRA Table 7  ‖UᵀWVᵀ‖_F for ΔW / W / random directions, the factor, per layer
    decomposition  DoRA Fig. 2   ΔM vs ΔD over checkpoints for FT, LoRA, DoRA runs, with correlations
    tables         LoRA Tables 5-6  metric by adapted matrices (budget-matched) and by rank

Output goes to <sweep>/analysis/<analysis>/ (or --out): PNG + PDF figures, markdown/LaTeX/CSV tables,
the raw arrays (.npz) and summary.json; mirrored to W&B when the runs were configured for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from lowrank.atomic import write_json

__all__ = ["main", "build_parser", "ANALYSES"]

METHOD_NAMES = {"full": "FT", "ft": "FT", "lora": "LoRA", "dora": "DoRA"}


class UsageError(Exception):
    """A bad input the user can fix; printed as one line."""


# ----------------------------------------------------------------------------------------------- helpers


def _progress(args) -> bool:
    return not args.no_progress and sys.stderr.isatty() or args.progress


def _out_dir(args, infos, name: str) -> Path:
    from analysis.inputs import sweep_root

    root = Path(args.out) if args.out else sweep_root(args.paths, infos) / "analysis"
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def _lora_runs(infos, adapter: str | None = None):
    """The low-rank runs of one adapter: `adapter`, else LoRA when present, else the only one there is."""
    runs = [i for i in infos if i.rank is not None and i.adapter.lower() not in ("full", "ft", "head", "bitfit")]
    if not runs:
        have = sorted({(i.adapter, i.rank) for i in infos}, key=str)
        raise UsageError(f"no low-rank adapter runs among the inputs (adapter, rank) = {have}; pass LoRA run dirs")
    names = sorted({i.adapter.lower() for i in runs})
    want = adapter.lower() if adapter else ("lora" if "lora" in names else names[0] if len(names) == 1 else None)
    if want is None:
        raise UsageError(f"the inputs mix adapters {names}; pick one with --adapter")
    picked = [i for i in runs if i.adapter.lower() == want]
    if not picked:
        raise UsageError(f"--adapter {adapter} has no runs; adapters present: {names}")
    return picked


def _A_by_layer(info, factor: str = "A"):
    """{(layer, kind): a matrix whose right singular vectors are the directions compared}: A (r, in) as in
    the paper; Bᵀ (r, out) for footnote 7's variant (right singular vectors of Bᵀ = left ones of B); or
    Σ·Vh of ΔW = s·B·A (r, in), i.e. ΔW's right singular directions in ΔW's own order."""
    from analysis.inputs import by_layer

    factors = info.run.factors()
    if not factors:
        raise UsageError(f"run {info.dir} has no LoRA factors (adapter {info.adapter!r}); use a lora/dora run")
    if factor == "B":
        return by_layer({m: f["B"].T for m, f in factors.items()})
    if factor == "dW":  # ΔW's own right singular directions, ordered by ΔW's singular values (Σ Vh, r × in)
        from analysis.amplification import factored_directions

        def rows(f):
            d = factored_directions(f["A"], f["B"], float(f.get("scaling") or 1.0))
            return d.s[:, None] * d.Vh

        return by_layer({m: rows(f) for m, f in factors.items()})
    return by_layer({m: f["A"] for m, f in factors.items()})


def _need(table, key, info, what):
    if key not in table:
        layer, kind = key
        have = sorted(table)
        raise UsageError(
            f"{what}: run {info.dir.name} has no adapted {kind!r} matrix at layer {layer} (has {have[:8]}...); "
            f"pick --layer from those or re-run with targets=[q,v]"
        )
    return table[key]


def _middle(layers):
    return layers[len(layers) // 2]


def _pick_pair_seed(runs, r1, r2, seed):
    """A seed with runs at both ranks (the requested one, else the lowest)."""
    from analysis.inputs import select

    if seed is not None:
        return select(runs, rank=r1, seed=seed)[0], select(runs, rank=r2, seed=seed)[0]
    s1 = {i.seed for i in runs if i.rank == r1}
    s2 = {i.seed for i in runs if i.rank == r2}
    common = sorted(s for s in s1 & s2 if s is not None)
    if not common:
        raise UsageError(f"no seed has runs at both r={r1} and r={r2} (seeds {sorted(s1, key=str)} vs {sorted(s2, key=str)})")
    return select(runs, rank=r1, seed=common[0])[0], select(runs, rank=r2, seed=common[0])[0]


def _two_ranks(runs, ranks):
    have = sorted({i.rank for i in runs})
    if ranks:
        missing = [r for r in ranks if r not in have]
        if missing:
            raise UsageError(f"--ranks {missing} not among the runs' ranks {have}; sweep rank=8,64 or pick from {have}")
        return tuple(ranks)
    if len(have) < 2:
        raise UsageError(f"need runs at two ranks (e.g. rank=8,64), the inputs have only r={have}")
    return have[0], have[-1]


def _two_seeds(runs, rank, seeds):
    from analysis.inputs import select

    at = select(runs, rank=rank)
    have = sorted({i.seed for i in at if i.seed is not None})
    if seeds:
        missing = [s for s in seeds if s not in have]
        if missing:
            raise UsageError(f"--seeds {missing} have no r={rank} run; seeds available at r={rank}: {have}")
        s1, s2 = seeds
    elif len(have) < 2:
        raise UsageError(f"need two seeds at r={rank} (e.g. seed=0,1), the inputs have {have}")
    else:
        s1, s2 = have[:2]
    return select(at, seed=s1)[0], select(at, seed=s2)[0]


def _write_summary(out: Path, summary: dict) -> Path:
    return write_json(out / "summary.json", summary)


def _finish(args, infos, name, out, files, summary, tables=None):
    from analysis.wandb_log import log_outputs, wandb_settings

    files = list(files) + [_write_summary(out, summary)]
    settings = wandb_settings([i.run.config or {} for i in infos], args.wandb)
    logged = log_outputs(settings, analysis=name, out_dir=out, files=files, tables=tables, summary=_flat(summary),
                         config={"inputs": [str(i.dir) for i in infos]})
    for f in files:
        print(f)
    if logged:
        print(f"logged to W&B ({settings['mode']}) project {settings['project']}")
    return 0


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def _load(args):
    from analysis.inputs import load_runs

    return load_runs(args.paths, progress=_progress(args))


# ------------------------------------------------------------------------------------------- analyses


def run_subspace(args) -> int:
    from analysis import figures
    from analysis.subspace import similarity

    infos = _load(args)
    runs = _lora_runs(infos, args.adapter)
    r1, r2 = _two_ranks(runs, args.ranks)
    small, large = _pick_pair_seed(runs, r1, r2, args.seed)
    A1, A2 = _A_by_layer(small, args.factor), _A_by_layer(large, args.factor)
    layers = sorted({layer for layer, _ in A1} & {layer for layer, _ in A2})
    layer = args.layer if args.layer is not None else _middle(layers)
    phi = {k: similarity(_need(A1, (layer, k), small, "subspace"), _need(A2, (layer, k), large, "subspace"))
           for k in "qv"}
    out = _out_dir(args, infos, "subspace")
    stem = out / f"fig3_layer{layer}"
    files = figures.save(figures.figure3(phi["q"], phi["v"], ranks=(r1, r2), layer=layer, factor=args.factor), stem)
    np.savez(stem.with_suffix(".npz"), phi_q=phi["q"], phi_v=phi["v"])
    files.append(stem.with_suffix(".npz"))
    summary = {
        "figure": "LoRA Figure 3", "factor": args.factor, "layer": layer, "ranks": [r1, r2], "seed": small.seed,
        "runs": [str(small.dir), str(large.dir)],
        "phi_11": {k: float(phi[k][0, 0]) for k in "qv"},
        "phi_top1_overlap_gt_0.5": {k: bool(phi[k][0, 0] > 0.5) for k in "qv"},
        "phi_full": {k: float(phi[k][-1, -1]) for k in "qv"},
        "chance_level_max": float(max(r1, r2) / A1[(layer, "q")].shape[1]),
    }
    print(f"layer {layer}: φ(1,1) q={phi['q'][0, 0]:.3f} v={phi['v'][0, 0]:.3f} (paper: > 0.5 for both)")
    return _finish(args, infos, "subspace", out, files, summary)


def run_seeds(args) -> int:
    from analysis import figures
    from analysis.subspace import random_gaussian_similarity, similarity

    infos = _load(args)
    runs = _lora_runs(infos, args.adapter)
    rank = args.rank or max(i.rank for i in runs)
    a, b = _two_seeds(runs, rank, args.seeds)
    Aa, Ab = _A_by_layer(a, args.factor), _A_by_layer(b, args.factor)
    layers = sorted({layer for layer, _ in Aa} & {layer for layer, _ in Ab})
    layer = args.layer if args.layer is not None else _middle(layers)
    phi = {k: similarity(_need(Aa, (layer, k), a, "seeds"), _need(Ab, (layer, k), b, "seeds")) for k in "qv"}
    shape = np.shape(Aa[(layer, "q")])
    rand = random_gaussian_similarity(tuple(shape), seed=args.random_seed)
    out = _out_dir(args, infos, "seeds")
    stem = out / f"fig4_layer{layer}"
    files = figures.save(figures.figure4(phi["q"], phi["v"], rand, rank=rank, layer=layer, factor=args.factor), stem)
    np.savez(stem.with_suffix(".npz"), phi_q=phi["q"], phi_v=phi["v"], phi_random=rand)
    files.append(stem.with_suffix(".npz"))
    summary = {
        "figure": "LoRA Figure 4", "factor": args.factor, "layer": layer, "rank": rank, "seeds": [a.seed, b.seed],
        "runs": [str(a.dir), str(b.dir)],
        "phi_11": {k: float(phi[k][0, 0]) for k in "qv"},
        "mean_phi": {**{k: float(phi[k].mean()) for k in "qv"}, "random": float(rand.mean())},
        "random_max": float(rand.max()),
    }
    print(f"layer {layer}: mean φ q={phi['q'].mean():.3f} v={phi['v'].mean():.3f} random={rand.mean():.3f}")
    return _finish(args, infos, "seeds", out, files, summary)


def _spread_layers(layers, n=4):
    if len(layers) <= n:
        return list(layers)
    idx = np.unique(np.round(np.linspace(0, len(layers) - 1, n)).astype(int))
    return [layers[i] for i in idx]


def run_layers(args) -> int:
    from analysis import figures
    from analysis.subspace import similarity

    infos = _load(args)
    runs = _lora_runs(infos, args.adapter)
    out = _out_dir(args, infos, "layers")
    files, summary = [], {"figures": "LoRA Figures 6 and 7"}
    made = False
    try:
        r1, r2 = _two_ranks(runs, args.ranks)
        small, large = _pick_pair_seed(runs, r1, r2, args.seed)
        A1, A2 = _A_by_layer(small, args.factor), _A_by_layer(large, args.factor)
        layers = args.layers or _spread_layers(sorted({layer for layer, _ in A1} & {layer for layer, _ in A2}))
        phis = {L: tuple(similarity(_need(A1, (L, k), small, "layers"), _need(A2, (L, k), large, "layers"))
                         for k in "qv") for L in layers}
        files += figures.save(figures.figure6(phis, ranks=(r1, r2), factor=args.factor), out / "fig6")
        np.savez(out / "fig6.npz", **{f"phi_{k}_layer{L}": phis[L][i] for L in layers for i, k in enumerate("qv")})
        files.append(out / "fig6.npz")
        summary["fig6"] = {"ranks": [r1, r2], "layers": layers,
                           "phi_11": {str(L): {k: float(phis[L][i][0, 0]) for i, k in enumerate("qv")} for L in layers}}
        made = True
    except (UsageError, LookupError) as e:
        print(f"Figure 6 skipped: {e}", file=sys.stderr)
    try:
        rank = args.rank or max(i.rank for i in runs)
        a, b = _two_seeds(runs, rank, args.seeds)
        Aa, Ab = _A_by_layer(a, args.factor), _A_by_layer(b, args.factor)
        layers = args.layers or _spread_layers(sorted({layer for layer, _ in Aa} & {layer for layer, _ in Ab}))
        phis = {L: tuple(similarity(_need(Aa, (L, k), a, "layers"), _need(Ab, (L, k), b, "layers")) for k in "qv")
                for L in layers}
        files += figures.save(figures.figure7(phis, rank=rank, factor=args.factor), out / "fig7")
        np.savez(out / "fig7.npz", **{f"phi_{k}_layer{L}": phis[L][i] for L in layers for i, k in enumerate("qv")})
        files.append(out / "fig7.npz")
        grid = np.arange(1, rank + 1)
        d = Aa[(layers[0], "q")].shape[1]
        summary["fig7"] = {"rank": rank, "seeds": [a.seed, b.seed], "layers": layers,
                           "mean_phi": {str(L): {k: float(phis[L][i].mean()) for i, k in enumerate("qv")}
                                        for L in layers},
                           # two random subspaces: E φ(i, j) = max(i, j)/d, averaged over the grid
                           "chance_mean_phi": float(np.maximum.outer(grid, grid).mean() / d)}
        made = True
    except (UsageError, LookupError) as e:
        print(f"Figure 7 skipped: {e}", file=sys.stderr)
    if not made:
        raise UsageError("neither Figure 6 (two ranks, one seed) nor Figure 7 (two seeds, one rank) can be drawn "
                         "from these runs; sweep rank=8,64 seed=0,1")
    return _finish(args, infos, "layers", out, files, summary)


def _one_run_per_rank(args, runs):
    """(ranks, seed, {rank: run}): the asked-for ranks (default all) of one seed (default the lowest)."""
    from analysis.inputs import select

    ranks = sorted({i.rank for i in runs}) if not args.ranks else list(args.ranks)
    seed = args.seed if args.seed is not None else min((i.seed for i in runs if i.seed is not None), default=None)
    return ranks, seed, {r: select(runs, rank=r, seed=seed)[0] for r in ranks}


def run_wsubspace(args) -> int:
    from analysis import figures
    from analysis.inputs import by_layer, select
    from analysis.linalg import TopSingular
    from analysis.subspace import similarity_from_bases, right_singular_basis

    infos = _load(args)
    ranks, seed, chosen = _one_run_per_rank(args, _lora_runs(infos, args.adapter))
    first = next(iter(chosen.values()))
    base = by_layer(first.run.base_weights())
    As = {r: _A_by_layer(info) for r, info in chosen.items()}
    layers = sorted({layer for layer, _ in base})
    layer = args.layer if args.layer is not None else _middle(layers)
    key = (layer, args.matrix)
    W = _need(base, key, first, "wsubspace")
    top = TopSingular(W)
    d = top.shape[1]
    n_top = args.top or int(np.ceil(0.1 * d))
    VW = top.right(n_top)
    phis = {f"r={r}": similarity_from_bases(VW, right_singular_basis(_need(As[r], key, chosen[r], "wsubspace")))
            for r in ranks}
    rmax = max(ranks)
    rng = np.random.default_rng(args.random_seed)
    phis["rand"] = similarity_from_bases(VW, right_singular_basis(rng.standard_normal((rmax, d))))
    out = _out_dir(args, infos, "wsubspace")
    stem = out / f"fig8_layer{layer}_{args.matrix}"
    fig = figures.figure8(phis, kind=args.matrix, vmin=args.vmin, vmax=args.vmax, i_start=args.i_start, layer=layer)
    files = figures.save(fig, stem)
    np.savez(stem.with_suffix(".npz"), **{k.replace("=", ""): v for k, v in phis.items()})
    files.append(stem.with_suffix(".npz"))
    summary = {
        "figure": "LoRA Figure 8", "layer": layer, "matrix": args.matrix, "top_i": n_top, "d": d,
        "runs": {str(r): str(chosen[r].dir) for r in ranks},
        # the paper's reading: similarity of A's top-4 (or fewer) directions with W's top 10%
        "phi_at_top_i": {k: {f"j={j}": float(v[-1, j - 1]) for j in sorted({1, min(4, v.shape[1]), v.shape[1]})}
                         for k, v in phis.items()},
        "chance_level_at_top_i": float(n_top / d),
    }
    for k, v in phis.items():
        print(f"{k}: φ(i={n_top}, j=1..{v.shape[1]}) max {v[-1].max():.3f} (chance {n_top / d:.3f})")
    return _finish(args, infos, "wsubspace", out, files, summary)


def run_amplification(args) -> int:
    from analysis import figures
    from analysis.amplification import amplification_study
    from analysis.inputs import select
    from analysis.names import parse_module_name
    from analysis.tables import PAPER_TABLE7, per_layer, table7, write_table

    infos = _load(args)
    ranks, seed, chosen = _one_run_per_rank(args, _lora_runs(infos, args.adapter))
    models = {i.model for i in chosen.values()}
    if len(models) > 1:
        raise UsageError(f"runs use different base models {sorted(map(str, models))}; analyse one model at a time")
    first = next(iter(chosen.values()))
    base = first.run.base_weights()
    updates = {}
    for r, info in chosen.items():
        if info.adapter.lower() == "lora":
            updates[r] = info.run.factors()
        else:  # DoRA etc.: ΔW is not scaling·BA; use the formed update and project on its top-r
            updates[r] = info.run.deltas()
    kinds = set(args.matrices)
    modules = sorted({m for upd in updates.values() for m in upd if parse_module_name(m)[1] in kinds and m in base})
    if not modules:
        raise UsageError(f"no adapted {sorted(kinds)} modules with base weights; pass --matrices from q k v o")
    updates = {r: {m: u for m, u in upd.items() if m in modules} for r, upd in updates.items()}
    if all(i.adapter.lower() == "lora" for i in chosen.values()):
        study = amplification_study(base, updates, seed=args.random_seed, progress=_progress(args),
                                    top_kwargs={"method": args.svd})
    else:
        study = _study_formed(base, updates, modules, args)
    out = _out_dir(args, infos, "amplification")
    layers = sorted(study["layer"].dropna().unique())
    layer = args.layer if args.layer is not None else int(_middle(layers))
    matrix = args.matrices[0]
    t7 = table7(study, layer=layer, matrix=matrix)
    files = write_table(t7, out / f"table7_layer{layer}_{matrix}", digits=3, caption=(
        f"Table 7 on {first.model or 'the model'}, W{matrix} of layer {layer}: ‖UᵀWVᵀ‖_F with U, V the top-r "
        "singular directions of ΔW, of W, or random"))
    files += write_table(PAPER_TABLE7, out / "table7_paper", caption="Table 7 of the LoRA paper (GPT-3 175B, layer 48 Wq)")
    pl = per_layer(study)
    files += write_table(pl, out / "table7_per_layer", digits=4)
    files += figures.save(figures.table7_plot(pl, matrices=args.matrices), out / "table7_per_layer")
    med = pl.groupby(["matrix", "r"])[["delta", "own", "random", "random_expected", "factor"]].median()
    summary = {
        "table": "LoRA Table 7", "layer": layer, "matrix": matrix, "ranks": ranks, "seed": seed,
        "runs": {str(r): str(chosen[r].dir) for r in ranks},
        "at_layer": {f"r={int(row['r'])}": {k: float(row[k]) for k in
                                            ("delta", "own", "random", "random_expected", "norm_W", "norm_delta", "factor")}
                     for _, row in study[(study["layer"] == layer) & (study["matrix"] == matrix)].iterrows()},
        "median_over_layers": {f"{m} r={r}": {k: float(v) for k, v in row.items()} for (m, r), row in med.iterrows()},
    }
    print(t7.round(3).to_string())
    return _finish(args, infos, "amplification", out, files, summary, tables={"table7": t7, "per_layer": pl})


def _study_formed(base, updates, modules, args):
    from analysis.amplification import amplification_study

    frames = []
    for r, upd in updates.items():
        frames.append(amplification_study(base, {r: {m: upd[m] for m in modules if m in upd}}, r=r,
                                          seed=args.random_seed, progress=_progress(args),
                                          top_kwargs={"method": args.svd}))
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def run_decomposition(args) -> int:
    import pandas as pd

    from analysis import figures
    from analysis.decomposition import correlations, trajectory
    from analysis.tables import write_table

    infos = _load(args)
    by_method: dict[str, list] = {}
    for info in infos:
        method = METHOD_NAMES.get(info.adapter.lower())
        if method is not None:
            by_method.setdefault(method, []).append(info)
    # one run per method, as in the paper: the chosen (or lowest) seed; LoRA at DoRA's rank (or --rank)
    dora_rank = min((i.rank for i in by_method.get("DoRA", []) if i.rank), default=None)
    chosen = []
    for method, runs in by_method.items():
        seed = args.seed if args.seed is not None else min((i.seed for i in runs if i.seed is not None), default=None)
        runs = [i for i in runs if seed is None or i.seed == seed]
        if method != "FT":
            want = args.rank or dora_rank or min((i.rank for i in runs if i.rank), default=None)
            runs = [i for i in runs if want is None or i.rank == want] or runs
        if runs:
            chosen.append((method, runs[0]))
    frames = []
    for method, info in chosen:
        traj = {s: w for s, w in info.run.weight_trajectory().items() if s != 0 or args.include_step0}
        if len(traj) < 2:
            print(f"{info.dir.name}: {len(traj)} saved step(s), skipped; train with trainer.save_weights_at=[...]",
                  file=sys.stderr)
            continue
        base = info.run.base_weights()
        df = trajectory(base, traj, kinds=[args.matrix], method=method)
        df["run"] = str(info.dir)
        frames.append(df)
    if not frames:
        have = sorted({i.adapter for i in infos})
        raise UsageError(f"no FT/LoRA/DoRA runs with >= 2 saved weight steps among adapters {have}; "
                         "run adapter=full,lora,dora with trainer.save_weights_at=[...]")
    df = pd.concat(frames, ignore_index=True)
    corr = correlations(df)
    out = _out_dir(args, infos, "decomposition")
    files = figures.save(figures.dora_figure2(df, kind=args.matrix), out / f"dora_fig2_{args.matrix}")
    df.to_csv(out / f"dora_fig2_{args.matrix}_points.csv", index=False)
    files.append(out / f"dora_fig2_{args.matrix}_points.csv")
    files += write_table(corr.set_index("method"), out / f"dora_fig2_{args.matrix}_correlations", digits=3,
                         caption=f"Pearson correlation of ΔD and ΔM (W{args.matrix}); paper: FT −0.62, DoRA −0.31, LoRA +0.83")
    summary = {"figure": "DoRA Figure 2", "matrix": args.matrix,
               "runs": {m: str(i.dir) for m, i in chosen},
               "pearson_r": {r["method"]: float(r["pearson_r"]) for _, r in corr.iterrows()},
               "slope": {r["method"]: float(r["slope"]) for _, r in corr.iterrows()},
               "points": {r["method"]: int(r["points"]) for _, r in corr.iterrows()}}
    print(corr.round(3).to_string(index=False))
    return _finish(args, infos, "decomposition", out, files, summary, tables={"correlations": corr})


def run_tables(args) -> int:
    from analysis.inputs import load_sweep_table, sweep_root
    from analysis.tables import PAPER_TABLE5, PAPER_TABLE6, side_by_side, table5, table6, write_table

    df = load_sweep_table(args.paths)
    root = Path(args.out) if args.out else sweep_root(args.paths) / "analysis"
    out = root / "tables"
    out.mkdir(parents=True, exist_ok=True)
    files, summary, tables = [], {"tables": "LoRA Tables 5 and 6"}, {}
    kw = dict(targets_col=args.targets_col, rank_col=args.rank_col, task_col=args.task_col)
    try:
        t5 = table5(df, args.metric, budget=args.budget, **kw)
        files += write_table(t5, out / "table5", caption=f"Table 5: weight types at a budget of {t5.attrs['budget']} rank units per layer")
        files += write_table(side_by_side(t5, PAPER_TABLE5), out / "table5_vs_paper")
        summary["table5_budget"] = int(t5.attrs["budget"])
        tables["table5"] = t5
        print(t5.to_string())
    except (ValueError, KeyError) as e:
        print(f"Table 5 skipped: {e}", file=sys.stderr)
    t6 = table6(df, args.metric, **kw)
    files += write_table(t6, out / "table6", caption="Table 6: metric by rank r")
    files += write_table(side_by_side(t6, PAPER_TABLE6), out / "table6_vs_paper")
    tables["table6"] = t6
    print(t6.to_string())

    from analysis.wandb_log import log_outputs, wandb_settings

    files.append(_write_summary(out, summary))
    # a sweep table carries no logger config: W&B only when asked for explicitly
    settings = wandb_settings([], args.wandb) if args.wandb in ("offline", "online") else None
    log_outputs(settings, analysis="tables", out_dir=out, files=files, tables=tables, summary=summary)
    for f in files:
        print(f)
    return 0


ANALYSES = {
    "subspace": (run_subspace, "LoRA Figure 3: φ(A_{r=8}, A_{r=64}) for Wq and Wv at one layer"),
    "seeds": (run_seeds, "LoRA Figure 4: φ across two seeds at r=64, with a random Gaussian panel"),
    "layers": (run_layers, "LoRA Figures 6-7: Figures 3-4 for several layers"),
    "wsubspace": (run_wsubspace, "LoRA Figure 8: W's top singular directions against A's"),
    "amplification": (run_amplification, "LoRA Table 7: ΔW vs W amplification, per layer"),
    "decomposition": (run_decomposition, "DoRA Figure 2: magnitude vs direction over checkpoints"),
    "tables": (run_tables, "LoRA Tables 5-6 from a sweep's aggregate table"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, (_, help_) in ANALYSES.items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("paths", nargs="+", help="run directories and/or sweep directories")
        s.add_argument("--out", help="output directory (default: <sweep>/analysis)")
        s.add_argument("--wandb", choices=["auto", "off", "offline", "online"], default="auto",
                       help="mirror to W&B: auto = when the runs used the wandb logger (default)")
        s.add_argument("--progress", action="store_true", help="progress bars even when not on a terminal")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.add_argument("--seed", type=int, default=None, help="which training seed's runs to use")
        s.add_argument("--random-seed", type=int, default=0, help="seed of the random baselines")
        if name not in ("decomposition", "tables"):
            s.add_argument("--adapter", default=None, help="adapter whose runs to use (default: lora when present)")
        if name in ("subspace", "seeds", "layers"):
            s.add_argument("--factor", choices=["A", "B", "dW"], default="A",
                           help="A: right singular vectors of A (the paper); B: left singular vectors of B (fn. 7); "
                                "dW: right singular vectors of ΔW = sBA")
        if name in ("subspace", "seeds", "wsubspace", "amplification"):
            s.add_argument("--layer", type=int, default=None, help="module layer index (default: the middle layer)")
        if name in ("subspace", "layers", "wsubspace", "amplification"):
            s.add_argument("--ranks", type=int, nargs="+", default=None, help="ranks to compare (default: all/min+max)")
        if name in ("seeds", "layers"):
            s.add_argument("--rank", type=int, default=None, help="rank of the two-seed comparison (default: max)")
            s.add_argument("--seeds", type=int, nargs=2, default=None, help="the two seeds (default: the two lowest)")
        if name == "layers":
            s.add_argument("--layers", type=int, nargs="+", default=None, help="layers (default: 4 spread out)")
        if name == "wsubspace":
            s.add_argument("--matrix", choices=list("qkvo"), default="q")
            s.add_argument("--top", type=int, default=None, help="W's top-i directions shown (default: 10%% of d)")
            s.add_argument("--i-start", type=int, default=1, help="first i row shown")
            s.add_argument("--vmin", type=float, default=0.1, help="colour bar minimum (paper: 0.1)")
            s.add_argument("--vmax", type=float, default=0.2, help="colour bar maximum (paper: 0.2)")
        if name == "amplification":
            s.add_argument("--matrices", nargs="+", choices=list("qkvo"), default=["q", "v"],
                           help="matrix kinds (the first one is tabulated in the paper layout)")
            s.add_argument("--svd", choices=["auto", "full", "lanczos"], default="auto",
                           help="W's top-r SVD: exact, truncated (Lanczos), or auto by size")
        if name == "decomposition":
            s.add_argument("--matrix", choices=list("qkvo"), default="q", help="q = DoRA Fig. 2, v = Fig. 7")
            s.add_argument("--rank", type=int, default=None, help="LoRA/DoRA rank to use (default: DoRA's)")
            s.add_argument("--include-step0", action="store_true",
                           help="keep step 0 (W = W0, so ΔM = ΔD = 0) in the scatter")
        if name == "tables":
            s.add_argument("--metric", default=None, help="metric column (default: the accuracy-like one)")
            s.add_argument("--budget", type=int, default=None, help="rank units per layer for Table 5 (e.g. 8)")
            s.add_argument("--targets-col", default="targets")
            s.add_argument("--rank-col", default="rank")
            s.add_argument("--task-col", default="task")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    args = build_parser().parse_args(argv)
    fn = ANALYSES[args.analysis][0]
    try:
        return fn(args)
    except BrokenPipeError:  # output piped into `head`: the files are written, stop quietly
        sys.stderr.close()
        return 0
    except (UsageError, ValueError, KeyError, LookupError, FileNotFoundError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"python -m analysis {args.analysis}: error: {msg}", file=sys.stderr)
        return 2
