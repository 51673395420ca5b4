"""`python -m analysis <analysis> <run or sweep dirs> [options]`: the papers' figures and tables from runs.

    subspace       LoRA Fig. 3   φ(A_{r=8}, A_{r=64}, i, j) for Wq, Wv at one layer (+ 8×8 zoom)
    seeds          LoRA Fig. 4   φ(A_{r=64}, A'_{r=64}) across two seeds, with a random Gaussian panel
    layers         LoRA Figs. 6-7  the same for several layers
    wsubspace      LoRA Fig. 8   W's top-i right singular directions against A's, several r and random
    amplification  LoRA Table 7  ‖UᵀWVᵀ‖_F for ΔW / W / random directions, the factor, per layer
    decomposition  DoRA Fig. 2   ΔM vs ΔD over checkpoints, one panel per method (FT, LoRA, DoRA, ...)
    tables         LoRA Tables 5-6  metric by adapted matrices (budget-matched) and by rank
    spectrum       LoRA §4.1     ΔW's singular values: energy in the top r, effective rank (FT vs LoRA/DoRA)
    intruders      arXiv 2410.21228  W0+ΔW's top singular vectors orthogonal to W0's; mitigation, eval before/after
    ranks          AdaLoRA Fig. 4  AdaLoRA's final rank per layer × matrix beside FT's effective rank of ΔW

subspace, seeds, layers and wsubspace read the low-rank factors A, B (lora, dora, flora); amplification,
decomposition and spectrum read ΔW = W − W0 (lora, dora, flora, ia3, full, top, gradual: the registry's
has_delta). Other adapters are refused with one line.

Output goes to <sweep>/analysis/<analysis>/ (or --out): PNG + PDF figures, markdown/LaTeX/CSV tables,
the raw arrays (.npz) and summary.json; mirrored to W&B when the runs were configured for it.
"""

from __future__ import annotations

import argparse
import os
import sys

from analysis.commands import Produced
from analysis.selection import UsageError

__all__ = ["main", "build_parser", "ANALYSES", "UsageError"]


def _command(module: str, name: str):
    """The command ``name`` of ``analysis.commands.<module>``, imported when it runs (keeps --help fast)."""
    def run(args) -> Produced:
        from importlib import import_module

        return getattr(import_module(f"analysis.commands.{module}"), name)(args)

    return run


ANALYSES = {
    "subspace": (_command("subspace", "subspace"), "LoRA Figure 3: φ(A_{r=8}, A_{r=64}) for Wq and Wv at one layer"),
    "seeds": (_command("subspace", "seeds"), "LoRA Figure 4: φ across two seeds at r=64, with a random Gaussian panel"),
    "layers": (_command("subspace", "layers"), "LoRA Figures 6-7: Figures 3-4 for several layers"),
    "wsubspace": (_command("subspace", "wsubspace"), "LoRA Figure 8: W's top singular directions against A's"),
    "amplification": (_command("amplification", "amplification"), "LoRA Table 7: ΔW vs W amplification, per layer"),
    "decomposition": (_command("decomposition", "decomposition"), "DoRA Figure 2: magnitude vs direction over checkpoints"),
    "tables": (_command("tables", "tables"), "LoRA Tables 5-6 from a sweep's aggregate table"),
    "costs": (_command("costs", "costs"), "Cost model: predicted vs measured memory per method, stacked bars"),
    "spectrum": (_command("spectrum", "spectrum"), "ΔW's singular values, energy in the top r, effective rank"),
    "intruders": (_command("intruders", "intruders"), "Intruder dimensions (arXiv 2410.21228): counts per layer "
                  "and method, count vs ε, mitigation with the evaluation before and after"),
    "ranks": (_command("ranks", "ranks"), "AdaLoRA Figure 4: final rank per layer × matrix beside FT's effective rank"),
}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def finish(args, name: str, produced: Produced) -> int:
    """Write summary.json beside the outputs, mirror to W&B when configured, print the files."""
    from analysis.summaries import write_summary
    from analysis.wandb_log import log_outputs, wandb_settings

    files = list(produced.files) + [write_summary(produced.out, produced.summary)]
    if produced.run_configs is None:  # a sweep table carries no logger config: W&B only when asked for explicitly
        settings = wandb_settings([], args.wandb) if args.wandb in ("offline", "online") else None
    else:
        settings = wandb_settings(produced.run_configs, args.wandb)
    logged = log_outputs(settings, analysis=name, out_dir=produced.out, files=files, tables=produced.tables,
                         summary=_flat(produced.summary.to_json()), config={"inputs": produced.inputs})
    for f in files:
        print(f)
    if logged:
        print(f"logged to W&B ({settings['mode']}) project {settings['project']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, (_, help_) in ANALYSES.items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("paths", nargs="+", help="run directories and/or sweep directories")
        s.add_argument("--out", help="output directory (default: <sweep>/analysis)")
        s.add_argument("--wandb", choices=["auto", "off", "offline", "online"], default="auto",
                       help="mirror to W&B: auto = when the runs used the wandb logger (default)")
        s.add_argument("--progress", action="store_true", help="progress bars even when not on a terminal")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.add_argument("--seed", type=int, default=None, help="which training seed's runs to use")
        s.add_argument("--random-seed", type=int, default=0, help="seed of the random baselines")
        if name != "tables":
            s.add_argument("--base-model", default=None,
                           help="base model of PEFT adapter folders (default: their base_model_name_or_path)")
        if name not in ("decomposition", "tables", "spectrum", "intruders", "ranks"):
            s.add_argument("--adapter", default=None, help="adapter whose runs to use (default: lora when present)")
        if name in ("subspace", "seeds", "layers"):
            s.add_argument("--factor", choices=["A", "B", "dW"], default="A",
                           help="A: right singular vectors of A (the paper); B: left singular vectors of B (fn. 7); "
                                "dW: right singular vectors of ΔW = sBA")
        if name in ("subspace", "seeds", "wsubspace", "amplification"):
            s.add_argument("--layer", type=int, default=None, help="module layer index (default: the middle layer)")
        if name in ("subspace", "layers", "wsubspace", "amplification"):
            s.add_argument("--ranks", type=int, nargs="+", default=None,
                           help="ranks to compare (default: all/min+max); amplification of a method without a "
                                "rank (ia3, full, top, gradual): the r of ΔW's top-r directions, required")
        if name in ("seeds", "layers"):
            s.add_argument("--rank", type=int, default=None, help="rank of the two-seed comparison (default: max)")
            s.add_argument("--seeds", type=int, nargs=2, default=None,
                           help="the two seeds (default: the two lowest; seeds also summarises every pair)")
        if name == "seeds":
            s.add_argument("--corner", type=int, default=8, help="the i, j <= corner zoom summarised (paper: 8)")
            s.add_argument("--chance-draws", type=int, default=200,
                           help="random Gaussian pairs drawn for the above-chance threshold")
        if name == "layers":
            s.add_argument("--layers", type=int, nargs="+", default=None, help="layers (default: 4 spread out)")
        if name == "wsubspace":
            s.add_argument("--matrix", choices=list("qkvo"), default="q")
            s.add_argument("--top", type=int, default=None, help="W's top-i directions shown (default: 10%% of d)")
            s.add_argument("--i-start", type=int, default=1, help="first i row shown")
            s.add_argument("--vmin", type=float, default=0.1, help="colour bar minimum (paper: 0.1)")
            s.add_argument("--vmax", type=float, default=0.2, help="colour bar maximum (paper: 0.2)")
        if name == "amplification":
            s.add_argument("--matrices", nargs="+", choices=[*"qkvo", "conv"], default=["q", "v"],
                           help="matrix kinds (the first one is tabulated in the paper layout); conv: a ConvNet's "
                                "convolutions")
            s.add_argument("--svd", choices=["auto", "full", "lanczos"], default="auto",
                           help="W's top-r SVD: exact, truncated (Lanczos), or auto by size")
        if name == "decomposition":
            s.add_argument("--matrix", choices=list("qkvo"), default="q", help="q = DoRA Fig. 2, v = Fig. 7")
            s.add_argument("--rank", type=int, default=None, help="LoRA/DoRA rank to use (default: DoRA's)")
            s.add_argument("--include-step0", action="store_true",
                           help="keep step 0 (W = W0, so ΔM = ΔD = 0) in the scatter")
            s.add_argument("--exclude-layers", type=int, nargs="+", default=None, help="layers left out (e.g. 5)")
            s.add_argument("--last-k", type=int, default=None, help="keep only each run's last k saved steps")
            s.add_argument("--bootstrap", type=int, default=1000,
                           help="resamples of layers for the 95%% interval of the pooled r (0 = none)")
            s.add_argument("--relative-m", action="store_true",
                           help="ΔM relative to ‖W0_n‖ (a labelled extra, not the paper's definition)")
        if name == "spectrum":
            s.add_argument("--matrices", nargs="+", choices=[*"qkvo", "conv"], default=["q", "v"],
                           help="matrix kinds; conv: a ConvNet's convolutions")
            s.add_argument("--top", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64],
                           help="r of the energy-in-top-r columns (and the lines on the figure)")
        if name == "intruders":
            s.add_argument("--matrices", nargs="+", choices=list("qkvo"), default=["q", "v"])
            s.add_argument("-k", "--k", type=int, default=10, help="top-k singular vectors of W0+ΔW examined (10)")
            s.add_argument("--epsilon", type=float, default=0.5,
                           help="intruder when max |cos| with every W0 singular vector is below this (0.5)")
            s.add_argument("--lam", type=float, default=0.75,
                           help="mitigation: each intruder's singular value times λ (PEFT's default 0.75)")
            s.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                           help="skip the task evaluation before and after the mitigation (loads model and data)")
        if name == "tables":
            s.add_argument("--metric", default=None, help="metric column (default: the accuracy-like one)")
            s.add_argument("--budget", type=int, default=None, help="rank units per layer for Table 5 (e.g. 8)")
            s.add_argument("--targets-col", default="targets")
            s.add_argument("--rank-col", default="rank")
            s.add_argument("--task-col", default="task")
            s.add_argument("--by", default=None, help="also tabulate Table 6 per value of this column (e.g. alpha)")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    args = build_parser().parse_args(argv)
    fn = ANALYSES[args.analysis][0]
    try:
        return finish(args, args.analysis, fn(args))
    except BrokenPipeError:  # output piped into `head`: the files are written, stop quietly
        sys.stderr.close()
        return 0
    except (UsageError, ValueError, KeyError, LookupError, FileNotFoundError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"python -m analysis {args.analysis}: error: {msg}", file=sys.stderr)
        return 2
