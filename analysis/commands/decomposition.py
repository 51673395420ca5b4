"""DoRA Figure 2 (and Fig. 7 for Wv): magnitude vs direction of W over training (arXiv 2402.09353 §3.2)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

from analysis import figures
from analysis.commands import Command, Produced, base_model_flag
from analysis.selection import UsageError, adapter_spec, chosen_seed, label, load, out_dir, with_delta
from analysis.summaries import Summary


@dataclass
class DecompositionSummary(Summary):
    """DoRA Figure 2: correlation of ΔD and ΔM per method, under every reading."""

    analysis: ClassVar[str] = "decomposition"
    matrix: str
    runs: dict[str, str]
    pearson_r: dict[str, float]               # the paper's reading: all (layer, step) points pooled
    slope: dict[str, float]
    points: dict[str, int]
    figure: str = "DoRA Figure 2"
    spearman_r: dict[str, float] = field(default_factory=dict)
    within_step: dict[str, dict[str, float]] = field(default_factory=dict)   # method → {step: Pearson r}
    within_step_mean: dict[str, float] = field(default_factory=dict)
    partial_r: dict[str, float] = field(default_factory=dict)     # step means removed from ΔD and ΔM
    ci_low: dict[str, float] = field(default_factory=dict)        # bootstrap over layers, pooled Pearson r
    ci_high: dict[str, float] = field(default_factory=dict)
    delta_d_range: dict[str, list[float]] = field(default_factory=dict)
    delta_m_range: dict[str, list[float]] = field(default_factory=dict)
    relative_m: bool = False       # ΔM divided by mean |m_0| (a labelled extra, not the paper's definition)
    excluded_layers: list[int] = field(default_factory=list)
    steps: dict[str, list[int]] = field(default_factory=dict)


def choose_runs(infos, args) -> list[tuple[str, object]]:
    """One run per method with a weight update, as in the paper: the chosen (or lowest) seed; the low-rank
    methods at DoRA's rank (or --rank). Methods are keyed by the registry's label (FT, LoRA, DoRA, (IA)³)."""
    by_method: dict[str, list] = {}
    for info in with_delta(infos):
        by_method.setdefault(adapter_spec(info.adapter).label, []).append(info)
    dora_rank = min((i.rank for i in by_method.get(label("dora"), []) if i.rank), default=None)
    chosen = []
    for method, runs in by_method.items():
        seed = chosen_seed(args, runs)
        runs = [i for i in runs if seed is None or i.seed == seed]
        if adapter_spec(runs[0].adapter).uses_rank:
            want = args.rank or dora_rank or min((i.rank for i in runs if i.rank), default=None)
            runs = [i for i in runs if want is None or i.rank == want] or runs
        if runs:
            chosen.append((method, runs[0]))
    return chosen


def points(chosen, args):
    """ΔM, ΔD per (method, step, layer) of the chosen runs (step 0 dropped unless asked for). The saved weights
    are the effective W0 + ΔW of each target module ((IA)³: diag(l)·W0); modules a run never moves from W0
    (the frozen blocks of top, gradual) are left out: their ΔM = ΔD = 0 says nothing about the update."""
    import pandas as pd
    import torch

    from analysis.decomposition import trajectory
    from analysis.names import parse_module_name

    frames = []
    for method, info in chosen:
        saved = info.run.weight_trajectory()
        steps = [s for s in saved if s != 0 or args.include_step0]
        if len(steps) < 2:
            print(f"{info.dir.name}: {len(steps)} saved step(s), skipped; train with trainer.save_weights_at=[...]",
                  file=sys.stderr)
            continue
        base = info.run.base_weights()
        moved = {m for w in saved.values() for m, x in w.items()
                 if m in base and parse_module_name(m)[1] == args.matrix and not torch.equal(x, base[m])}
        traj = {s: {m: x for m, x in saved[s].items() if m in moved or m not in base} for s in steps}
        df = trajectory(base, traj, kinds=[args.matrix], method=method)
        if df.empty:
            print(f"{info.dir.name} ({method}): no updated W{args.matrix}, skipped; pass --matrix from those it "
                  f"adapts", file=sys.stderr)
            continue
        df["run"] = str(info.dir)
        frames.append(df)
    if not frames:
        raise UsageError(f"no run with a weight update has >= 2 saved weight steps of W{args.matrix}; run e.g. "
                         f"adapter=full,lora,dora with trainer.save_weights_at=[...]")
    return pd.concat(frames, ignore_index=True)


def select_points(df, args):
    """Drop --exclude-layers and keep each run's --last-k saved steps."""
    if args.exclude_layers:
        df = df[~df["layer"].isin(args.exclude_layers)]
    if args.last_k:
        keep = {run: sorted(g["step"].unique())[-args.last_k:] for run, g in df.groupby("run")}
        df = df[[step in keep[run] for run, step in zip(df["run"], df["step"])]]
    if df.empty:
        raise UsageError(f"no points left after --exclude-layers {args.exclude_layers} --last-k {args.last_k}")
    return df


def output_name(matrix: str) -> str:
    """decomposition (Wq, DoRA Fig. 2) or decomposition_<m> (Wv: Fig. 7), so both summaries can sit side by side."""
    return "decomposition" if matrix == "q" else f"decomposition_{matrix}"


def decomposition(args) -> Produced:
    from analysis.decomposition import correlations
    from analysis.tables import write_table

    infos = load(args)
    chosen = choose_runs(infos, args)
    df = select_points(points(chosen, args), args)
    y = "dM_rel" if args.relative_m else "dM"
    corr = correlations(df, y=y, bootstrap=args.bootstrap, seed=args.random_seed)
    out = out_dir(args, infos, output_name(args.matrix))
    stem = f"dora_fig2_{args.matrix}" + ("_relative" if args.relative_m else "")
    paper = ("FT", "LoRA", "DoRA")  # the paper's panels first, then any other method with ΔW
    methods = [*paper, *(m for m in dict.fromkeys(df["method"]) if m not in paper)]
    files = figures.save(figures.dora_figure2(df, methods=methods, kind=args.matrix, y=y), out / stem)
    df.to_csv(out / f"{stem}_points.csv", index=False)
    files.append(out / f"{stem}_points.csv")
    what = "relative ΔM (|Δ‖W_n‖| / ‖W0_n‖, not the paper's eq. 3)" if args.relative_m else "ΔM"
    files += write_table(corr.set_index("method"), out / f"{stem}_correlations", digits=3,
                         caption=f"Correlation of ΔD and {what} (W{args.matrix}): pooled Pearson (the paper's: FT −0.62, "
                                 "DoRA −0.31, LoRA +0.83), Spearman, mean within-step, partial given the step")
    col = lambda c: {r["method"]: float(r[c]) for _, r in corr.iterrows() if c in r}  # noqa: E731
    summary = DecompositionSummary(
        matrix=args.matrix, runs={m: str(i.dir) for m, i in chosen}, pearson_r=col("pearson_r"), slope=col("slope"),
        points={r["method"]: int(r["points"]) for _, r in corr.iterrows()}, spearman_r=col("spearman_r"),
        within_step=corr.attrs["within_step"], within_step_mean=col("within_step_mean_r"), partial_r=col("partial_r"),
        ci_low=col("ci_low"), ci_high=col("ci_high"),
        delta_d_range={m: [float(g["dD"].min()), float(g["dD"].max())] for m, g in df.groupby("method")},
        delta_m_range={m: [float(g[y].min()), float(g[y].max())] for m, g in df.groupby("method")},
        relative_m=bool(args.relative_m), excluded_layers=list(args.exclude_layers or []),
        steps={m: sorted(int(s) for s in g["step"].unique()) for m, g in df.groupby("method")})
    print(corr.round(3).to_string(index=False))
    return Produced(summary, out, files, {"correlations": corr}, [i.run.config or {} for i in infos],
                    [str(i.dir) for i in infos])


def _flags(p) -> None:
    base_model_flag(p)
    p.add_argument("--matrix", choices=list("qkvo"), default="q", help="q = DoRA Fig. 2, v = Fig. 7")
    p.add_argument("--rank", type=int, default=None, help="LoRA/DoRA rank to use (default: DoRA's)")
    p.add_argument("--include-step0", action="store_true",
                   help="keep step 0 (W = W0, so ΔM = ΔD = 0) in the scatter")
    p.add_argument("--exclude-layers", type=int, nargs="+", default=None, help="layers left out (e.g. 5)")
    p.add_argument("--last-k", type=int, default=None, help="keep only each run's last k saved steps")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="resamples of layers for the 95%% interval of the pooled r (0 = none)")
    p.add_argument("--relative-m", action="store_true",
                   help="ΔM relative to ‖W0_n‖ (a labelled extra, not the paper's definition)")


COMMANDS = [Command("decomposition", "DoRA Figure 2: magnitude vs direction over checkpoints", decomposition, _flags)]
