"""DoRA's weight decomposition analysis (arXiv 2402.09353 §3.2, Figure 2)."""

from __future__ import annotations

from pathlib import Path

from analysis.summaries import DecompositionSummary, load_summary
from experiments import references as ref
from experiments.recipes.base import Check, Recipe
from lowrank.adapters import ADAPTERS


def dora_fig2(d: Path) -> list[Check]:
    s = load_summary(DecompositionSummary, d)
    paper = {ADAPTERS[name].label: r for name, r in ref.DORA_FIG2["correlation"].items()}
    checks = []
    for method, r in s.pearson_r.items():
        p = paper[method]
        checks.append(Check(f"corr(ΔD, ΔM) {method} ({s.points[method]} points)", r, p, (r > 0) == (p > 0)))
    if {"LoRA", "DoRA"} <= set(s.pearson_r):
        below = s.pearson_r["DoRA"] < s.pearson_r["LoRA"]
        checks.append(Check("DoRA's correlation below LoRA's", below, "yes", below))
    return checks


RECIPES = [
    Recipe("dora_fig2", "DoRA Figure 2: magnitude vs direction over training", ref.DORA_FIG2,
           [["experiment=dora_fig2"]], [["decomposition"]], dora_fig2, "3 runs × ~1.5 min",
           extra_runs=[("adapter=full", ["experiment=dora_fig2", "adapter=full", "trainer.lr=5e-5"])]),
]
