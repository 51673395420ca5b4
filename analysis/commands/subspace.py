"""LoRA Figures 3, 4, 6-7 and 8: subspace similarity of the learned factors (arXiv 2106.09685 §7.2-7.3)."""

from __future__ import annotations

import sys

import numpy as np

from analysis import figures
from analysis.commands import Produced
from analysis.selection import (UsageError, directions_by_layer, factor_runs, load, middle, need, one_run_per_rank,
                                out_dir, pick_pair_seed, spread_layers, two_ranks, two_seeds)
from analysis.subspace import random_gaussian_similarity, similarity
from analysis.summaries import LayersSummary, SeedsSummary, SubspaceSummary, WSubspaceSummary


def _produced(summary, out, files, infos, tables=None) -> Produced:
    return Produced(summary, out, files, tables, [i.run.config or {} for i in infos], [str(i.dir) for i in infos])


def _save_npz(stem, **arrays):
    np.savez(stem.with_suffix(".npz"), **arrays)
    return stem.with_suffix(".npz")


def subspace(args) -> Produced:
    infos = load(args)
    runs = factor_runs(infos, args.adapter)
    r1, r2 = two_ranks(runs, args.ranks)
    small, large = pick_pair_seed(runs, r1, r2, args.seed)
    A1, A2 = directions_by_layer(small, args.factor), directions_by_layer(large, args.factor)
    layers = sorted({layer for layer, _ in A1} & {layer for layer, _ in A2})
    layer = args.layer if args.layer is not None else middle(layers)
    phi = {k: similarity(need(A1, (layer, k), small, "subspace"), need(A2, (layer, k), large, "subspace"))
           for k in "qv"}
    out = out_dir(args, infos, "subspace")
    stem = out / f"fig3_layer{layer}"
    files = figures.save(figures.figure3(phi["q"], phi["v"], ranks=(r1, r2), layer=layer, factor=args.factor), stem)
    files.append(_save_npz(stem, phi_q=phi["q"], phi_v=phi["v"]))
    summary = SubspaceSummary(
        factor=args.factor, layer=layer, ranks=[r1, r2], seed=small.seed, runs=[str(small.dir), str(large.dir)],
        phi_11={k: float(phi[k][0, 0]) for k in "qv"}, phi_full={k: float(phi[k][-1, -1]) for k in "qv"},
        chance_level_max=float(max(r1, r2) / A1[(layer, "q")].shape[1]))
    print(f"layer {layer}: φ(1,1) q={phi['q'][0, 0]:.3f} v={phi['v'][0, 0]:.3f} (paper: > 0.5 for both)")
    return _produced(summary, out, files, infos)


def _seed_pairs(runs, rank, seeds):
    """The pair asked for, else every pair of the seeds at ``rank`` (the first pair is the one drawn)."""
    from itertools import combinations

    from analysis.selection import seeds_at

    if seeds:
        return [two_seeds(runs, rank, seeds)]
    have = seeds_at(runs, rank)
    first = two_seeds(runs, rank, None)
    from analysis.inputs import select

    return [first] + [(select(runs, rank=rank, seed=a)[0], select(runs, rank=rank, seed=b)[0])
                      for a, b in combinations(have, 2) if (a, b) != (first[0].seed, first[1].seed)]


def seeds(args) -> Produced:
    """LoRA Figure 4 for one pair and layer, and its corner (i, j ≤ 8) and above-chance count for every seed
    pair and layer: how many of the top directions one seed's update shares with another's."""
    infos = load(args)
    runs = factor_runs(infos, args.adapter)
    rank = args.rank or max(i.rank for i in runs)
    pairs = _seed_pairs(runs, rank, args.seeds)
    a, b = pairs[0]
    Aa, Ab = directions_by_layer(a, args.factor), directions_by_layer(b, args.factor)
    layers = sorted({layer for layer, _ in Aa} & {layer for layer, _ in Ab})
    layer = args.layer if args.layer is not None else middle(layers)
    phi = {k: similarity(need(Aa, (layer, k), a, "seeds"), need(Ab, (layer, k), b, "seeds")) for k in "qv"}
    shape = tuple(np.shape(Aa[(layer, "q")]))
    rand = random_gaussian_similarity(shape, seed=args.random_seed)
    corner = min(args.corner, rank)
    # chance: φ(i, i) of two random Gaussian r × d matrices, 200 draws; above chance = over their 95th percentile
    draws = np.stack([np.diag(random_gaussian_similarity(shape, seed=args.random_seed + 1 + t))[:corner]
                      for t in range(args.chance_draws)])
    threshold = float(np.quantile(draws, 0.95))
    chance_corner = float(np.mean([random_gaussian_similarity(shape, seed=args.random_seed + 1000 + t)[:corner, :corner]
                                   .mean() for t in range(20)]))
    corner_mean, above = {}, {}
    for pa, pb in pairs:
        Da, Db = directions_by_layer(pa, args.factor), directions_by_layer(pb, args.factor)
        key = f"{pa.seed},{pb.seed}"
        corner_mean[key], above[key] = {}, {}
        for L in sorted({layer for layer, _ in Da} & {layer for layer, _ in Db}):
            cm, ab = {}, {}
            for k in "qv":
                if (L, k) not in Da or (L, k) not in Db:
                    continue
                p = similarity(Da[(L, k)], Db[(L, k)])
                cm[k] = float(p[:corner, :corner].mean())
                ab[k] = int((np.diag(p)[:corner] > threshold).sum())
            corner_mean[key][str(L)], above[key][str(L)] = cm, ab
    out = out_dir(args, infos, "seeds")
    stem = out / f"fig4_layer{layer}"
    files = figures.save(figures.figure4(phi["q"], phi["v"], rand, rank=rank, layer=layer, factor=args.factor), stem)
    files.append(_save_npz(stem, phi_q=phi["q"], phi_v=phi["v"], phi_random=rand))
    summary = SeedsSummary(
        factor=args.factor, layer=layer, rank=rank, seeds=[a.seed, b.seed], runs=[str(a.dir), str(b.dir)],
        phi_11={k: float(phi[k][0, 0]) for k in "qv"},
        mean_phi={**{k: float(phi[k].mean()) for k in "qv"}, "random": float(rand.mean())},
        random_max=float(rand.max()), corner=corner, corner_mean=corner_mean, above_chance=above,
        chance_corner_mean=chance_corner, chance_threshold=threshold)
    print(f"layer {layer}: mean φ q={phi['q'].mean():.3f} v={phi['v'].mean():.3f} random={rand.mean():.3f}; "
          f"{len(pairs)} seed pair(s)")
    return _produced(summary, out, files, infos)


def _phis(X, Y, x, y, layers):
    return {L: tuple(similarity(need(X, (L, k), x, "layers"), need(Y, (L, k), y, "layers")) for k in "qv")
            for L in layers}


def layers(args) -> Produced:
    infos = load(args)
    runs = factor_runs(infos, args.adapter)
    out = out_dir(args, infos, "layers")
    files, summary = [], LayersSummary()
    try:
        r1, r2 = two_ranks(runs, args.ranks)
        small, large = pick_pair_seed(runs, r1, r2, args.seed)
        A1, A2 = directions_by_layer(small, args.factor), directions_by_layer(large, args.factor)
        chosen = args.layers or spread_layers(sorted({layer for layer, _ in A1} & {layer for layer, _ in A2}))
        phis = _phis(A1, A2, small, large, chosen)
        files += figures.save(figures.figure6(phis, ranks=(r1, r2), factor=args.factor), out / "fig6")
        files.append(_save_npz(out / "fig6", **{f"phi_{k}_layer{L}": phis[L][i] for L in chosen
                                                for i, k in enumerate("qv")}))
        summary.fig6 = {"ranks": [r1, r2], "layers": chosen,
                        "phi_11": {str(L): {k: float(phis[L][i][0, 0]) for i, k in enumerate("qv")} for L in chosen}}
    except (UsageError, LookupError) as e:
        print(f"Figure 6 skipped: {e}", file=sys.stderr)
    try:
        rank = args.rank or max(i.rank for i in runs)
        a, b = two_seeds(runs, rank, args.seeds)
        Aa, Ab = directions_by_layer(a, args.factor), directions_by_layer(b, args.factor)
        chosen = args.layers or spread_layers(sorted({layer for layer, _ in Aa} & {layer for layer, _ in Ab}))
        phis = _phis(Aa, Ab, a, b, chosen)
        files += figures.save(figures.figure7(phis, rank=rank, factor=args.factor), out / "fig7")
        files.append(_save_npz(out / "fig7", **{f"phi_{k}_layer{L}": phis[L][i] for L in chosen
                                                for i, k in enumerate("qv")}))
        grid = np.arange(1, rank + 1)
        d = Aa[(chosen[0], "q")].shape[1]
        summary.fig7 = {"rank": rank, "seeds": [a.seed, b.seed], "layers": chosen,
                        "mean_phi": {str(L): {k: float(phis[L][i].mean()) for i, k in enumerate("qv")} for L in chosen},
                        # two random subspaces: E φ(i, j) = max(i, j)/d, averaged over the grid
                        "chance_mean_phi": float(np.maximum.outer(grid, grid).mean() / d)}
    except (UsageError, LookupError) as e:
        print(f"Figure 7 skipped: {e}", file=sys.stderr)
    if summary.fig6 is None and summary.fig7 is None:
        raise UsageError("neither Figure 6 (two ranks, one seed) nor Figure 7 (two seeds, one rank) can be drawn "
                         "from these runs; sweep rank=8,64 seed=0,1")
    return _produced(summary, out, files, infos)


def wsubspace(args) -> Produced:
    from analysis.inputs import by_layer
    from analysis.linalg import TopSingular
    from analysis.subspace import right_singular_basis, similarity_from_bases

    infos = load(args)
    ranks, _, chosen = one_run_per_rank(args, factor_runs(infos, args.adapter))
    first = next(iter(chosen.values()))
    base = by_layer(first.run.base_weights())
    As = {r: directions_by_layer(info) for r, info in chosen.items()}
    layer = args.layer if args.layer is not None else middle(sorted({layer for layer, _ in base}))
    key = (layer, args.matrix)
    top = TopSingular(need(base, key, first, "wsubspace"))
    d = top.shape[1]
    n_top = args.top or int(np.ceil(0.1 * d))
    VW = top.right(n_top)
    phis = {f"r={r}": similarity_from_bases(VW, right_singular_basis(need(As[r], key, chosen[r], "wsubspace")))
            for r in ranks}
    rng = np.random.default_rng(args.random_seed)
    phis["rand"] = similarity_from_bases(VW, right_singular_basis(rng.standard_normal((max(ranks), d))))
    out = out_dir(args, infos, "wsubspace")
    stem = out / f"fig8_layer{layer}_{args.matrix}"
    fig = figures.figure8(phis, kind=args.matrix, vmin=args.vmin, vmax=args.vmax, i_start=args.i_start, layer=layer)
    files = figures.save(fig, stem)
    files.append(_save_npz(stem, **{k.replace("=", ""): v for k, v in phis.items()}))
    summary = WSubspaceSummary(
        layer=layer, matrix=args.matrix, top_i=n_top, d=d, runs={str(r): str(chosen[r].dir) for r in ranks},
        # the paper's reading: similarity of A's top-4 (or fewer) directions with W's top 10%
        phi_at_top_i={k: {f"j={j}": float(v[-1, j - 1]) for j in sorted({1, min(4, v.shape[1]), v.shape[1]})}
                      for k, v in phis.items()},
        chance_level_at_top_i=float(n_top / d))
    for k, v in phis.items():
        print(f"{k}: φ(i={n_top}, j=1..{v.shape[1]}) max {v[-1].max():.3f} (chance {n_top / d:.3f})")
    return _produced(summary, out, files, infos)
