"""LoRA Figure 4 and Table 6 (arXiv 2106.09685 §7.2) with enough evidence: three seeds, all layers, longer
training, two scaling rules. Sized for one GPU (``--jobs``); the 250-step recipes in ``lora.py`` stay the CPU
defaults."""

from __future__ import annotations

from pathlib import Path

from analysis.summaries import SeedsSummary, TablesSummary, load_summary
from experiments import references as ref
from experiments.recipes.base import Check, Recipe
from experiments.recipes.lora import corner_checks, fig4, paper_table_markdown, table6_checks

SEEDS = (0, 1, 2)
RANKS = (1, 2, 4, 8, 64)
TARGETS = ("[q]", "[q,v]")
# α fixed at 8 (the paper's rule: scale 8/r) against α = r (scale 1 at every r); `name` labels the rule
RULES = {"alpha8": lambda r: 8, "alpha_r": lambda r: r}


def fig4_long(d: Path) -> list[Check]:
    checks = fig4(d)
    try:
        dw = load_summary(SeedsSummary, d / "analysis" / "dW")
    except FileNotFoundError:
        return checks + [Check("ΔW's own directions (--factor dW): not analysed", "-")]
    return checks + corner_checks(dw)


def _table6_runs() -> list[tuple[str, list[str]]]:
    runs = []  # seed outermost: a run stopped early leaves fewer seeds of the whole grid, not a missing rule
    for seed in SEEDS:
        for rule, alpha in RULES.items():
            for targets in TARGETS:
                for r in RANKS:
                    tag = targets.strip("[]").replace(",", "")
                    runs.append((f"{rule}/t={tag},r={r},seed={seed}",
                                 ["experiment=lora_table6_long", "trainer.max_steps=600", "trainer.eval_every=300", "adapter=lora",
                                  f"name={rule}", f"targets={targets}",
                                  f"rank={r}", f"alpha={alpha(r)}", f"seed={seed}"]))
    return runs


def table6_long(d: Path) -> list[Check]:
    s = load_summary(TablesSummary, d)
    checks = []
    for label, means in s.table6_by.items():
        checks += table6_checks(means, f" ({label})")
    return checks


def table6_long_tables(d: Path) -> list[str]:
    """The paper's Table 6, then ours per scaling rule (pooling the two rules would mix different runs)."""
    s = load_summary(TablesSummary, d)
    lines = paper_table_markdown("table6")
    for label in s.table6_by:
        mean, std = s.table6_by[label], s.table6_by_std.get(label, {})
        seeds = s.table6_seeds_by.get(label, {})
        lines += ["", f"Ours, {label} (mean ± std over seeds, %; seeds per cell: "
                  f"{sorted({n for t in seeds.values() for w in t.values() for n in w.values()}) or '?'}):", "",
                  "| task | weight type | " + " | ".join(f"r={r}" for r in RANKS) + " |",
                  "|---|---|" + "---|" * len(RANKS)]
        for task, by_type in mean.items():
            for wt, by_r in by_type.items():
                sd = std.get(task, {}).get(wt, {})
                cells = [f"{by_r[str(r)]:.1f} ± {sd.get(str(r), float('nan')):.1f}" if str(r) in by_r else ""
                         for r in RANKS]
                lines.append(f"| {task} | {wt} | " + " | ".join(cells) + " |")
    return lines


RECIPES = [
    Recipe("lora_fig4_long", "LoRA Figure 4 over three seed pairs and all layers (A and ΔW's own directions)",
           ref.LORA_FIG4, [],
           [["seeds"], ["seeds", "{dir}", "--factor", "dW", "--out", "{dir}/analysis/dW"]], fig4_long,
           "3 runs of 2,000 steps: ~1.5 min on one H200 with --jobs 3", tolerant=True,
           extra_runs=[(f"seed={s}", ["experiment=lora_fig4_long", "rank=64", "adapter=lora", f"seed={s}"]) for s in SEEDS]),
    Recipe("lora_table6_long", "LoRA Table 6 at 600 steps, three seeds, α fixed and α = r", ref.LORA_TABLE6,
           [], [["tables", "--by", "name"]], table6_long, "60 runs of 600 steps: ~4 min on one H200 with --jobs 12",
           extra_runs=_table6_runs(), tables=table6_long_tables, tolerant=True),
]
