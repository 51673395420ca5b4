"""LoRA Figures 3, 4, 6-7 and 8: subspace similarity of the learned factors (arXiv 2106.09685 §7.2-7.3)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from analysis import figures
from analysis.commands import Command, Produced, adapter_flag, base_model_flag, factor_flag, layer_flag, ranks_flag, seed_pair_flags
from analysis.selection import (UsageError, directions_by_layer, factor_runs, load, middle, need, one_run_per_rank,
                                out_dir, pick_pair_seed, spread_layers, two_ranks, two_seeds)
from analysis.subspace import random_gaussian_similarity, similarity
from analysis.summaries import Summary


@dataclass
class SubspaceSummary(Summary):
    """LoRA Figure 3: φ(A_{r1}, A_{r2}, i, j) at one layer, for Wq and Wv."""

    analysis: ClassVar[str] = "subspace"
    factor: str
    layer: int
    ranks: list[int]
    seed: int | None
    runs: list[str]
    phi_11: dict[str, float]                 # {"q": φ(1,1), "v": φ(1,1)}
    phi_full: dict[str, float]               # φ(r1, r2)
    chance_level_max: float                  # max(r1, r2)/d: φ of two random subspaces at (r1, r2)
    figure: str = "LoRA Figure 3"


@dataclass
class SeedsSummary(Summary):
    """LoRA Figure 4: φ(A, A') of two seeds at one rank, with a random Gaussian panel."""

    analysis: ClassVar[str] = "seeds"
    factor: str
    layer: int
    rank: int
    seeds: list[int]
    runs: list[str]
    phi_11: dict[str, float]
    mean_phi: dict[str, float]               # {"q", "v", "random"}: the grid mean of φ(i, j)
    random_max: float
    figure: str = "LoRA Figure 4"
    corner: int = 8                          # the i, j ≤ corner zoom the paper reads
    # every seed pair and layer (pairs of "seed_a,seed_b" → layer → kind → number)
    corner_mean: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    above_chance: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    chance_corner_mean: float | None = None
    chance_threshold: float | None = None    # the random panel's 95th percentile of φ(i, i) on the diagonal


@dataclass
class LayersSummary(Summary):
    """LoRA Figures 6-7: Figures 3 and 4 for several layers (either part absent when the runs lack it)."""

    analysis: ClassVar[str] = "layers"
    fig6: dict | None = None   # {"ranks", "layers", "phi_11": {layer: {kind: φ(1,1)}}}
    fig7: dict | None = None   # {"rank", "seeds", "layers", "mean_phi": {layer: {kind: mean φ}}, "chance_mean_phi"}
    figures: str = "LoRA Figures 6 and 7"


@dataclass
class WSubspaceSummary(Summary):
    """LoRA Figure 8: W's top-i right singular directions against A's top-j, for several r and random."""

    analysis: ClassVar[str] = "wsubspace"
    layer: int
    matrix: str
    top_i: int
    d: int
    runs: dict[str, str]
    phi_at_top_i: dict[str, dict[str, float]]   # {"r=8" | "rand": {"j=1": φ, "j=4": φ, ...}}
    chance_level_at_top_i: float
    figure: str = "LoRA Figure 8"


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


def _subspace_flags(p) -> None:
    base_model_flag(p)
    adapter_flag(p, "factors")
    factor_flag(p)
    layer_flag(p)
    ranks_flag(p)


def _seeds_flags(p) -> None:
    base_model_flag(p)
    adapter_flag(p, "factors")
    factor_flag(p)
    layer_flag(p)
    seed_pair_flags(p)
    p.add_argument("--corner", type=int, default=8, help="the i, j <= corner zoom summarised (paper: 8)")
    p.add_argument("--chance-draws", type=int, default=200,
                   help="random Gaussian pairs drawn for the above-chance threshold")


def _layers_flags(p) -> None:
    base_model_flag(p)
    adapter_flag(p, "factors")
    factor_flag(p)
    ranks_flag(p)
    seed_pair_flags(p)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers (default: 4 spread out)")


def _wsubspace_flags(p) -> None:
    base_model_flag(p)
    adapter_flag(p, "factors")
    layer_flag(p)
    ranks_flag(p)
    p.add_argument("--matrix", choices=list("qkvo"), default="q")
    p.add_argument("--top", type=int, default=None, help="W's top-i directions shown (default: 10%% of d)")
    p.add_argument("--i-start", type=int, default=1, help="first i row shown")
    p.add_argument("--vmin", type=float, default=0.1, help="colour bar minimum (paper: 0.1)")
    p.add_argument("--vmax", type=float, default=0.2, help="colour bar maximum (paper: 0.2)")


COMMANDS = [
    Command("subspace", "LoRA Figure 3: φ(A_{r=8}, A_{r=64}) for Wq and Wv at one layer", subspace, _subspace_flags),
    Command("seeds", "LoRA Figure 4: φ across two seeds at r=64, with a random Gaussian panel", seeds, _seeds_flags),
    Command("layers", "LoRA Figures 6-7: Figures 3-4 for several layers", layers, _layers_flags),
    Command("wsubspace", "LoRA Figure 8: W's top singular directions against A's", wsubspace, _wsubspace_flags),
]
