"""The LoRA paper's analyses (arXiv 2106.09685): Figures 3, 4, 6-8 (§7.2-7.3) and Tables 5-7 (§7.1, §7.3)."""

from __future__ import annotations

from pathlib import Path

from analysis.summaries import (AmplificationSummary, LayersSummary, SeedsSummary, SubspaceSummary, TablesSummary,
                                WSubspaceSummary, load_summary)
from experiments import references as ref
from experiments.recipes.base import QUICK, Check, Recipe, markdown


def fig3(d: Path) -> list[Check]:
    s = load_summary(SubspaceSummary, d)
    r1, r2 = s.ranks
    return [Check(f"φ(1,1) ΔW{k}, layer {s.layer}, r={r1} vs r={r2}", s.phi_11[k], "> 0.5",
                  s.phi_11[k] > ref.LORA_FIG3["threshold"]) for k in "qv"] + [
        Check("chance level max(i,j)/d", s.chance_level_max)]


def fig4(d: Path) -> list[Check]:
    s = load_summary(SeedsSummary, d)
    m = s.mean_phi
    checks = [
        Check(f"mean φ across seeds, ΔWq (r={s.rank}, layer {s.layer})", m["q"], "> random", m["q"] > m["random"]),
        Check(f"mean φ across seeds, ΔWv (r={s.rank}, layer {s.layer})", m["v"], "> random", m["v"] > m["random"]),
        Check("mean φ, two random Gaussian matrices", m["random"], "≈ chance"),
        Check("ΔWq shares more directions across seeds than ΔWv", f"{m['q']:.3f} vs {m['v']:.3f}", "yes",
              m["q"] > m["v"]),
    ]
    return checks + corner_checks(s)


def corner_checks(s: SeedsSummary) -> list[Check]:
    """Over every seed pair and layer: the mean of the i, j ≤ 8 corner and the count of the top-8 directions
    whose φ(i, i) is above the random panel's 95th percentile, Wq against Wv."""
    import numpy as np

    if not s.corner_mean:
        return []
    corner = {k: [v[k] for layers in s.corner_mean.values() for v in layers.values() if k in v] for k in "qv"}
    above = {k: [v[k] for layers in s.above_chance.values() for v in layers.values() if k in v] for k in "qv"}
    n = len(corner["q"])
    q, v = np.mean(corner["q"]), np.mean(corner["v"])
    wins = sum(a > b for a, b in zip(corner["q"], corner["v"]))
    return [
        Check(f"mean φ over the i,j ≤ {s.corner} corner, {len(s.corner_mean)} seed pairs × layers ({n}), ΔWq / ΔWv "
              f"(factor {s.factor})", f"{q:.3f} / {v:.3f}", "Wq > Wv", q > v),
        Check("  chance level of that corner (random Gaussian)", s.chance_corner_mean),
        Check(f"(pair, layer) cells where ΔWq's corner beats ΔWv's", f"{wins} of {n}", "most", wins > n / 2),
        Check(f"top-{s.corner} directions above chance (φ(i,i) > {s.chance_threshold:.3g}), mean per cell, ΔWq / ΔWv",
              f"{np.mean(above['q']):.2f} / {np.mean(above['v']):.2f}", "Wq > Wv",
              float(np.mean(above["q"])) > float(np.mean(above["v"]))),
    ]


def fig6_7(d: Path) -> list[Check]:
    s = load_summary(LayersSummary, d)
    checks = []
    if s.fig6 is not None:
        r1, r2 = s.fig6["ranks"]
        for layer, by_k in s.fig6["phi_11"].items():
            checks += [Check(f"Fig. 6, layer {layer}: φ(1,1) ΔW{k}, r={r1} vs r={r2}", v, "> 0.5",
                             v > ref.LORA_FIG6_7["threshold"]) for k, v in by_k.items()]
    if s.fig7 is not None:
        rank, (a, b), chance = s.fig7["rank"], s.fig7["seeds"], s.fig7["chance_mean_phi"]
        for layer, by_k in s.fig7["mean_phi"].items():
            q, v = by_k["q"], by_k["v"]
            checks.append(Check(f"Fig. 7, layer {layer}: mean φ across seeds {a},{b} (r={rank}), ΔWq / ΔWv",
                                f"{q:.3f} / {v:.3f}", f"> chance ({chance:.3f})", min(q, v) > chance))
    return checks


def fig8(d: Path) -> list[Check]:
    s = load_summary(WSubspaceSummary, d)
    rows = []
    for label, by_j in s.phi_at_top_i.items():
        j4 = by_j.get("j=4", next(iter(by_j.values())))
        rows.append(Check(f"φ(W{s.matrix} top {s.top_i} of {s.d}, {label} top-4)", j4, "≤ ~0.2",
                          j4 <= 0.25 if label != "rand" else None))
    rows.append(Check("chance level top_i/d", s.chance_level_at_top_i))
    return rows


def table7(d: Path) -> list[Check]:
    s = load_summary(AmplificationSummary, d)
    ranks = s.tabulated_ranks
    checks = []
    for r in ranks:
        row, paper = s.row(r), ref.LORA_TABLE7["rows"].get(r, {})
        checks += [
            Check(f"r={r}: ‖UᵀWVᵀ‖ ΔW directions (layer {s.layer}, W{s.matrix})", row["delta"], paper.get("delta")),
            Check(f"r={r}: ‖UᵀWVᵀ‖ W's own top-r", row["own"], paper.get("own")),
            Check(f"r={r}: ‖UᵀWVᵀ‖ random (expected r‖W‖/d = {row['random_expected']:.3g})", row["random"],
                  paper.get("random")),
            Check(f"r={r}: ΔW correlates with W more than random does", row["delta"] > row["random"], "yes",
                  row["delta"] > row["random"]),
            Check(f"r={r}: ΔW does not repeat W's top directions (delta < own)", row["delta"] < row["own"], "yes",
                  row["delta"] < row["own"]),
            Check(f"r={r}: ‖W‖_F, ‖ΔW‖_F", f"{row['norm_W']:.3g}, {row['norm_delta']:.3g}",
                  f"{ref.LORA_TABLE7['norm_W']}, {paper.get('norm_delta')}"),
            Check(f"r={r}: amplification factor ‖ΔW‖_F / delta", row["factor"], paper.get("factor")),
        ]
    if len(ranks) >= 2:
        lo, hi = s.row(ranks[0])["factor"], s.row(ranks[-1])["factor"]
        checks.append(Check(f"factor larger at r={ranks[0]} than at r={ranks[-1]}", f"{lo:.3g} vs {hi:.3g}", "21.5 vs 1.9",
                            lo > hi))
    return checks


def table5(d: Path) -> list[Check]:
    s = load_summary(TablesSummary, d)
    if not s.table5_mean:
        return []
    values = next(iter(s.table5_mean.values()))
    best = max(values, key=values.get)
    checks = [Check("best weight type at the budget", best, "Wq,Wv or Wq,Wk,Wv,Wo", best in ("Wq,Wv", "Wq,Wk,Wv,Wo"))]
    qv, singles = values.get("Wq,Wv"), [v for k, v in values.items() if "," not in k]
    if qv is not None and singles:
        checks.append(Check("Wq,Wv (r=4) ≥ every single matrix (r=8)", qv, "yes", qv >= max(singles)))
    return checks


def _table6_tests(at: dict[int, float], q: dict[int, float]) -> tuple[float, float, bool]:
    r1 = min(at)
    return max(at.values()) - at[r1], max(q.values()) - q[r1], at[r1] > max(q.values())


def table6_checks(means: dict[str, dict[str, dict[str, float]]], where: str = "") -> list[Check]:
    """LoRA §7.2 on Table 6: "a rank as small as one suffices for adapting both Wq and Wv … while training Wq
    alone needs a larger r". Each check is computed on the paper's rows too, so the paper column says whether
    the paper's own numbers pass the same test (WikiSQL / MultiNLI)."""
    paper = {k: dict(zip(ref.LORA_TABLE6["ranks"], v)) for k, v in ref.LORA_TABLE6["rows"].items()}
    p = [_table6_tests(paper[(t, "Wq,Wv")], paper[(t, "Wq")]) for t in ("WikiSQL", "MultiNLI")]
    checks = []
    for task, by_type in means.items():
        qv, q = by_type.get("Wq,Wv"), by_type.get("Wq")
        if not qv or not q:
            continue
        qv, q = {int(r): v for r, v in qv.items()}, {int(r): v for r, v in q.items()}
        gap_qv, gap_q, beats = _table6_tests(qv, q)
        r1 = min(qv)
        checks += [
            Check(f"{task}{where}: Wq,Wv at r={r1} within 1 point of its best r (gap)", gap_qv,
                  " / ".join(f"{g:.1f}" for g, _, _ in p), gap_qv <= 1.0),
            Check(f"{task}{where}: Wq alone gains more from a larger r than Wq,Wv does (gain Wq vs Wq,Wv)",
                  f"{gap_q:.1f} vs {gap_qv:.1f}", " / ".join(f"{pq:.1f} vs {pqv:.1f}" for pqv, pq, _ in p),
                  gap_q > gap_qv),
            Check(f"{task}{where}: Wq,Wv at r={r1} beats Wq at every r", beats, " / ".join(str(b) for _, _, b in p),
                  beats),
        ]
    return checks


def table6(d: Path) -> list[Check]:
    s = load_summary(TablesSummary, d)
    checks = table6_checks(s.table6_mean)
    for label, means in s.table6_by.items():
        checks += table6_checks(means, f" ({label})")
    return checks


def table_markdown(d: Path, which: str) -> list[str]:
    """Our table and the paper's, both as the paper lays them out (for the report)."""
    s = load_summary(TablesSummary, d)
    cells = s.table5_cells if which == "table5" else s.table6_cells
    return ["", "Ours (SST-2 dev accuracy, %):", "", *(markdown(cells[0], cells[1:]) if cells else []),
            *paper_table_markdown(which)]


def paper_table_markdown(which: str) -> list[str]:
    """The paper's Table 5 or 6 as it lays it out, with its caption."""
    paper = ref.LORA_TABLE5 if which == "table5" else ref.LORA_TABLE6
    lines = ["", f"Paper ({paper['source']}):", ""]
    if which == "table5":
        lines += markdown(["Weight type", *paper["columns"]],
                          [["Rank r", *paper["rank"]], *[[k, *v] for k, v in paper["rows"].items()]])
    else:
        lines += markdown(["Dataset", "Weight type", *[f"r={r}" for r in paper["ranks"]]],
                          [[t, w, *v] for (t, w), v in paper["rows"].items()])
    return lines


RECIPES = [
    Recipe("lora_fig3", "LoRA Figure 3: φ(A_r=8, A_r=64) for ΔWq, ΔWv", ref.LORA_FIG3,
           [["experiment=lora_fig3"]], [["subspace"]], fig3, "4 runs × ~1.5 min", sweep_name="lora_fig3"),
    Recipe("lora_fig4", "LoRA Figure 4: two seeds at r=64 and random Gaussian", ref.LORA_FIG4,
           [["experiment=lora_fig3"]], [["seeds"]], fig4, "shares lora_fig3's sweep", sweep_name="lora_fig3"),
    Recipe("lora_fig6_7", "LoRA Figures 6-7: Figures 3-4 across layers", ref.LORA_FIG6_7,
           [["experiment=lora_fig3"]], [["layers"]], fig6_7, "shares lora_fig3's sweep", sweep_name="lora_fig3"),
    Recipe("lora_fig8", "LoRA Figure 8: W's top singular directions vs ΔW's", ref.LORA_FIG8,
           [["experiment=lora_fig3"]], [["wsubspace"]], fig8, "shares lora_fig3's sweep", sweep_name="lora_fig3"),
    Recipe("lora_table7", "LoRA Table 7: ΔW amplifies directions of W", ref.LORA_TABLE7,
           [["experiment=lora_table7"]], [["amplification"]], table7, "2 runs × ~1.5 min"),
    Recipe("lora_table5", "LoRA Table 5: which matrices under a fixed budget", ref.LORA_TABLE5,
           [["experiment=lora_table5", *QUICK],
            ["experiment=lora_table5", "targets=[q,k],[q,v]", "rank=4", *QUICK],
            ["experiment=lora_table5", "targets=[q,k,v,o]", "rank=2", *QUICK]],
           [["tables"]], table5, "7 runs × ~1 min (150 steps)", tables=lambda d: table_markdown(d, "table5")),
    Recipe("lora_table6", "LoRA Table 6: accuracy by rank", ref.LORA_TABLE6,
           [["experiment=lora_table6", *QUICK]], [["tables"]], table6, "15 runs × ~1 min (150 steps)",
           tables=lambda d: table_markdown(d, "table6")),
]
