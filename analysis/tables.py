"""LoRA Tables 5-6 (which weights, which rank) from a sweep's aggregate table, plus table output.

Input is the DataFrame of `lowrank.runner.results.load_sweep` (one row per run: swept keys, metrics, status).
Table 5 compares weight types under a fixed trainable-parameter budget: with a budget of b "rank units"
per layer, a run adapting n matrices at rank r is on budget when n·r = b (b=8: Wq r=8, Wq,Wv r=4,
Wq,Wk,Wv,Wo r=2). Table 6 shows the metric by rank for each weight type. Cells are mean ± std over
seeds (the paper's ± is the std across seeds). Also: markdown / LaTeX / CSV writers with no extra
dependencies, and the paper's own rows (GPT-3 175B) for side-by-side comparison.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.names import KINDS
from lowrank.atomic import write_text

__all__ = [
    "targets_label",
    "n_matrices",
    "budget_ranks",
    "find_metric",
    "table5",
    "table6",
    "table6_stats",
    "side_by_side",
    "to_markdown",
    "to_latex",
    "write_table",
    "PAPER_TABLE5",
    "PAPER_TABLE6",
    "PAPER_TABLE7",
    "table7",
    "per_layer",
]

# LoRA paper, Table 5 (GPT-3 175B, 18M budget) and Table 6 (validation accuracy, %); arXiv 2106.09685 §7.1
PAPER_TABLE5 = pd.DataFrame(
    {
        "Wq": [8, 70.4, 91.0],
        "Wk": [8, 70.0, 90.8],
        "Wv": [8, 73.0, 91.0],
        "Wo": [8, 73.2, 91.3],
        "Wq,Wk": [4, 71.4, 91.3],
        "Wq,Wv": [4, 73.7, 91.3],
        "Wq,Wk,Wv,Wo": [2, 73.7, 91.7],
    },
    index=pd.Index(["Rank r", "WikiSQL (±0.5%)", "MultiNLI (±0.1%)"], name="Weight type"),
)
PAPER_TABLE6 = pd.DataFrame(
    [
        [68.8, 69.6, 70.5, 70.4, 70.0],
        [73.4, 73.3, 73.7, 73.8, 73.5],
        [74.1, 73.7, 74.0, 74.0, 73.9],
        [90.7, 90.9, 91.1, 90.7, 90.7],
        [91.3, 91.4, 91.3, 91.6, 91.4],
        [91.2, 91.7, 91.7, 91.5, 91.4],
    ],
    index=pd.MultiIndex.from_product(
        [["WikiSQL (±0.5%)", "MultiNLI (±0.1%)"], ["Wq", "Wq,Wv", "Wq,Wk,Wv,Wo"]], names=["Dataset", "Weight type"]
    ),
    columns=["r=1", "r=2", "r=4", "r=8", "r=64"],
)


def _targets(value) -> list[str]:
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                value = [t for t in re.split(r"[\[\],\s'\"]+", s) if t]
        else:
            value = [t for t in re.split(r"[,+\s]+", s) if t]
    return [str(t).strip() for t in value]


def targets_label(value) -> str:
    """Targets (list, "q,v", "[q,v]") → the paper's label "Wq,Wv", ordered q, k, v, o."""
    ts = _targets(value)
    order = {k: i for i, k in enumerate(KINDS)}
    ts = sorted(set(ts), key=lambda t: (order.get(t, len(order)), t))
    return ",".join(f"W{t}" if t in order else t for t in ts)


def n_matrices(label: str) -> int:
    return len([t for t in label.split(",") if t])


def budget_ranks(budget: int, labels: Iterable[str]) -> dict[str, int]:
    """Rank that keeps `budget` rank units per layer for each weight type: budget // #matrices."""
    return {lab: budget // n_matrices(lab) for lab in labels}


_METRIC_HINTS = re.compile(r"(accuracy|acc\b|matthews|mcc|pearson|f1|bleu)", re.I)


def find_metric(df: pd.DataFrame, metric: str | None) -> str:
    """The metric column: `metric` if present, else the single accuracy-like numeric column."""
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    if metric is not None:
        if metric in df.columns:
            return metric
        near = [c for c in numeric if metric.lower() in str(c).lower()]
        if len(near) == 1:
            return near[0]
        raise KeyError(f"metric {metric!r} is not a column of the sweep table; pick one of {numeric}")
    task_metric = df.attrs.get("metric")
    if task_metric:
        for cand in (f"best/{task_metric}", f"final/{task_metric}", task_metric):
            if cand in numeric:
                return cand
    hits = [c for c in numeric if _METRIC_HINTS.search(str(c))]
    best = [c for c in hits if "best" in str(c).lower()]
    if len(best) == 1:
        return best[0]
    if len(hits) == 1:
        return hits[0]
    raise KeyError(f"cannot tell which metric to tabulate among {hits or numeric}; pass --metric NAME")


def _prepare(df: pd.DataFrame, metric: str | None, targets_col: str, rank_col: str, percent: bool | None):
    for col in (targets_col, rank_col):
        if col not in df.columns:
            raise KeyError(f"sweep table has no {col!r} column (has {list(df.columns)}); pass its name explicitly")
    if "status" in df.columns:
        df = df[df["status"].fillna("completed") == "completed"]
    metric = find_metric(df, metric)
    out = df.copy()
    out["weight_type"] = out[targets_col].map(targets_label)
    out["rank_"] = out[rank_col].astype(int)
    vals = out[metric].astype(float)
    if percent is None:
        percent = bool(vals.dropna().abs().max() <= 1.0)
    out["value"] = vals * (100.0 if percent else 1.0)
    return out


def _cell(mean: float, std: float, n: int, digits: int) -> str:
    if np.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" if n < 2 or np.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _order(labels: Iterable[str]) -> list[str]:
    paper = list(PAPER_TABLE5.columns)
    labels = list(dict.fromkeys(labels))
    return [c for c in paper if c in labels] + sorted(c for c in labels if c not in paper)


def table5(
    df: pd.DataFrame,
    metric: str | None = None,
    *,
    budget: int | None = None,
    task_col: str | None = "task",
    targets_col: str = "targets",
    rank_col: str = "rank",
    percent: bool | None = None,
    digits: int = 1,
    numeric: bool = False,
) -> pd.DataFrame:
    """Table 5: the metric for each weight type at the rank that meets the budget (rank units per layer).

    budget=None takes the n·r product shared by the most weight types. Rows: "Rank r", then one per task
    (a single "metric" row when there is no task column). Cells "mean ± std" (numeric=True: means).
    """
    d = _prepare(df, metric, targets_col, rank_col, percent)
    d["units"] = d["weight_type"].map(n_matrices) * d["rank_"]
    if budget is None:
        counts = d.groupby("units")["weight_type"].nunique()
        if counts.empty:
            raise ValueError("the sweep has no completed runs to tabulate")
        budget = int(counts.idxmax())
    d = d[d["units"] == budget]
    if d.empty:
        raise ValueError(f"no run meets the budget {budget} = #matrices × rank; sweep e.g. targets=[q] rank={budget}")
    tasks = d[task_col].astype(str) if task_col and task_col in d.columns else pd.Series("metric", index=d.index)
    d = d.assign(task_=tasks)
    cols = _order(d["weight_type"])
    g = d.groupby(["task_", "weight_type"])["value"].agg(["mean", "std", "count"])
    rows = {"Rank r": {c: int(d.loc[d["weight_type"] == c, "rank_"].iloc[0]) for c in cols}}
    for task in dict.fromkeys(d["task_"]):
        row = {}
        for c in cols:
            if (task, c) in g.index:
                m, s, n = g.loc[(task, c)]
                row[c] = float(m) if numeric else _cell(m, s, int(n), digits)
            else:
                row[c] = np.nan if numeric else ""
        rows[task] = row
    out = pd.DataFrame.from_dict(rows, orient="index")[cols]
    out.index.name = "Weight type"
    out.attrs["budget"] = budget
    return out


def table6_stats(
    df: pd.DataFrame,
    metric: str | None = None,
    *,
    task_col: str | None = "task",
    targets_col: str = "targets",
    rank_col: str = "rank",
    percent: bool | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Table 6 as numbers: (mean, std, number of seeds), each with rows (task, weight type) and columns r=…"""
    d = _prepare(df, metric, targets_col, rank_col, percent)
    tasks = d[task_col].astype(str) if task_col and task_col in d.columns else pd.Series("metric", index=d.index)
    d = d.assign(task_=tasks)
    g = d.groupby(["task_", "weight_type", "rank_"])["value"].agg(["mean", "std", "count"])
    ranks = sorted(d["rank_"].unique())
    index = [(task, wt) for task in dict.fromkeys(d["task_"]) for wt in _order(d.loc[d["task_"] == task, "weight_type"])]
    frames = []
    for stat in ("mean", "std", "count"):
        data = [[float(g.loc[(t, w, r), stat]) if (t, w, r) in g.index else np.nan for r in ranks] for t, w in index]
        frames.append(pd.DataFrame(data, index=pd.MultiIndex.from_tuples(index, names=["Dataset", "Weight type"]),
                                   columns=[f"r={r}" for r in ranks]))
    return frames[0], frames[1], frames[2].fillna(0).astype(int)


def table6(
    df: pd.DataFrame,
    metric: str | None = None,
    *,
    task_col: str | None = "task",
    targets_col: str = "targets",
    rank_col: str = "rank",
    percent: bool | None = None,
    digits: int = 1,
    numeric: bool = False,
) -> pd.DataFrame:
    """Table 6: rows (task, weight type), columns r=…, cells mean ± std over seeds."""
    mean, std, count = table6_stats(df, metric, task_col=task_col, targets_col=targets_col, rank_col=rank_col,
                                    percent=percent)
    if numeric:
        return mean
    cells = [[_cell(m, s, int(n), digits) for m, s, n in zip(*rows)]
             for rows in zip(mean.values, std.values, count.values)]
    return pd.DataFrame(cells, index=mean.index, columns=mean.columns)


def side_by_side(ours: pd.DataFrame, paper: pd.DataFrame, *, ours_label: str = "this run", paper_label: str = "paper (GPT-3 175B)"):
    """Stack our table above the paper's, the first index level saying which is which."""
    cols = list(dict.fromkeys([*ours.columns, *paper.columns]))
    ranks = [re.fullmatch(r"r=(\d+)", str(c)) for c in cols]
    if all(ranks):
        cols = sorted(cols, key=lambda c: int(str(c)[2:]))
    return pd.concat({ours_label: ours.reindex(columns=cols), paper_label: paper.reindex(columns=cols)})


def _fmt(v, digits: int) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _flat_rows(df: pd.DataFrame, digits: int) -> tuple[list[str], list[list[str]]]:
    names = [n or "" for n in df.index.names]
    header = [*names, *(" ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in df.columns)]
    rows = []
    for idx, vals in zip(df.index, df.itertuples(index=False)):
        idx = idx if isinstance(idx, tuple) else (idx,)
        rows.append([str(i) for i in idx] + [_fmt(v, digits) for v in vals])
    return header, rows


def to_markdown(df: pd.DataFrame, *, digits: int = 2) -> str:
    header, rows = _flat_rows(df, digits)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    s = s.replace("\\", r"\textbackslash{}")
    for a, b in [("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("±", r"$\pm$"), ("Δ", r"$\Delta$"),
                 ("‖", r"$\|$"), ("ᵀ", r"$^\top$"), ("φ", r"$\phi$")]:
        s = s.replace(a, b)
    return s


def to_latex(df: pd.DataFrame, *, digits: int = 2, caption: str | None = None) -> str:
    """A booktabs tabular (no jinja2 needed)."""
    header, rows = _flat_rows(df, digits)
    nidx = df.index.nlevels
    spec = "l" * nidx + "r" * (len(header) - nidx)
    out = []
    if caption:
        out += [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(caption)}}}"]
    out += [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(_tex(c) for c in r) + r" \\" for r in rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def write_table(df: pd.DataFrame, stem: str | Path, *, digits: int = 2, caption: str | None = None) -> list[Path]:
    """Write <stem>.md, <stem>.tex and <stem>.csv; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".md"), stem.with_suffix(".tex"), stem.with_suffix(".csv")]
    md = (f"{caption}\n\n" if caption else "") + to_markdown(df, digits=digits)
    write_text(paths[0], md)
    write_text(paths[1], to_latex(df, digits=digits, caption=caption))
    write_text(paths[2], df.to_csv())
    return paths


# LoRA paper Table 7 (GPT-3 175B, Wq of layer 48); arXiv 2106.09685 §7.3. The factor row is ||ΔW||_F / ΔW column.
PAPER_TABLE7 = pd.DataFrame(
    {
        ("r=4", "ΔWq"): [0.32, 61.95, 6.91, 21.6],
        ("r=4", "Wq"): [21.67, np.nan, np.nan, np.nan],
        ("r=4", "Random"): [0.02, np.nan, np.nan, np.nan],
        ("r=64", "ΔWq"): [1.90, 61.95, 3.57, 1.88],
        ("r=64", "Wq"): [37.71, np.nan, np.nan, np.nan],
        ("r=64", "Random"): [0.33, np.nan, np.nan, np.nan],
    },
    index=["‖UᵀWVᵀ‖_F", "‖W‖_F", "‖ΔW‖_F", "factor ‖ΔW‖_F/‖UᵀWVᵀ‖_F"],
)


def table7(study: pd.DataFrame, *, layer: int | None = None, matrix: str = "q") -> pd.DataFrame:
    """Table 7 in the paper's layout for one module, from `amplification.amplification_study`'s output.

    Columns (r=…, ΔW / W / Random) for every label (rank) in the study; rows ‖UᵀWVᵀ‖_F, ‖W‖_F, ‖ΔW‖_F and
    the amplification factor. layer=None takes the middle layer (the paper uses layer 48 of 96).
    """
    d = study[study["matrix"] == matrix]
    if d.empty:
        raise ValueError(f"no {matrix!r} matrices in the study (has {sorted(study['matrix'].dropna().unique())})")
    layers = sorted(d["layer"].dropna().unique())
    if layer is None:
        layer = int(layers[len(layers) // 2]) if layers else None
    if layer is not None:
        d = d[d["layer"] == layer]
        if d.empty:
            raise ValueError(f"layer {layer} not in the study; layers available: {layers}")
    name = f"W{matrix}"
    cols = {}
    for _, row in d.sort_values("r").iterrows():
        key = f"r={int(row['r'])}" if d["r"].nunique() == len(d) else f"{row['label']}"
        cols[(key, f"Δ{name}")] = [row["delta"], row["norm_W"], row["norm_delta"], row["factor"]]
        cols[(key, name)] = [row["own"], np.nan, np.nan, np.nan]
        cols[(key, "Random")] = [row["random"], np.nan, np.nan, np.nan]
    out = pd.DataFrame(cols, index=PAPER_TABLE7.index)
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    out.attrs["layer"] = layer
    return out


def per_layer(study: pd.DataFrame) -> pd.DataFrame:
    """The study as one row per (label, layer, matrix), the columns Table 7 is made of."""
    cols = ["label", "layer", "matrix", "r", "delta", "own", "random", "random_expected", "norm_W", "norm_delta", "factor"]
    return study[cols].sort_values(["label", "matrix", "layer"]).reset_index(drop=True)
