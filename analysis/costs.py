"""Predicted vs measured training memory per method: the cost model (``lowrank.runner.costs``) against runs.

Inputs are run or sweep directories (each ``result.json`` holds ``predicted_costs`` beside the measured
peaks) or JSON files of rows written by ``python -m lowrank.runner.costs --out`` (a model of a benchmark
preset's shape, measured by the runner's step). Measured is the CUDA peak (``max_memory_allocated``) on
a GPU, else the RSS growth from the start of the run (``peak_memory_mb − rss_at_start_mb``, which also
holds the libraries the run imports and its data: read it as an upper bound).

Output: a markdown/CSV table per method (mean over seeds) and the notes' comparison as a stacked bar
chart of the predicted components (frozen weights, trained weights, gradients, optimizer state,
activations) with the measured peak as a marker: ``python -m analysis costs <paths> [--out DIR]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from analysis.summaries import Summary

COMPONENTS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations")
LABELS = {"frozen_weights": "frozen weights", "trainable_weights": "trained weights", "gradients": "gradients",
          "optimizer_state": "optimizer state (AdamW)", "activations": "activations"}


def rows_from_runs(paths) -> list[dict]:
    """One row per completed run with a cost prediction (from ``lowrank.runner.results.rows``)."""
    from lowrank.runner.results import rows as run_rows

    out = []
    for row in run_rows(paths, finished_only=True):
        c = {k.removeprefix("predicted/"): v for k, v in row.items() if k.startswith("predicted/")}
        if row["status"] != "completed" or not c:
            continue
        cuda, start = row["peak_gpu_memory_mb"], row["rss_at_start_mb"]
        measured = cuda if cuda is not None else (row["peak_memory_mb"] - start if start is not None else None)
        out.append({"adapter": row["adapter"], "seed": row["seed"], **c, "predicted_mb": c["peak_mb"],
                    "measured_mb": measured, "compared": "cuda peak" if cuda is not None else "RSS growth since start",
                    "trainable_params": row["trainable_params"]})
    return out


def load_rows(paths) -> list[dict]:
    rows, dirs = [], []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".json":
            rows += json.loads(p.read_text())
        elif p.exists():
            dirs.append(p)
        else:
            raise FileNotFoundError(f"{str(p)!r} is neither a run/sweep directory nor a JSON file of cost rows")
    return rows + (rows_from_runs(dirs) if dirs else [])


def per_method(rows: list[dict]) -> list[dict]:
    """Mean over the rows of each adapter (seeds), in first-seen order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["adapter"], []).append(r)
    table = []
    for adapter, group in out.items():
        mean = lambda k: sum(r[k] for r in group) / len(group) if all(r.get(k) is not None for r in group) else None
        row = {"adapter": adapter, "runs": len(group),
               **{f"{k}_mb": mean(f"{k}_mb") for k in (*COMPONENTS, "optimizer_temporary")},
               "predicted_mb": mean("predicted_mb"), "measured_mb": mean("measured_mb"), "compared": group[0]["compared"]}
        row["ratio"] = row["predicted_mb"] / row["measured_mb"] if row["measured_mb"] else None
        table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    head = ["method", "runs", *[LABELS[k] for k in COMPONENTS], "predicted peak", "measured", "pred/meas"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "–" if v is None else f"{v:,.1f}"
    for r in table:
        lines.append("| " + " | ".join([r["adapter"], str(r["runs"]), *[fmt(r[f"{k}_mb"]) for k in COMPONENTS],
                                        fmt(r["predicted_mb"]), f"{fmt(r['measured_mb'])} ({r['compared']})",
                                        "–" if r["ratio"] is None else f"{r['ratio']:.2f}"]) + " |")
    return "\n".join(lines) + "\n\nMemory in MiB (2^20 bytes).\n"


def _live_at_peak(row: dict) -> dict:
    """The components alive at the predicted peak: the end of the forward pass (activations, no gradients)
    or the optimizer step (gradients and AdamW's temporary, activations freed), whichever is larger."""
    get = lambda k: row.get(f"{k}_mb") or 0.0
    weights = get("frozen_weights") + get("trainable_weights") + get("optimizer_state")
    forward_end = weights + get("activations")
    step = weights + get("gradients") + (row.get("optimizer_temporary_mb") or 0.0)
    live = {k: get(k) for k in COMPONENTS}
    if forward_end >= step:
        live["gradients"] = 0.0
    else:
        live["gradients"] += row.get("optimizer_temporary_mb") or 0.0
        live["activations"] = 0.0
    return live


def figure(table: list[dict], title: str = ""):
    """Stacked bars of the predicted components alive at the predicted peak, per method; the measured peak
    as a black marker."""
    import matplotlib.pyplot as plt

    from analysis.figures import style

    with style():
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(table) + 2), 3.2))
        bottom = [0.0] * len(table)
        x = range(len(table))
        live = [_live_at_peak(r) for r in table]
        for k in COMPONENTS:
            values = [v[k] / 1024 for v in live]
            ax.bar(x, values, bottom=bottom, label=LABELS[k], width=0.7)
            bottom = [b + v for b, v in zip(bottom, values)]
        measured = [(i, r["measured_mb"] / 1024) for i, r in enumerate(table) if r["measured_mb"] is not None]
        if measured:
            ax.scatter(*zip(*measured), marker="_", s=400, color="black", linewidths=2, label="measured", zorder=3)
        ax.set_xticks(list(x), [r["adapter"] for r in table], rotation=30, ha="right")
        ax.set_ylabel("memory (GiB)")
        if title:
            ax.set_title(title)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
    return fig


@dataclass
class CostsSummary(Summary):
    """Predicted vs measured peak memory per method (MiB), with the predicted components."""

    analysis: ClassVar[str] = "costs"
    methods: list[dict] = field(default_factory=list)   # per_method rows
    within_15_percent: dict[str, bool] = field(default_factory=dict)
    within_25_percent: dict[str, bool] = field(default_factory=dict)


def costs(args):
    """``python -m analysis costs <paths>``: the table (costs.md/csv), the stacked-bar figure, the summary."""
    from analysis.commands import Produced
    from analysis.figures import save
    from analysis.selection import UsageError
    from lowrank.atomic import write_text

    rows = load_rows(args.paths)
    if not rows:
        raise UsageError("no completed run with predicted_costs (or cost rows) among the inputs; pass run dirs "
                         "written by this version of the runner, or `python -m lowrank.runner.costs --out` files")
    first = Path(args.paths[0])
    out = (Path(args.out) if args.out else (first.parent if first.is_file() else first) / "analysis") / "costs"
    out.mkdir(parents=True, exist_ok=True)
    table = per_method(rows)
    files = [write_text(out / "costs.md", markdown(table)), *save(figure(table, getattr(args, "title", "")),
                                                                    out / "costs")]
    ok = lambda tol: {r["adapter"]: r["ratio"] is not None and abs(r["ratio"] - 1) <= tol for r in table}
    print(markdown(table))
    return Produced(CostsSummary(methods=table, within_15_percent=ok(0.15), within_25_percent=ok(0.25)), out, files,
                    inputs=[str(p) for p in args.paths])
