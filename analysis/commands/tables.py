"""LoRA Tables 5-6 from a sweep's aggregate table (arXiv 2106.09685 §7.1)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from analysis.commands import Command, Produced
from analysis.summaries import Summary


@dataclass
class TablesSummary(Summary):
    """LoRA Tables 5-6 as numbers (means and stds over seeds, in %) and as the cells printed."""

    analysis: ClassVar[str] = "tables"
    table5_budget: int | None = None
    table5_ranks: dict[str, int] = field(default_factory=dict)           # weight type → rank at the budget
    table5_mean: dict[str, dict[str, float]] = field(default_factory=dict)   # task → weight type → mean
    table6_mean: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # task → weight type → "r" → mean
    table6_std: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    table6_seeds: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    table5_cells: list[list[str]] = field(default_factory=list)   # header + rows, as printed
    table6_cells: list[list[str]] = field(default_factory=list)
    tables: str = "LoRA Tables 5 and 6"
    # rows of a second grouping (e.g. alpha) when the sweep varied it: "<label>" → task → weight type → "r" → mean
    table6_by: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    table6_by_std: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    table6_seeds_by: dict[str, dict[str, dict[str, dict[str, int]]]] = field(default_factory=dict)


def _cells(df) -> list[list[str]]:
    """Header + rows of a table as printed (index columns first), for reports that show the table."""
    flat = df.reset_index()
    return [list(map(str, flat.columns))] + [["" if (isinstance(v, float) and np.isnan(v)) else str(v) for v in row]
                                             for row in flat.values.tolist()]


def _nested(df) -> dict:
    """Table 6 numbers {task: {weight type: {"r": value}}} from a numeric table."""
    out: dict = {}
    for (task, wt), row in df.iterrows():
        out.setdefault(str(task), {})[str(wt)] = {c[2:]: float(v) for c, v in row.items() if not np.isnan(v)}
    return out


def _counts(n) -> dict:
    return {t: {w: {r: int(v) for r, v in row.items()} for w, row in ws.items()} for t, ws in _nested(n).items()}


def tables(args) -> Produced:
    from analysis.inputs import load_sweep_table, sweep_root
    from analysis.tables import PAPER_TABLE5, PAPER_TABLE6, side_by_side, table5, table6, table6_stats, write_table

    df = load_sweep_table(args.paths)
    out = (Path(args.out) if args.out else sweep_root(args.paths) / "analysis") / "tables"
    out.mkdir(parents=True, exist_ok=True)
    files, summary, tabs = [], TablesSummary(), {}
    kw = dict(targets_col=args.targets_col, rank_col=args.rank_col, task_col=args.task_col)
    try:
        t5 = table5(df, args.metric, budget=args.budget, **kw)
        t5n = table5(df, args.metric, budget=args.budget, numeric=True, **kw)
        files += write_table(t5, out / "table5", caption=f"Table 5: weight types at a budget of {t5.attrs['budget']} rank units per layer")
        files += write_table(side_by_side(t5, PAPER_TABLE5), out / "table5_vs_paper")
        summary.table5_budget = int(t5.attrs["budget"])
        summary.table5_ranks = {c: int(v) for c, v in t5n.loc["Rank r"].items()}
        summary.table5_mean = {str(task): {c: float(v) for c, v in row.items() if not np.isnan(v)}
                               for task, row in t5n.drop(index="Rank r").iterrows()}
        summary.table5_cells = _cells(t5)
        tabs["table5"] = t5
        print(t5.to_string())
    except (ValueError, KeyError) as e:
        print(f"Table 5 skipped: {e}", file=sys.stderr)
    t6 = table6(df, args.metric, **kw)
    files += write_table(t6, out / "table6", caption="Table 6: metric by rank r")
    files += write_table(side_by_side(t6, PAPER_TABLE6), out / "table6_vs_paper")
    mean, std, n = table6_stats(df, args.metric, **kw)
    summary.table6_mean, summary.table6_std = _nested(mean), _nested(std.fillna(np.nan))
    summary.table6_seeds = _counts(n)
    summary.table6_cells = _cells(t6)
    if args.by:
        for value, part in df.groupby(df[args.by].astype(str)):
            mean_by, std_by, n_by = table6_stats(part, args.metric, **kw)
            summary.table6_by[f"{args.by}={value}"] = _nested(mean_by)
            summary.table6_by_std[f"{args.by}={value}"] = _nested(std_by)
            summary.table6_seeds_by[f"{args.by}={value}"] = _counts(n_by)
            t = table6(part, args.metric, **kw)
            files += write_table(t, out / f"table6_{args.by}{value}", caption=f"Table 6 at {args.by}={value}")
    tabs["table6"] = t6
    print(t6.to_string())
    return Produced(summary, out, files, tabs, None, [str(p) for p in args.paths])


def _flags(p) -> None:
    p.add_argument("--metric", default=None, help="metric column (default: the accuracy-like one)")
    p.add_argument("--budget", type=int, default=None, help="rank units per layer for Table 5 (e.g. 8)")
    p.add_argument("--targets-col", default="targets")
    p.add_argument("--rank-col", default="rank")
    p.add_argument("--task-col", default="task")
    p.add_argument("--by", default=None, help="also tabulate Table 6 per value of this column (e.g. alpha)")


COMMANDS = [Command("tables", "LoRA Tables 5-6 from a sweep's aggregate table", tables, _flags)]
