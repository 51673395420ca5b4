"""AdaLoRA's final rank per layer × matrix as a heat map (AdaLoRA arXiv 2303.10512, Figure 1 / Figure 4 style),
beside the entropy effective rank (``analysis.spectrum.effective_rank``) of full fine-tuning's ΔW for the same
layers: where AdaLoRA puts its budget against where the unconstrained update has its rank.

AdaLoRA runs: ``adapter=adalora`` and DoRA with ``allocate=adalora``; their final ranks come from result.json
(``allocated_ranks``), the adapter config, or a PEFT AdaLoRA folder's ``rank_pattern``. Full fine-tuning runs
(``adapter=full``) give ΔW = W − W0. Either side may be missing; at least one must be there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from analysis.commands import Command, Produced, base_model_flag
from analysis.selection import UsageError, chosen_seed, load, out_dir
from analysis.summaries import Summary

#: the matrix kinds in the order of the paper's Figure 4 rows (attention first, then the MLP)
KIND_ORDER = ("q", "k", "v", "o", "up", "gate", "down")


@dataclass
class RanksSummary(Summary):
    """AdaLoRA's final rank per layer × matrix beside full fine-tuning's effective rank of ΔW (AdaLoRA Fig. 4)."""

    analysis: ClassVar[str] = "ranks"
    runs: dict[str, str]                                 # panel title → run dir
    seed: int | None
    total: dict[str, float]                              # panel → Σ over modules (AdaLoRA: the final budget)
    by_kind: dict[str, dict[str, float]]                 # panel → {matrix kind: Σ over layers}
    figure: str = "AdaLoRA Figure 4 (final ranks) beside FT's effective rank"


def allocating(info) -> bool:
    """An AdaLoRA run, or DoRA with AdaLoRA's allocation."""
    options = ((info.run.config or {}).get("adapter") or {}).get("options") or {}
    return info.adapter == "adalora" or (info.adapter == "dora" and options.get("allocate") == "adalora")


def allocated_ranks(info) -> dict[str, int]:
    """``{module: final rank}`` of an allocating run (or a PEFT AdaLoRA adapter folder)."""
    ranks = (info.run.result or {}).get("allocated_ranks")
    if ranks:
        return dict(ranks)
    config = info.run.adapter_config
    if config.get("allocated_ranks"):
        return dict(config["allocated_ranks"])
    if config.get("peft_type") == "ADALORA":
        pattern = config.get("rank_pattern") or {}
        modules = config.get("target_modules") or []
        found = {k.rsplit(".lora_E", 1)[0]: int(sum(v)) for k, v in pattern.items()}
        return found or {m: int(config.get("init_r", 12)) for m in modules}
    raise UsageError(f"run {info.dir} records no allocated ranks (result.json allocated_ranks); re-run it with this "
                     f"version of lowrank")


def grid(per_module: dict[str, float]) -> tuple[list[str], list[int], np.ndarray]:
    """(matrix kinds, layers, values[kind, layer]) with NaN where a module is absent."""
    from analysis.names import parse_module_name

    cells = {}
    for module, value in per_module.items():
        layer, kind = parse_module_name(module)
        if layer is not None and kind is not None:
            cells[(kind, layer)] = float(value)
    kinds = sorted({k for k, _ in cells}, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))
    layers = sorted({layer for _, layer in cells})
    values = np.full((len(kinds), len(layers)), np.nan)
    for (kind, layer), value in cells.items():
        values[kinds.index(kind), layers.index(layer)] = value
    return kinds, layers, values


def heatmap_figure(panels: dict[str, tuple[list[str], list[int], np.ndarray]], *, integer: dict[str, bool]):
    """One heat map per panel: rows W_q, W_v, ... (as the paper), columns layers 1..L, each cell annotated."""
    from analysis.figures import style

    with style() as plt:
        width = sum(0.45 * len(layers) + 1.4 for _, layers, _ in panels.values())
        height = 0.45 * max(len(kinds) for kinds, _, _ in panels.values()) + 1.3
        fig, axes = plt.subplots(1, len(panels), figsize=(max(width, 4.0), height), layout="constrained", squeeze=False)
        for ax, (title, (kinds, layers, values)) in zip(axes[0], panels.items()):
            image = ax.imshow(values, cmap="YlGn", aspect="auto")
            ax.set_xticks(range(len(layers)), [str(layer + 1) for layer in layers])
            ax.set_yticks(range(len(kinds)), [f"$W_{{{k}}}$" for k in kinds])
            ax.set_xlabel("layer")
            ax.set_title(title)
            for (i, j), value in np.ndenumerate(values):
                if np.isfinite(value):
                    text = f"{value:.0f}" if integer[title] else f"{value:.1f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6,
                            color="white" if image.norm(value) > 0.6 else "black")
            fig.colorbar(image, ax=ax, shrink=0.8)
        return fig


def ranks(args) -> Produced:
    import pandas as pd

    from analysis import figures
    from analysis.commands.spectrum import final_deltas
    from analysis.names import parse_module_name
    from analysis.spectrum import effective_rank, singular_values

    infos = load(args)
    adaptive = [i for i in infos if allocating(i)]
    full = [i for i in infos if i.adapter == "full"]
    if not adaptive and not full:
        raise UsageError(f"no AdaLoRA run (adapter=adalora, or dora with allocate=adalora) and no full fine-tuning "
                         f"run among {sorted({i.adapter for i in infos})}; pass runs of those")
    seed = chosen_seed(args, adaptive + full)
    pick = [i for i in adaptive if seed is None or i.seed == seed]
    panels, rows, runs, integer = {}, [], {}, {}
    for info in sorted(pick, key=lambda i: (i.adapter, i.rank or 0)):
        title = f"{'AdaLoRA' if info.adapter == 'adalora' else 'DoRA + AdaLoRA allocation'} r={info.rank}: final rank"
        per_module = allocated_ranks(info)
        panels[title], integer[title], runs[title] = grid(per_module), True, str(info.dir)
        rows += [{"run": title, "module": m, "value": v, "quantity": "allocated rank"} for m, v in per_module.items()]
    reference = [i for i in full if seed is None or i.seed == seed][:1]
    for info in reference:
        title = "FT: effective rank of ΔW"
        kinds = {kind for g in panels.values() for kind in g[0]}   # the matrices AdaLoRA adapted (all if none)
        deltas = {m: d for m, d in final_deltas(info).items()
                  if (not kinds or parse_module_name(m)[1] in kinds) and bool(d.any())}
        per_module = {m: effective_rank(singular_values(d)) for m, d in deltas.items()}
        panels[title], integer[title], runs[title] = grid(per_module), False, str(info.dir)
        rows += [{"run": title, "module": m, "value": v, "quantity": "effective rank"} for m, v in per_module.items()]
    if not rows:
        raise UsageError(f"no run at seed {seed} to plot; pass --seed with one of "
                         f"{sorted({i.seed for i in adaptive + full}, key=str)}")
    out = out_dir(args, infos, "ranks")
    files = figures.save(heatmap_figure(panels, integer=integer), out / "ranks")
    df = pd.DataFrame(rows)
    df.to_csv(out / "ranks_per_module.csv", index=False)
    files.append(out / "ranks_per_module.csv")
    summary = RanksSummary(runs=runs, seed=seed,
                           total={t: float(np.nansum(g[2])) for t, g in panels.items()},
                           by_kind={t: {k: float(np.nansum(g[2][n])) for n, k in enumerate(g[0])}
                                    for t, g in panels.items()})
    print(df.pivot_table(index="module", columns="run", values="value").round(2).to_string())
    return Produced(summary, out, files, {"ranks": df}, [i.run.config or {} for i in infos], [str(i.dir) for i in infos])


COMMANDS = [Command("ranks", "AdaLoRA Figure 4: final rank per layer × matrix beside FT's effective rank", ranks,
                    base_model_flag)]
