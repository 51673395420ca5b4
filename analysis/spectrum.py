"""The singular value spectrum of a weight update ΔW: LoRA's premise that the update during adaptation has a
low "intrinsic rank" (arXiv 2106.09685 §4.1, after Aghajanyan et al. 2020), checked on full fine-tuning's ΔW
against LoRA's and DoRA's.

For ΔW with singular values σ_1 ≥ σ_2 ≥ …:

    energy in the top r directions  E_r = Σ_{i≤r} σ_i² / Σ_i σ_i²     (the share of ‖ΔW‖_F² a rank-r update keeps)
    effective rank                  exp(H(p)), p_i = σ_i / Σ σ_j      (Roy & Vetterli 2007)
    stable rank                     ‖ΔW‖_F² / σ_1²
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from analysis.linalg import as_float64

__all__ = ["singular_values", "energy_top", "effective_rank", "stable_rank", "spectrum_figure"]


def singular_values(delta) -> np.ndarray:
    """σ of ΔW in float64, descending."""
    return np.linalg.svd(as_float64(delta, name="ΔW"), compute_uv=False)


def energy_top(s: np.ndarray, r: int) -> float:
    s2 = np.asarray(s, dtype=np.float64) ** 2
    return float(s2[:r].sum() / s2.sum()) if s2.sum() > 0 else float("nan")


def effective_rank(s: np.ndarray) -> float:
    s = np.asarray(s, dtype=np.float64)
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0


def stable_rank(s: np.ndarray) -> float:
    s = np.asarray(s, dtype=np.float64)
    return float((s ** 2).sum() / s[0] ** 2) if s[0] > 0 else 0.0


def spectrum_figure(spectra: dict[str, list[np.ndarray]], *, ranks: Sequence[int] = (), matrix: str = "q, v"):
    """Two panels: σ_i / σ_1 against i (median over modules, log scale), and the cumulative energy E_i, one
    line per run (FT, LoRA r=…), with the ranks marked."""
    from analysis.figures import style

    with style() as plt:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.0, 3.0), layout="constrained")
        cmap = plt.get_cmap("tab10")
        for k, (label, mats) in enumerate(spectra.items()):
            n = min(len(s) for s in mats)
            norm = np.median(np.stack([s[:n] / s[0] for s in mats]), axis=0)
            energy = np.median(np.stack([np.cumsum(s[:n] ** 2) / (s ** 2).sum() for s in mats]), axis=0)
            i = np.arange(1, n + 1)
            ax1.plot(i, np.maximum(norm, 1e-12), color=cmap(k % 10), lw=1.2, label=label)
            ax2.plot(i, energy, color=cmap(k % 10), lw=1.2, label=label)
        for r in ranks:
            for ax in (ax1, ax2):
                ax.axvline(r, color="0.6", lw=0.6, ls=":")
        ax1.set_yscale("log")
        ax1.set_ylim(1e-4, 1.5)
        ax1.set_xscale("log")
        ax2.set_xscale("log")
        ax1.set_xlabel("i")
        ax1.set_ylabel(r"$\sigma_i / \sigma_1$")
        ax2.set_xlabel("i")
        ax2.set_ylabel(r"energy in top $i$: $\sum_{j\leq i}\sigma_j^2 / \|\Delta W\|_F^2$")
        ax2.set_ylim(0, 1.02)
        ax1.set_title(f"(a) spectrum of ΔW ({matrix})")
        ax2.set_title("(b) cumulative energy")
        ax2.legend(fontsize=7, loc="lower right")
        for ax in (ax1, ax2):
            ax.grid(True)
    return fig
