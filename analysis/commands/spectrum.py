"""ΔW's singular value spectrum per run: full fine-tuning against LoRA/DoRA at several r (LoRA §4.1, §7)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from analysis.commands import Command, Produced, base_model_flag, matrices_flag
from analysis.selection import UsageError, adapter_spec, load, out_dir, updated, with_delta
from analysis.summaries import Summary


@dataclass
class SpectrumSummary(Summary):
    """The singular value spectrum of each ΔW (LoRA §4.1's low intrinsic rank), per run and matrix."""

    analysis: ClassVar[str] = "spectrum"
    matrix: list[str]
    runs: dict[str, str]                                 # label → run dir
    energy_top_r: dict[str, dict[str, float]]            # label → {"r=8": median fraction of ‖ΔW‖_F² in top 8}
    effective_rank: dict[str, float]                     # label → median entropy effective rank
    stable_rank: dict[str, float]                        # label → median ‖ΔW‖_F² / σ1²
    figure: str = "ΔW spectrum (LoRA §4.1, §7)"


def run_label(info) -> str:
    spec = adapter_spec(info.adapter)
    parts = [spec.label if spec else info.adapter]
    if spec is not None and spec.uses_rank and info.rank is not None:
        parts.append(f"r={info.rank}")
    if info.alpha is not None and spec is not None and spec.uses_rank:
        parts.append(f"α={info.alpha:g}")
    if info.seed is not None:
        parts.append(f"seed {info.seed}")
    return " ".join(parts)


def final_deltas(info) -> dict:
    """ΔW at the end of training: from the saved adapter, else from the last saved weights of the trajectory."""
    try:
        return info.run.deltas()
    except FileNotFoundError:
        last = max(info.run.weight_files(), default=None)
        if last is None:
            raise UsageError(f"run {info.dir} has neither adapter weights nor saved weights; re-run it") from None
        return info.run.deltas(step=last)


def spectrum(args) -> Produced:
    import pandas as pd

    from analysis import figures
    from analysis.names import conv_note, parse_module_name
    from analysis.spectrum import effective_rank, energy_top, singular_values, spectrum_figure, stable_rank

    infos = load(args)
    runs = with_delta(infos, args.seed)
    rows, spectra, dirs, noted = [], {}, {}, False
    labels = [run_label(i) for i in runs]
    for info, label in zip(runs, labels):
        if labels.count(label) > 1:  # e.g. two FT runs at different lr: tell them apart by their folder
            label = f"{label} ({info.dir.name})"
        deltas = {m: d for m, d in updated(final_deltas(info)).items() if parse_module_name(m)[1] in args.matrices}
        if conv_note(deltas) and not noted:
            noted = print(conv_note(deltas)) or True
        if not deltas:
            print(f"{info.dir.name} ({label}): no updated {'/'.join(args.matrices)} matrix, skipped", file=sys.stderr)
            continue
        for module, d in sorted(deltas.items()):
            s = singular_values(d)
            spectra.setdefault(label, []).append(s)
            layer, kind = parse_module_name(module)
            rows.append({"run": label, "module": module, "layer": layer, "matrix": kind, "norm": float(np.sqrt((s ** 2).sum())),
                         "effective_rank": effective_rank(s), "stable_rank": stable_rank(s),
                         **{f"energy_top{r}": energy_top(s, r) for r in args.top}})
        dirs[label] = str(info.dir)
    if not rows:
        raise UsageError(f"no run updates a {'/'.join(args.matrices)} matrix; pass --matrices from those the runs adapt")
    df = pd.DataFrame(rows)
    out = out_dir(args, infos, "spectrum")
    files = figures.save(spectrum_figure(spectra, ranks=args.top, matrix=", ".join(args.matrices)), out / "spectrum")
    df.to_csv(out / "spectrum_per_module.csv", index=False)
    files.append(out / "spectrum_per_module.csv")
    med = df.groupby("run", sort=False).median(numeric_only=True)
    summary = SpectrumSummary(
        matrix=list(args.matrices), runs=dirs,
        energy_top_r={run: {f"r={r}": float(row[f"energy_top{r}"]) for r in args.top} for run, row in med.iterrows()},
        effective_rank={run: float(row["effective_rank"]) for run, row in med.iterrows()},
        stable_rank={run: float(row["stable_rank"]) for run, row in med.iterrows()})
    print(med[["effective_rank", "stable_rank", *[f"energy_top{r}" for r in args.top]]].round(3).to_string())
    return Produced(summary, out, files, {"spectrum": df}, [i.run.config or {} for i in infos],
                    [str(i.dir) for i in infos])


def _flags(p) -> None:
    base_model_flag(p)
    matrices_flag(p, conv=True)
    p.add_argument("--top", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64],
                   help="r of the energy-in-top-r columns (and the lines on the figure)")


COMMANDS = [Command("spectrum", "ΔW's singular values, energy in the top r, effective rank", spectrum, _flags)]
