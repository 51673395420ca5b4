"""One recipe per paper artefact: its sweep (a ``conf/experiment`` preset), its analysis, the paper's
reference numbers and the qualitative claims to check.

A recipe never reaches into training code: it runs ``run.py`` (which skips completed jobs and resumes
interrupted ones, so a finished sweep is reused, not re-trained), then ``python -m analysis`` on the
sweep directory, then reads the analysis' ``summary.json`` (or the sweep table through
``lowrank.runner.results``) to write a report of our numbers beside the paper's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from experiments import references as ref


@dataclass
class Check:
    """One line of a report: a quantity, our value, the paper's, and whether the paper's claim holds."""

    what: str
    ours: object
    paper: object = None
    holds: bool | None = None

    def line(self) -> str:
        verdict = {True: "yes", False: "NO", None: "-"}[self.holds]
        return f"| {self.what} | {_fmt(self.ours)} | {_fmt(self.paper)} | {verdict} |"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


@dataclass
class Recipe:
    name: str
    artefact: str
    reference: dict
    sweeps: list[list[str]]                  # one run.py -m argument list per sweep, all into one sweep dir
    analyses: list[list[str]]                # `python -m analysis` arguments after the sweep dir is appended
    checks: Callable[[Path], list[Check]]    # reads the analysis outputs of the sweep dir
    budget: str                              # wall time on the embedded default, 2-core CPU
    sweep_name: str = ""                     # recipes that analyse the same sweep share its directory
    extra_runs: list[tuple[str, list[str]]] = field(default_factory=list)  # (run subdir, run.py args)
    collect: Callable[[Path], None] | None = None  # writes recipe-specific numbers into the sweep dir
    tables: Callable[[Path], list[str]] | None = None  # extra report lines (markdown), e.g. the paper's table

    @property
    def sweep(self) -> str:
        return self.sweep_name or self.name


def summary(sweep_dir: Path, analysis: str) -> dict:
    return json.loads((sweep_dir / "analysis" / analysis / "summary.json").read_text())


# ---- checks ------------------------------------------------------------------------------------------

def _fig3(d: Path) -> list[Check]:
    s = summary(d, "subspace")
    return [Check(f"φ(1,1) ΔW{k}, layer {s['layer']}, r={s['ranks'][0]} vs r={s['ranks'][1]}", s["phi_11"][k],
                  "> 0.5", s["phi_11"][k] > ref.LORA_FIG3["threshold"]) for k in "qv"] + [
        Check("chance level max(i,j)/d", s["chance_level_max"])]


def _fig4(d: Path) -> list[Check]:
    s = summary(d, "seeds")
    m = s["mean_phi"]
    return [
        Check(f"mean φ across seeds, ΔWq (r={s['rank']}, layer {s['layer']})", m["q"], "> random", m["q"] > m["random"]),
        Check(f"mean φ across seeds, ΔWv (r={s['rank']}, layer {s['layer']})", m["v"], "> random", m["v"] > m["random"]),
        Check("mean φ, two random Gaussian matrices", m["random"], "≈ chance"),
        Check("ΔWq shares more directions across seeds than ΔWv", f"{m['q']:.3f} vs {m['v']:.3f}", "yes",
              m["q"] > m["v"]),
    ]


def _fig6_7(d: Path) -> list[Check]:
    s = summary(d, "layers")
    checks = []
    if "fig6" in s:
        r1, r2 = s["fig6"]["ranks"]
        for layer, by_k in s["fig6"]["phi_11"].items():
            checks += [Check(f"Fig. 6, layer {layer}: φ(1,1) ΔW{k}, r={r1} vs r={r2}", v, "> 0.5",
                             v > ref.LORA_FIG6_7["threshold"]) for k, v in by_k.items()]
    if "fig7" in s:
        rank, (a, b) = s["fig7"]["rank"], s["fig7"]["seeds"]
        chance = s["fig7"].get("chance_mean_phi")  # two random subspaces: the grid mean of max(i, j)/d
        for layer, by_k in s["fig7"]["mean_phi"].items():
            q, v = by_k["q"], by_k["v"]
            checks.append(Check(f"Fig. 7, layer {layer}: mean φ across seeds {a},{b} (r={rank}), ΔWq / ΔWv",
                                f"{q:.3f} / {v:.3f}", f"> chance ({chance:.3f})" if chance else "> chance",
                                (min(q, v) > chance) if chance else None))
    return checks


def _fig8(d: Path) -> list[Check]:
    s = summary(d, "wsubspace")
    rows = []
    for label, by_j in s["phi_at_top_i"].items():
        j4 = by_j.get("j=4", next(iter(by_j.values())))
        rows.append(Check(f"φ(W{s['matrix']} top {s['top_i']} of {s['d']}, {label} top-4)", j4, "≤ ~0.2",
                          j4 <= 0.25 if label != "rand" else None))
    rows.append(Check("chance level top_i/d", s["chance_level_at_top_i"]))
    return rows


def _table7(d: Path) -> list[Check]:
    s = summary(d, "amplification")
    at = s["at_layer"]
    ranks = sorted(int(k.split("=")[1]) for k in at)
    checks = []
    for r in ranks:
        row, paper = at[f"r={r}"], ref.LORA_TABLE7["rows"].get(r, {})
        checks += [
            Check(f"r={r}: ‖UᵀWVᵀ‖ ΔW directions (layer {s['layer']}, W{s['matrix']})", row["delta"], paper.get("delta")),
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
        lo, hi = at[f"r={ranks[0]}"]["factor"], at[f"r={ranks[-1]}"]["factor"]
        checks.append(Check(f"factor larger at r={ranks[0]} than at r={ranks[-1]}", f"{lo:.3g} vs {hi:.3g}", "21.5 vs 1.9",
                            lo > hi))
    return checks


def _read_table(d: Path, which: str):
    import pandas as pd

    return pd.read_csv(d / "analysis" / "tables" / f"{which}.csv", dtype=str, keep_default_na=False)


def _markdown(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(map(str, row)) + " |" for row in rows]]


def _mean(cell) -> float:
    """The mean of a table cell written "mean" or "mean ± std"."""
    return float(str(cell).split("±")[0])


def _numeric_row(table) -> dict[str, float]:
    """The first task row of a Table 5 CSV as {weight type: mean}."""
    rows = table[table.iloc[:, 0] != "Rank r"]
    if rows.empty:
        return {}
    out = {}
    for col, cell in rows.iloc[0].items():
        try:
            out[col] = _mean(cell)
        except ValueError:
            continue
    return out


def _table5(d: Path) -> list[Check]:
    values = _numeric_row(_read_table(d, "table5"))
    if not values:
        return []
    best = max(values, key=values.get)
    checks = [Check("best weight type at the budget", best, "Wq,Wv or Wq,Wk,Wv,Wo", best in ("Wq,Wv", "Wq,Wk,Wv,Wo"))]
    qv, singles = values.get("Wq,Wv"), [v for k, v in values.items() if "," not in k]
    if qv is not None and singles:
        checks.append(Check("Wq,Wv (r=4) ≥ every single matrix (r=8)", qv, "yes", qv >= max(singles)))
    return checks


def _table6(d: Path) -> list[Check]:
    """LoRA §7.2 on Table 6: "a rank as small as one suffices for adapting both Wq and Wv … while training Wq
    alone needs a larger r". Each check is computed on the paper's rows too, so the paper column says whether
    the paper's own numbers pass the same test (WikiSQL / MultiNLI)."""
    table = _read_table(d, "table6")
    rank_cols = [c for c in table.columns if c.startswith("r=")]
    ranks = [int(c[2:]) for c in rank_cols]
    ours = {(row["Dataset"], row["Weight type"]): [_mean(row[c]) for c in rank_cols]
            for _, row in table.iterrows()}
    paper_ranks = ref.LORA_TABLE6["ranks"]
    paper = {k: dict(zip(paper_ranks, v)) for k, v in ref.LORA_TABLE6["rows"].items()}

    def tests(at: dict[int, float], q: dict[int, float]) -> tuple[float, float, bool]:
        r1 = min(at)
        return max(at.values()) - at[r1], max(q.values()) - q[r1], at[r1] > max(q.values())

    checks = []
    for task in dict.fromkeys(t for t, _ in ours):
        qv, q = ours.get((task, "Wq,Wv")), ours.get((task, "Wq"))
        if qv is None or q is None:
            continue
        gap_qv, gap_q, beats = tests(dict(zip(ranks, qv)), dict(zip(ranks, q)))
        p = [tests(paper[(t, "Wq,Wv")], paper[(t, "Wq")]) for t in ("WikiSQL", "MultiNLI")]
        r1 = min(ranks)
        checks += [
            Check(f"{task}: Wq,Wv at r={r1} within 1 point of its best r (gap)", gap_qv,
                  " / ".join(f"{g:.1f}" for g, _, _ in p), gap_qv <= 1.0),
            Check(f"{task}: Wq alone gains more from a larger r than Wq,Wv does (gain Wq vs Wq,Wv)",
                  f"{gap_q:.1f} vs {gap_qv:.1f}", " / ".join(f"{pq:.1f} vs {pqv:.1f}" for pqv, pq, _ in p),
                  gap_q > gap_qv),
            Check(f"{task}: Wq,Wv at r={r1} beats Wq at every r", beats, " / ".join(str(b) for _, _, b in p), beats),
        ]
    return checks


def table_markdown(d: Path, which: str) -> list[str]:
    """Our table and the paper's, both as the paper lays them out (for the report)."""
    table = _read_table(d, which)
    paper = ref.LORA_TABLE5 if which == "table5" else ref.LORA_TABLE6
    lines = ["", "Ours (SST-2 dev accuracy, %):", "", *_markdown(list(table.columns), table.values.tolist()),
             "", f"Paper ({paper['source']}):", ""]
    if which == "table5":
        lines += _markdown(["Weight type", *paper["columns"]],
                           [["Rank r", *paper["rank"]], *[[k, *v] for k, v in paper["rows"].items()]])
    else:
        lines += _markdown(["Dataset", "Weight type", *[f"r={r}" for r in paper["ranks"]]],
                           [[t, w, *v] for (t, w), v in paper["rows"].items()])
    return lines


def _dora_fig2(d: Path) -> list[Check]:
    s = summary(d, "decomposition")
    paper = ref.DORA_FIG2["correlation"]
    names = {"FT": "full", "LoRA": "lora", "DoRA": "dora"}
    checks = []
    for method, r in s["pearson_r"].items():
        p = paper[names[method]]
        checks.append(Check(f"corr(ΔD, ΔM) {method} ({s['points'][method]} points)", r, p,
                            (r > 0) == (p > 0)))
    if {"LoRA", "DoRA"} <= set(s["pearson_r"]):
        checks.append(Check("DoRA's correlation below LoRA's", s["pearson_r"]["DoRA"] < s["pearson_r"]["LoRA"], "yes",
                            s["pearson_r"]["DoRA"] < s["pearson_r"]["LoRA"]))
    return checks


def _flora(d: Path) -> list[Check]:
    report = json.loads((d / "flora_params.json").read_text())
    checks = []
    for row in report["counts"]:
        checks.append(Check(f"{row['layer']}: FLoRA / LoRA trainable parameters ({row['lora_convention']})",
                            f"{row['flora']:,} / {row['lora']:,} = {row['ratio']:.1%}", row.get("paper"),
                            None if row.get("expect_fewer") is None else (row["ratio"] < 1) == row["expect_fewer"]))
    for row in report.get("accuracy", []):
        checks.append(Check(f"SST-2 accuracy at ≈ equal parameters: {row['adapter']} ({row['trainable']:,} trainable)",
                            row["accuracy"]))
    return checks


def flora_params(sweep_dir: Path) -> None:
    """Trainable parameters of FLoRA and LoRA on real layers (counted from the modules, not a formula),
    and the accuracy of the sweep's LoRA and FLoRA runs at r=8 (≈ equal parameters on linear layers)."""
    import torch
    from torch import nn

    from lowrank.adapters import FLoRA, LoRA
    from lowrank.runner.results import load_sweep

    def trainable(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    conv = lambda: nn.Conv2d(256, 512, 3)  # noqa: E731  FLoRA's worked parameter count: k=3, 256→512, r=32
    linear = lambda: nn.Linear(384, 384)   # noqa: E731  a MiniLM attention projection
    paper = ref.FLORA_PARAMS["conv_example"]
    counts = []
    flora_conv = trainable(FLoRA(conv(), [32, 32, 2, 2]))
    # loralib's ConvLoRA: A (r·k, in·k), B (out·k, r·k)
    loralib_conv = 32 * 3 * 256 * 3 + 512 * 3 * 32 * 3
    for name, lora, p in (("loralib ConvLoRA", loralib_conv, paper["lora_loralib"]),
                          ("PEFT Conv2d (out × in·k²)", trainable(LoRA(conv(), 32)), paper["lora_reshape_out_by_in_k2"])):
        counts.append({"layer": "Conv2d 256→512 k=3, r=32", "lora_convention": name, "flora": flora_conv, "lora": lora,
                       "ratio": flora_conv / lora, "paper": f"{paper['flora']:,} / {p:,}", "expect_fewer": True})
    fl, lo = trainable(FLoRA(linear(), 8)), trainable(LoRA(linear(), 8))
    counts.append({"layer": "Linear 384→384, r=8", "lora_convention": "LoRA r(in+out)", "flora": fl, "lora": lo,
                   "ratio": fl / lo, "paper": "slightly more (r² extra)", "expect_fewer": False})
    accuracy = []
    table = load_sweep(sweep_dir)
    metric = next((c for c in table.columns if c.startswith("final/") and "accuracy" in c), None)
    for _, row in table[table["status"] == "completed"].iterrows():
        accuracy.append({"adapter": row["adapter"], "trainable": int(row["trainable_params"]),
                         "accuracy": float(row[metric]) if metric else None})
    torch.manual_seed(0)
    (sweep_dir / "flora_params.json").write_text(json.dumps({"counts": counts, "accuracy": accuracy}, indent=2))


# ---- the registry ---------------------------------------------------------------------------------------

QUICK = ["trainer.max_steps=150", "trainer.eval_every=150", "trainer.checkpoint_every=150"]

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("lora_fig3", "LoRA Figure 3: φ(A_r=8, A_r=64) for ΔWq, ΔWv", ref.LORA_FIG3,
           [["experiment=lora_fig3"]], [["subspace"]], _fig3, "4 runs × ~1.5 min", sweep_name="lora_fig3"),
    Recipe("lora_fig4", "LoRA Figure 4: two seeds at r=64 and random Gaussian", ref.LORA_FIG4,
           [["experiment=lora_fig3"]], [["seeds"]], _fig4, "shares lora_fig3's sweep", sweep_name="lora_fig3"),
    Recipe("lora_fig6_7", "LoRA Figures 6-7: Figures 3-4 across layers", ref.LORA_FIG6_7,
           [["experiment=lora_fig3"]], [["layers"]], _fig6_7, "shares lora_fig3's sweep", sweep_name="lora_fig3"),
    Recipe("lora_fig8", "LoRA Figure 8: W's top singular directions vs ΔW's", ref.LORA_FIG8,
           [["experiment=lora_fig3"]], [["wsubspace"]], _fig8, "shares lora_fig3's sweep", sweep_name="lora_fig3"),
    Recipe("lora_table7", "LoRA Table 7: ΔW amplifies directions of W", ref.LORA_TABLE7,
           [["experiment=lora_table7"]], [["amplification"]], _table7, "2 runs × ~1.5 min"),
    Recipe("lora_table5", "LoRA Table 5: which matrices under a fixed budget", ref.LORA_TABLE5,
           [["experiment=lora_table5", *QUICK],
            ["experiment=lora_table5", "targets=[q,k],[q,v]", "rank=4", *QUICK],
            ["experiment=lora_table5", "targets=[q,k,v,o]", "rank=2", *QUICK]],
           [["tables"]], _table5, "7 runs × ~1 min (150 steps)", tables=lambda d: table_markdown(d, "table5")),
    Recipe("lora_table6", "LoRA Table 6: accuracy by rank", ref.LORA_TABLE6,
           [["experiment=lora_table6", *QUICK]], [["tables"]], _table6, "15 runs × ~1 min (150 steps)",
           tables=lambda d: table_markdown(d, "table6")),
    Recipe("dora_fig2", "DoRA Figure 2: magnitude vs direction over training", ref.DORA_FIG2,
           [["experiment=dora_fig2"]], [["decomposition"]], _dora_fig2, "3 runs × ~1.5 min",
           extra_runs=[("adapter=full", ["experiment=dora_fig2", "adapter=full", "trainer.lr=5e-5"])]),
    Recipe("flora_params", "FLoRA vs LoRA at equal trainable parameters (linear and convolution)",
           ref.FLORA_PARAMS, [["adapter=lora,flora", "rank=8", *QUICK]], [],
           _flora, "2 runs × ~1 min + parameter counts", collect=lambda d: flora_params(d)),
)}
