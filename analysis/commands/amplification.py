"""LoRA Table 7: how strongly ΔW amplifies directions of W (arXiv 2106.09685 §7.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from analysis import figures
from analysis.commands import Command, Produced, adapter_flag, base_model_flag, layer_flag, matrices_flag, ranks_flag
from analysis.selection import (UsageError, adapter_spec, chosen_seed, delta_runs, load, middle, one_run_per_rank,
                                out_dir, progress, updated)
from analysis.summaries import Summary

COLUMNS = ("delta", "own", "random", "random_expected", "norm_W", "norm_delta", "factor")


@dataclass
class AmplificationSummary(Summary):
    """LoRA Table 7 at one layer and matrix, and the per-layer medians."""

    analysis: ClassVar[str] = "amplification"
    layer: int
    matrix: str
    ranks: list[int]
    seed: int | None
    runs: dict[str, str]
    at_layer: dict[str, dict[str, float]]   # {"r=8": {delta, own, random, random_expected, norm_W, norm_delta, factor}}
    median_over_layers: dict[str, dict[str, float]]
    table: str = "LoRA Table 7"

    def row(self, r: int) -> dict[str, float]:
        return self.at_layer[f"r={r}"]

    @property
    def tabulated_ranks(self) -> list[int]:
        return sorted(r for r in self.ranks if f"r={r}" in self.at_layer)


def _study(base, updates, chosen, args):
    """ΔW = scaling · B A (the registry says the method's update is exactly that): the factored path over all
    ranks; otherwise the formed ΔW (DoRA, whose ΔW is not scaling·BA; (IA)³, full, top, gradual, read as W − W0),
    projected on its own top-r per r."""
    import pandas as pd

    from analysis.amplification import amplification_study

    kw = dict(seed=args.random_seed, progress=progress(args), top_kwargs={"method": args.svd})
    if all(adapter_spec(i.adapter).delta_from_factors for i in chosen.values()):
        return amplification_study(base, updates, **kw)
    return pd.concat([amplification_study(base, {r: upd}, r=r, **kw) for r, upd in updates.items()],
                     ignore_index=True)


def _chosen(args, runs):
    """(ranks, seed, {r: run}). A low-rank method: one run per rank, r its rank. A method without a rank
    ((IA)³, full, top, gradual): one run, and r (the number of ΔW's top singular directions) from --ranks."""
    spec = adapter_spec(runs[0].adapter)
    if spec.uses_rank:
        return one_run_per_rank(args, runs)
    if not args.ranks:
        raise UsageError(f"adapter {spec.name} ({spec.label}) has no rank: pass --ranks, the r of ΔW's top-r "
                         f"directions (LoRA Table 7 uses 4 64)")
    from analysis.inputs import select

    seed = chosen_seed(args, runs)
    run = select(runs, seed=seed)[0]
    return list(args.ranks), seed, {r: run for r in args.ranks}


def amplification(args) -> Produced:
    from analysis.names import conv_note, parse_module_name
    from analysis.tables import PAPER_TABLE7, per_layer, table7, write_table

    infos = load(args)
    ranks, seed, chosen = _chosen(args, delta_runs(infos, args.adapter))
    models = {i.model for i in chosen.values()}
    if len(models) > 1:
        raise UsageError(f"runs use different base models {sorted(map(str, models))}; analyse one model at a time")
    first = next(iter(chosen.values()))
    base = first.run.base_weights()
    read = {}  # one read per run: a method without a rank gives every r the same ΔW
    for info in chosen.values():
        if info.dir not in read:
            read[info.dir] = info.run.factors() if adapter_spec(info.adapter).delta_from_factors else \
                updated(info.run.deltas())
    updates = {r: read[info.dir] for r, info in chosen.items()}
    kinds = set(args.matrices)
    modules = sorted({m for upd in updates.values() for m in upd if parse_module_name(m)[1] in kinds and m in base})
    if not modules:
        raise UsageError(f"no adapted {sorted(kinds)} modules with base weights; pass --matrices from q k v o")
    updates = {r: {m: u for m, u in upd.items() if m in modules} for r, upd in updates.items()}
    if conv_note(modules):
        print(conv_note(modules))
    study = _study(base, updates, chosen, args)
    out = out_dir(args, infos, "amplification")
    layer = args.layer if args.layer is not None else int(middle(sorted(study["layer"].dropna().unique())))
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
    rows = study[(study["layer"] == layer) & (study["matrix"] == matrix)]
    summary = AmplificationSummary(
        layer=layer, matrix=matrix, ranks=ranks, seed=seed, runs={str(r): str(chosen[r].dir) for r in ranks},
        at_layer={f"r={int(row['r'])}": {k: float(row[k]) for k in COLUMNS} for _, row in rows.iterrows()},
        median_over_layers={f"{m} r={r}": {k: float(v) for k, v in row.items()} for (m, r), row in med.iterrows()})
    print(t7.round(3).to_string())
    return Produced(summary, out, files, {"table7": t7, "per_layer": pl}, [i.run.config or {} for i in infos],
                    [str(i.dir) for i in infos])


def _flags(p) -> None:
    base_model_flag(p)
    adapter_flag(p, "delta")
    layer_flag(p)
    ranks_flag(p, "ranks to compare (default: all/min+max); a method without a rank: the r of ΔW's top-r "
                  "directions, required")
    matrices_flag(p, "matrix kinds (the first one is tabulated in the paper layout)", conv=True)
    p.add_argument("--svd", choices=["auto", "full", "lanczos"], default="auto",
                   help="W's top-r SVD: exact, truncated (Lanczos), or auto by size")


COMMANDS = [Command("amplification", "LoRA Table 7: ΔW vs W amplification, per layer", amplification, _flags)]
