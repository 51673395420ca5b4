"""The typed results of each analysis: what `python -m analysis` writes as summary.json and the recipes read.

Each analysis returns one of these dataclasses. ``write_summary`` stores it (atomically) as
``<out>/<analysis>/summary.json``; ``load_summary(Summary, sweep_dir)`` reads it back as the same type,
so that a reader never indexes raw JSON keys or parses formatted table cells.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, TypeVar

from lowrank.atomic import write_json

__all__ = ["Summary", "SubspaceSummary", "SeedsSummary", "LayersSummary", "WSubspaceSummary",
           "AmplificationSummary", "DecompositionSummary", "TablesSummary", "SpectrumSummary", "IntrudersSummary",
           "RanksSummary", "write_summary", "load_summary", "summary_path"]

S = TypeVar("S", bound="Summary")


@dataclass
class Summary:
    analysis: ClassVar[str] = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls: type[S], data: dict) -> S:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class SubspaceSummary(Summary):
    """LoRA Figure 3: φ(A_{r1}, A_{r2}, i, j) at one layer, for Wq and Wv."""

    analysis: ClassVar[str] = "subspace"
    factor: str
    layer: int
    ranks: list[int]
    seed: int | None
    runs: list[str]
    phi_11: dict[str, float]                 # {"q": φ(1,1), "v": φ(1,1)}
    phi_full: dict[str, float]               # φ(r1, r2)
    chance_level_max: float                  # max(r1, r2)/d: φ of two random subspaces at (r1, r2)
    figure: str = "LoRA Figure 3"


@dataclass
class SeedsSummary(Summary):
    """LoRA Figure 4: φ(A, A') of two seeds at one rank, with a random Gaussian panel."""

    analysis: ClassVar[str] = "seeds"
    factor: str
    layer: int
    rank: int
    seeds: list[int]
    runs: list[str]
    phi_11: dict[str, float]
    mean_phi: dict[str, float]               # {"q", "v", "random"}: the grid mean of φ(i, j)
    random_max: float
    figure: str = "LoRA Figure 4"
    corner: int = 8                          # the i, j ≤ corner zoom the paper reads
    # every seed pair and layer (pairs of "seed_a,seed_b" → layer → kind → number)
    corner_mean: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    above_chance: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    chance_corner_mean: float | None = None
    chance_threshold: float | None = None    # the random panel's 95th percentile of φ(i, i) on the diagonal


@dataclass
class LayersSummary(Summary):
    """LoRA Figures 6-7: Figures 3 and 4 for several layers (either part absent when the runs lack it)."""

    analysis: ClassVar[str] = "layers"
    fig6: dict | None = None   # {"ranks", "layers", "phi_11": {layer: {kind: φ(1,1)}}}
    fig7: dict | None = None   # {"rank", "seeds", "layers", "mean_phi": {layer: {kind: mean φ}}, "chance_mean_phi"}
    figures: str = "LoRA Figures 6 and 7"


@dataclass
class WSubspaceSummary(Summary):
    """LoRA Figure 8: W's top-i right singular directions against A's top-j, for several r and random."""

    analysis: ClassVar[str] = "wsubspace"
    layer: int
    matrix: str
    top_i: int
    d: int
    runs: dict[str, str]
    phi_at_top_i: dict[str, dict[str, float]]   # {"r=8" | "rand": {"j=1": φ, "j=4": φ, ...}}
    chance_level_at_top_i: float
    figure: str = "LoRA Figure 8"


@dataclass
class AmplificationSummary(Summary):
    """LoRA Table 7 at one layer and matrix, and the per-layer medians."""

    analysis: ClassVar[str] = "amplification"
    layer: int
    matrix: str
    ranks: list[int]
    seed: int | None
    runs: dict[str, str]
    at_layer: dict[str, dict[str, float]]   # {"r=8": {delta, own, random, random_expected, norm_W, norm_delta, factor}}
    median_over_layers: dict[str, dict[str, float]]
    table: str = "LoRA Table 7"

    def row(self, r: int) -> dict[str, float]:
        return self.at_layer[f"r={r}"]

    @property
    def tabulated_ranks(self) -> list[int]:
        return sorted(r for r in self.ranks if f"r={r}" in self.at_layer)


@dataclass
class DecompositionSummary(Summary):
    """DoRA Figure 2: correlation of ΔD and ΔM per method, under every reading."""

    analysis: ClassVar[str] = "decomposition"
    matrix: str
    runs: dict[str, str]
    pearson_r: dict[str, float]               # the paper's reading: all (layer, step) points pooled
    slope: dict[str, float]
    points: dict[str, int]
    figure: str = "DoRA Figure 2"
    spearman_r: dict[str, float] = field(default_factory=dict)
    within_step: dict[str, dict[str, float]] = field(default_factory=dict)   # method → {step: Pearson r}
    within_step_mean: dict[str, float] = field(default_factory=dict)
    partial_r: dict[str, float] = field(default_factory=dict)     # step means removed from ΔD and ΔM
    ci_low: dict[str, float] = field(default_factory=dict)        # bootstrap over layers, pooled Pearson r
    ci_high: dict[str, float] = field(default_factory=dict)
    delta_d_range: dict[str, list[float]] = field(default_factory=dict)
    delta_m_range: dict[str, list[float]] = field(default_factory=dict)
    relative_m: bool = False       # ΔM divided by mean |m_0| (a labelled extra, not the paper's definition)
    excluded_layers: list[int] = field(default_factory=list)
    steps: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class TablesSummary(Summary):
    """LoRA Tables 5-6 as numbers (means and stds over seeds, in %) and as the cells printed."""

    analysis: ClassVar[str] = "tables"
    table5_budget: int | None = None
    table5_ranks: dict[str, int] = field(default_factory=dict)           # weight type → rank at the budget
    table5_mean: dict[str, dict[str, float]] = field(default_factory=dict)   # task → weight type → mean
    table6_mean: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # task → weight type → "r" → mean
    table6_std: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    table6_seeds: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    table5_cells: list[list[str]] = field(default_factory=list)   # header + rows, as printed
    table6_cells: list[list[str]] = field(default_factory=list)
    tables: str = "LoRA Tables 5 and 6"
    # rows of a second grouping (e.g. alpha) when the sweep varied it: "<label>" → task → weight type → "r" → mean
    table6_by: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    table6_by_std: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    table6_seeds_by: dict[str, dict[str, dict[str, dict[str, int]]]] = field(default_factory=dict)


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


@dataclass
class RanksSummary(Summary):
    """AdaLoRA's final rank per layer × matrix beside full fine-tuning's effective rank of ΔW (AdaLoRA Fig. 4)."""

    analysis: ClassVar[str] = "ranks"
    runs: dict[str, str]                                 # panel title → run dir
    seed: int | None
    total: dict[str, float]                              # panel → Σ over modules (AdaLoRA: the final budget)
    by_kind: dict[str, dict[str, float]]                 # panel → {matrix kind: Σ over layers}
    figure: str = "AdaLoRA Figure 4 (final ranks) beside FT's effective rank"


def summary_path(sweep_or_out: str | Path, analysis: str) -> Path:
    """<dir>/analysis/<analysis>/summary.json for a sweep dir; <dir>/<analysis>/summary.json for an --out dir."""
    root = Path(sweep_or_out)
    nested = root / "analysis" / analysis / "summary.json"
    return nested if nested.is_file() or not (root / analysis / "summary.json").is_file() else root / analysis / "summary.json"


def write_summary(out_dir: str | Path, summary: Summary) -> Path:
    return write_json(Path(out_dir) / "summary.json", summary.to_json())


def load_summary(cls: type[S], sweep_or_out: str | Path, name: str | None = None) -> S:
    """The ``cls`` summary an analysis wrote under a sweep directory (or an --out directory); ``name`` is the
    output folder when it is not the analysis' own (``decomposition_v`` for Wv)."""
    path = summary_path(sweep_or_out, name or cls.analysis)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `python -m analysis {cls.analysis} {sweep_or_out}` first")
    return cls.from_json(json.loads(path.read_text()))
