"""Intruder dimensions (arXiv 2410.21228): per adapted matrix, W0 + ΔW's top-k singular vectors nearly orthogonal to
all of W0's; counts per layer and method, the count against ε (the paper's Figure 5 form), and the mitigation
(each intruder's singular value scaled by λ) with the task evaluated before and after."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from analysis.commands import Command, Produced, base_model_flag, matrices_flag
from analysis.selection import UsageError, adapter_spec, load, out_dir, progress, updated, with_delta
from analysis.summaries import Summary

INIT_LABELS = {"pissa": "PiSSA", "milora": "MiLoRA", "olora": "OLoRA"}
EPSILONS = np.round(np.arange(0.05, 1.0, 0.05), 2)   # the x axis of the count-vs-ε figure


@dataclass
class IntrudersSummary(Summary):
    """Intruder dimensions (arXiv 2410.21228) per run: counts among W's top k at ε, and the mitigation's effect."""

    analysis: ClassVar[str] = "intruders"
    k: int
    epsilon: float
    lam: float
    runs: dict[str, str]                                 # label → run dir
    total: dict[str, int]                                # label → intruders summed over the adapted matrices
    per_matrix: dict[str, float]                         # label → mean intruders per adapted matrix
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)   # label → {"before": m, "after": m}
    figure: str = "intruder dimensions (arXiv 2410.21228, Figs. 4-5)"


def method_label(info) -> str:
    """The method as the papers name it: LoRA, DoRA, FT, MoRA, ..., and PiSSA/MiLoRA/OLoRA for LoRA's inits."""
    spec = adapter_spec(info.adapter)
    label = spec.label if spec else info.adapter
    init = ((info.run.config or {}).get("adapter") or {}).get("init")
    if init in INIT_LABELS:
        label = INIT_LABELS[init] if info.adapter == "lora" else f"{label}+{INIT_LABELS[init]}"
    if spec is not None and spec.uses_rank and info.rank is not None:
        label += f" r={info.rank}"
    return label


def figure(curves: dict[str, np.ndarray], per_layer, k: int, epsilon: float):
    """(a) intruders among the top k against ε (summed over the adapted matrices, mean over seeds), the paper's
    Figure 5 form; (b) intruders per layer at ε."""
    from analysis.figures import style

    with style() as plt:
        fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.2), layout="constrained")
        for label, counts in curves.items():
            a.plot(EPSILONS, counts, marker="o", ms=3, label=label)
        a.axvline(epsilon, color="0.6", lw=0.8, ls="--")
        a.set_xlabel(r"threshold $\epsilon$")
        a.set_ylabel(f"intruder dimensions (top {k})")
        a.set_title("(a) intruders vs. $\\epsilon$")
        for label, row in per_layer.iterrows():
            b.plot(row.index, row.values, marker="o", ms=3, label=label)
        b.set_xlabel("layer")
        b.set_ylabel(f"intruders at $\\epsilon$={epsilon:g}")
        b.set_title("(b) per layer")
        a.legend(fontsize=7)
    return fig


def _evaluate(info, deltas_by_module: dict, base: dict) -> float:
    """The run's task metric with W0 + ΔW put into the target modules (``deltas_by_module``; the rest of the run's
    trained weights as saved): the before/after of the mitigation."""
    import torch
    from omegaconf import OmegaConf

    import lowrank
    from lowrank.adapters.base import layer_kind, weight_matrix
    from lowrank.runner import data as task_data
    from lowrank.runner import models
    from lowrank.runner.evaluate import evaluate

    cfg = OmegaConf.create(info.run.config)
    model, tokenizer = models.load(cfg.model, cfg.task)
    lowrank.load_adapter(model, info.dir / "adapter")
    lowrank.merge_and_unload(model)
    with torch.no_grad():
        for name, delta in deltas_by_module.items():
            module = model.get_submodule(name)
            weight_matrix(module, layer_kind(module)).copy_((base[name].double() + delta).to(module.weight.dtype))
    data_dir = os.environ.get("LOWRANK_DATA_DIR") or cfg.paths.data_dir
    data = task_data.load(cfg.task, tokenizer, data_dir=data_dir, max_seq_len=cfg.trainer.max_seq_len,
                          max_eval_samples=cfg.trainer.max_eval_samples)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics, _ = evaluate(model.to(device), data, cfg.task, cfg.trainer, device)
    return float(metrics[f"eval/{cfg.task.metric}"])


def intruders(args) -> Produced:
    import pandas as pd
    from tqdm.auto import tqdm

    from analysis import figures
    from analysis.commands.spectrum import final_deltas
    from analysis.intruders import find, mitigate
    from analysis.names import parse_module_name

    infos = load(args)
    runs = with_delta(infos, args.seed)
    rows, curves, dirs, evaluation = [], {}, {}, {}
    for info in tqdm(runs, desc="intruders", disable=not progress(args)):
        label = method_label(info)
        deltas = {m: d for m, d in updated(final_deltas(info)).items() if parse_module_name(m)[1] in args.matrices}
        if not deltas:
            print(f"{info.dir.name} ({label}): no updated {'/'.join(args.matrices)} matrix, skipped", file=sys.stderr)
            continue
        base = info.run.base_weights()
        found = {m: find(base[m], d, k=args.k, epsilon=args.epsilon) for m, d in sorted(deltas.items())}
        for module, f in found.items():
            layer, kind = parse_module_name(module)
            rows.append({"method": label, "seed": info.seed, "run": str(info.dir), "module": module, "layer": layer,
                         "matrix": kind, "intruders": f.count, "indices": " ".join(map(str, f.indices)),
                         "min_max_cos": float(f.max_cos.min())})
        curves.setdefault(label, []).append([sum(f.count_at(e) for f in found.values()) for e in EPSILONS])
        dirs.setdefault(label, str(info.dir))
        if args.evaluate:
            mitigated = {m: mitigate(base[m], deltas[m], f.indices, args.lam) for m, f in found.items()}
            before = _evaluate(info, {m: d.double() for m, d in deltas.items()}, base)
            after = _evaluate(info, mitigated, base)
            evaluation.setdefault(label, []).append((before, after))
    if not rows:
        raise UsageError(f"no run updates a {'/'.join(args.matrices)} matrix; pass --matrices from those the runs adapt")
    df = pd.DataFrame(rows)
    out = out_dir(args, infos, "intruders")
    df.to_csv(out / "intruders_per_module.csv", index=False)
    seeds = df.groupby(["method", "seed", "layer"], dropna=False)["intruders"].sum().reset_index()
    per_layer = seeds.groupby(["method", "layer"])["intruders"].mean().unstack("layer")
    per_layer.to_csv(out / "intruders_per_layer.csv")
    files = [out / "intruders_per_module.csv", out / "intruders_per_layer.csv"]
    mean_curves = {label: np.mean(c, axis=0) for label, c in curves.items()}
    files += figures.save(figure(mean_curves, per_layer, args.k, args.epsilon), out / "intruders")
    totals = df.groupby(["method", "seed"], dropna=False)["intruders"].sum().groupby("method").mean()
    summary = IntrudersSummary(
        k=args.k, epsilon=args.epsilon, lam=args.lam, runs=dirs,
        total={m: float(v) for m, v in totals.items()},
        per_matrix={m: float(v) for m, v in df.groupby("method")["intruders"].mean().items()},
        evaluation={m: {"before": float(np.mean([b for b, _ in v])), "after": float(np.mean([a for _, a in v]))}
                    for m, v in evaluation.items()})
    table = pd.DataFrame({"intruders (sum over matrices)": totals,
                          "per matrix": df.groupby("method")["intruders"].mean()})
    if evaluation:
        table["metric before"] = pd.Series({m: e["before"] for m, e in summary.evaluation.items()})
        table[f"after λ={args.lam:g}"] = pd.Series({m: e["after"] for m, e in summary.evaluation.items()})
    print(table.round(3).to_string())
    return Produced(summary, out, files, {"intruders": df, "per_layer": per_layer.reset_index()},
                    [i.run.config or {} for i in infos], [str(i.dir) for i in infos])


def _flags(p) -> None:
    base_model_flag(p)
    matrices_flag(p)
    p.add_argument("-k", "--k", type=int, default=10, help="top-k singular vectors of W0+ΔW examined (10)")
    p.add_argument("--epsilon", type=float, default=0.5,
                   help="intruder when max |cos| with every W0 singular vector is below this (0.5)")
    p.add_argument("--lam", type=float, default=0.75,
                   help="mitigation: each intruder's singular value times λ (PEFT's default 0.75)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                   help="skip the task evaluation before and after the mitigation (loads model and data)")


COMMANDS = [Command("intruders", "Intruder dimensions (arXiv 2410.21228): counts per layer and method, count vs ε, "
                    "mitigation with the evaluation before and after", intruders, _flags)]
