"""Paper-style figures: LoRA Figures 3, 4, 6, 7, 8, a per-layer Table 7 plot, and DoRA Figure 2.

Every function takes plain arrays / DataFrames and returns a matplotlib Figure drawn with the one style
file `paper.mplstyle`; `save` writes PNG and PDF. Layouts follow LoRA's Figures 3, 4, 6–8 and Table 7 (arXiv 2106.09685 §7, App. H) and DoRA's Figure 2 (arXiv 2402.09353 §3.2): φ heatmaps
have i (the first argument's directions) on the y-axis, top row i = 1, j on the x-axis, the paper's tick
positions where the sizes match the paper's, and the paper's colour-bar range per figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = [
    "STYLE",
    "style",
    "paper_ticks",
    "heatmap",
    "figure3",
    "figure4",
    "figure6",
    "figure7",
    "figure8",
    "table7_plot",
    "dora_figure2",
    "save",
    "CMAP",
]

STYLE = Path(__file__).with_name("paper.mplstyle")

# the heat maps of LoRA Figs. 3-8 are drawn with seaborn's default sequential map ("rocket": black →
# purple → red → cream); this is a close copy so that seaborn is not a dependency.
_ROCKET = ["#03051a", "#2b0b3e", "#4c1d4b", "#701f57", "#a11a5b", "#cb1b4f", "#e83f3f", "#f3704f",
           "#f69c73", "#f6c4a7", "#faebdd"]
CMAP = "lowrank_rocket"

# tick positions the paper prints (1-based), keyed by (figure, axis, size)
_PAPER_TICKS = {
    ("fig3", "x", 64): [1, 6, 12, 18, 23, 29, 35, 40, 46, 52, 58],
    ("fig4", "x", 64): [1, 5, 10, 15, 20, 25, 30, 34, 39, 44, 49, 54, 59],
    ("fig4", "y", 64): [1, 8, 16, 24, 32, 40, 48, 56],
    ("fig7", "x", 64): list(range(1, 62, 5)),
    ("fig7", "y", 64): list(range(1, 62, 6)),
}


def _cmap():
    import matplotlib as mpl
    from matplotlib.colors import LinearSegmentedColormap

    if CMAP not in mpl.colormaps:
        mpl.colormaps.register(LinearSegmentedColormap.from_list(CMAP, _ROCKET, N=256))
    return mpl.colormaps[CMAP]


@contextmanager
def style():
    import matplotlib.pyplot as plt

    with plt.style.context(str(STYLE)):
        yield plt


def paper_ticks(n: int, *, figure: str = "", axis: str = "x", count: int = 11) -> list[int]:
    """1-based tick labels: the paper's own where (figure, axis, n) matches it, else ≈`count` spread ones.

    The paper's ticks are floor(linspace(1, last, count)); the fallback uses the same rule up to n.
    """
    if (figure, axis, n) in _PAPER_TICKS:
        return list(_PAPER_TICKS[(figure, axis, n)])
    if n <= 12:
        return list(range(1, n + 1))
    return sorted(set(np.floor(np.linspace(1, n, min(n, count))).astype(int).tolist()))


def heatmap(ax, phi: np.ndarray, *, vmin: float, vmax: float, figure: str = "", title: str | None = None,
            xlabel: str = "j", ylabel: str = "i", i0: int = 1, j0: int = 1, xcount: int = 11, ycount: int = 8):
    """One φ panel: row i (top = i0), column j; ticks at 1-based indices; no spines (as seaborn draws)."""
    p, q = phi.shape
    im = ax.imshow(phi, cmap=_cmap(), vmin=vmin, vmax=vmax, aspect="auto", origin="upper",
                   extent=(-0.5, q - 0.5, p - 0.5, -0.5))
    xt = [t for t in paper_ticks(q, figure=figure, axis="x", count=xcount)] if j0 == 1 else \
        paper_ticks(q, count=xcount)
    yt = paper_ticks(p, figure=figure, axis="y", count=ycount) if i0 == 1 else paper_ticks(p, count=ycount)
    ax.set_xticks([t - 1 for t in xt], [str(t + j0 - 1) for t in xt])
    ax.set_yticks([t - 1 for t in yt], [str(t + i0 - 1) for t in yt])
    ax.tick_params(axis="x", labelrotation=90 if q > 12 else 0)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return im


def _colorbar(fig, im, axes, vmin: float, vmax: float, step: float):
    ticks = np.round(np.arange(vmin, vmax + step / 2, step), 6)
    cb = fig.colorbar(im, ax=axes, fraction=0.025, pad=0.015, ticks=ticks)
    decimals = 3 if step < 0.05 else 1
    cb.ax.set_yticklabels([f"{t:.{decimals}f}" for t in ticks])
    cb.outline.set_visible(False)
    cb.ax.tick_params(labelsize=7.5, length=2)
    return cb


def _mat(kind: str) -> str:
    return rf"$\Delta W_{kind}$"


def _sym(factor: str) -> str:
    return r"\Delta W" if factor == "dW" else factor


def figure3(phi_q: np.ndarray, phi_v: np.ndarray, *, ranks: tuple[int, int] = (8, 64), zoom: int = 8,
            layer: int | None = None, suptitle: str | None = None, factor: str = "A"):
    """LoRA Figure 3: φ(A_{r=8}, A_{r=64}, i, j) for ΔWq, ΔWv (i ≤ r_small, j ≤ r_large) and their zooms
    i, j ≤ `zoom` (the paper's lower-left corner). Colour bar 0-1."""
    r1, r2 = ranks
    with style() as plt:
        fig = plt.figure(figsize=(10.5, 2.35), layout="constrained")
        zq = min(zoom, phi_q.shape[1])
        gs = fig.add_gridspec(1, 4, width_ratios=[phi_q.shape[1], phi_v.shape[1], 1.6 * zq, 1.6 * zq])
        axes = [fig.add_subplot(gs[0, k]) for k in range(4)]
        for ax, phi, kind in zip(axes[:2], (phi_q, phi_v), "qv"):
            im = heatmap(ax, phi, vmin=0, vmax=1, figure="fig3", title=_mat(kind))
        for ax, phi, kind in zip(axes[2:], (phi_q, phi_v), "qv"):
            z = phi[:zoom, :zoom]
            heatmap(ax, z, vmin=0, vmax=1, figure="fig3z", title=_mat(kind))
        for ax in axes[1:]:
            ax.set_ylabel("")
        _colorbar(fig, im, axes, 0.0, 1.0, 0.2)
        where = f", layer {layer}" if layer is not None else ""
        fig.suptitle(suptitle or rf"$\phi({_sym(factor)}_{{r={r1}}}, {_sym(factor)}_{{r={r2}}}, i, j)${where}", fontsize=10)
    return fig


def figure4(phi_q: np.ndarray, phi_v: np.ndarray, phi_random: np.ndarray, *, rank: int = 64,
            layer: int | None = None, vmax: float = 0.5, factor: str = "A"):
    """LoRA Figure 4: φ(A_{r=64}, A'_{r=64}, i, j) across two seeds for ΔWq, ΔWv, and two random
    Gaussian matrices of the same shape. Colour bar 0-0.5."""
    with style() as plt:
        fig, axes = plt.subplots(1, 3, figsize=(10.0, 3.1), layout="constrained")
        titles = [_mat("q"), _mat("v"), "Random Gaussian"]
        for ax, phi, title in zip(axes, (phi_q, phi_v, phi_random), titles):
            im = heatmap(ax, phi, vmin=0, vmax=vmax, figure="fig4", title=title, xcount=13, ycount=8)
        for ax in axes[1:]:
            ax.set_ylabel("")
        _colorbar(fig, im, list(axes), 0.0, vmax, 0.1)
        where = f", layer {layer}" if layer is not None else ""
        fig.suptitle(rf"$\phi({_sym(factor)}_{{r={rank}}}, {_sym(factor)}'_{{r={rank}}}, i, j)${where}", fontsize=10)
    return fig


def figure6(phis: Mapping[int, tuple[np.ndarray, np.ndarray]], *, ranks: tuple[int, int] = (8, 64), zoom: int = 8,
            factor: str = "A"):
    """LoRA Figure 6: Figure 3's four panels for each layer (one row per layer). Colour bar 0-1."""
    r1, r2 = ranks
    layers = list(phis)
    with style() as plt:
        fig = plt.figure(figsize=(10.5, 1.75 * len(layers) + 0.5), layout="constrained")
        q = next(iter(phis.values()))[0].shape[1]
        zq = min(zoom, q)
        gs = fig.add_gridspec(len(layers), 4, width_ratios=[q, q, 1.6 * zq, 1.6 * zq])
        axes = []
        for row, layer in enumerate(layers):
            phi_q, phi_v = phis[layer]
            ax_row = [fig.add_subplot(gs[row, k]) for k in range(4)]
            for k, (phi, kind) in enumerate(((phi_q, "q"), (phi_v, "v"), (phi_q[:zoom, :zoom], "q"),
                                             (phi_v[:zoom, :zoom], "v"))):
                title = (_mat(kind) + (" (zoom)" if k >= 2 else "")) if row == 0 else None
                im = heatmap(ax_row[k], phi, vmin=0, vmax=1, figure="fig3" if k < 2 else "", title=title)
                ax_row[k].set_ylabel(f"layer {layer}\ni" if k == 0 else "")
                if row < len(layers) - 1:
                    ax_row[k].set_xlabel("")
            axes += ax_row
        _colorbar(fig, im, axes, 0.0, 1.0, 0.2)
        fig.suptitle(rf"$\phi({_sym(factor)}_{{r={r1}}}, {_sym(factor)}_{{r={r2}}}, i, j)$", fontsize=10)
    return fig


def figure7(phis: Mapping[int, tuple[np.ndarray, np.ndarray]], *, rank: int = 64, vmax: float = 0.8,
            factor: str = "A"):
    """LoRA Figure 7: φ(A_{r=64}, A'_{r=64}, i, j) across seeds for each layer; rows ΔWq, ΔWv. 0-0.8."""
    layers = list(phis)
    with style() as plt:
        fig, axes = plt.subplots(2, len(layers), figsize=(2.6 * len(layers) + 0.8, 5.2), layout="constrained",
                                 squeeze=False)
        for c, layer in enumerate(layers):
            for r, kind in enumerate("qv"):
                im = heatmap(axes[r, c], phis[layer][r], vmin=0, vmax=vmax, figure="fig7",
                             title=rf"{_mat(kind)}, layer {layer}", xcount=13, ycount=11)
                if c:
                    axes[r, c].set_ylabel("")
                if r == 0:
                    axes[r, c].set_xlabel("")
        _colorbar(fig, im, list(axes.ravel()), 0.0, vmax, 0.1)
        fig.suptitle(rf"$\phi({_sym(factor)}_{{r={rank}}}, {_sym(factor)}'_{{r={rank}}}, i, j)$", fontsize=10)
    return fig


def figure8(phis: Mapping[str, np.ndarray], *, kind: str = "q", vmin: float = 0.1, vmax: float = 0.2,
            i_start: int = 1, layer: int | None = None):
    """LoRA Figure 8: φ(W, A_r, i, j) between W's top-i right singular directions (y) and A's top-j (x),
    one panel per label (e.g. "r=4", "r=8", "r=64", "rand"). Colour bar 0.1-0.2 as in the paper.

    Rows from `i_start` on (1-based) are shown; the paper's axis covers up to ≈ the top 10% of W's."""
    labels = list(phis)
    with style() as plt:
        fig, axes = plt.subplots(1, len(labels), figsize=(2.35 * len(labels) + 0.9, 3.2), layout="constrained",
                                 squeeze=False)
        axes = axes[0]
        for ax, label in zip(axes, labels):
            phi = phis[label][i_start - 1:]
            sub = label.replace("r=", "r=") if label.startswith("r=") else label
            title = rf"$\phi(W_{kind}, A_{{{sub}}}, i, j)$"
            im = heatmap(ax, phi, vmin=vmin, vmax=vmax, title=title, i0=i_start, xcount=9, ycount=8)
        for ax in axes[1:]:
            ax.set_ylabel("")
        _colorbar(fig, im, list(axes), vmin, vmax, (vmax - vmin) / 4)
        if layer is not None:
            fig.suptitle(f"layer {layer}", fontsize=10)
    return fig


def table7_plot(per_layer, *, matrices: Sequence[str] = ("q", "v")):
    """Table 7 by layer: ‖UᵀWVᵀ‖_F for ΔW's, W's own and random top-r directions (top row, log scale),
    and the amplification factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F (bottom row), one column per matrix, colour = r."""
    d = per_layer
    ranks = sorted(d["r"].unique())
    colours = dict(zip(ranks, ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]))
    mats = [m for m in matrices if m in set(d["matrix"])]
    with style() as plt:
        fig, axes = plt.subplots(2, len(mats), figsize=(3.4 * len(mats) + 0.4, 4.6), layout="constrained",
                                 squeeze=False, sharex="col")
        for c, m in enumerate(mats):
            dm = d[d["matrix"] == m]
            top, bot = axes[0, c], axes[1, c]
            for r in ranks:
                g = dm[dm["r"] == r].groupby("layer")[["delta", "own", "random", "random_expected", "factor"]].mean()
                col = colours.get(r, None)
                top.plot(g.index, g["own"], color=col, ls="--", marker="s", ms=3, label=f"W's top-{r}")
                top.plot(g.index, g["delta"], color=col, ls="-", marker="o", ms=3.5, label=rf"$\Delta W$'s top-{r}")
                top.plot(g.index, g["random"], color=col, ls=":", marker="x", ms=3.5, label=f"random, r={r}")
                top.plot(g.index, g["random_expected"], color=col, ls="-", lw=0.6, alpha=0.5,
                         label=rf"$r\|W\|_F/d$, r={r}")
                bot.plot(g.index, g["factor"], color=col, marker="o", ms=3.5, label=f"r={r}")
            for ax in (top, bot):
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
                ax.yaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            top.set_title(rf"$W_{m}$: $\|U^\top W V^\top\|_F$")
            bot.set_title(rf"$W_{m}$: amplification $\|\Delta W\|_F / \|U^\top W V^\top\|_F$")
            bot.set_xlabel("layer")
            top.grid(True, which="major")
            bot.grid(True, which="major")
            layers = sorted(dm["layer"].dropna().unique())
            bot.set_xticks(layers if len(layers) <= 16 else layers[:: max(1, len(layers) // 8)])
        axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
        axes[1, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
    return fig


def _plain_log_formatter():
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        """Log-axis labels as plain numbers (0.3, 2, 20) where matplotlib would label a tick at all."""

        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLog


def _PlainLog(**kw):
    return _plain_log_formatter()(**kw)


_STEP_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def dora_figure2(df, *, methods: Sequence[str] = ("FT", "LoRA", "DoRA"), kind: str = "q", y: str = "dM"):
    """DoRA Figure 2: ΔD (x) against ΔM (y; ``dM_rel`` for relative ΔM) per layer (colour) and checkpoint
    (marker: inter steps, then a star for the final step), one panel per method, least-squares line and r."""
    from analysis.decomposition import PAPER_CORRELATIONS, regression

    present = [m for m in methods if m in set(df["method"])]
    layers = sorted(df["layer"].dropna().unique())
    with style() as plt:
        cmap = plt.get_cmap("tab10" if len(layers) <= 10 else "viridis")
        colours = {l: cmap(i % 10) if len(layers) <= 10 else cmap(i / max(1, len(layers) - 1))
                   for i, l in enumerate(layers)}
        fig, axes = plt.subplots(1, len(present), figsize=(3.3 * len(present), 3.2), layout="constrained",
                                 squeeze=False)
        axes = axes[0]
        for k, (ax, method) in enumerate(zip(axes, present)):
            g = df[df["method"] == method]
            steps = sorted(g["step"].unique())
            for si, step in enumerate(steps):
                final = si == len(steps) - 1
                for layer in layers:
                    p = g[(g["step"] == step) & (g["layer"] == layer)]
                    if p.empty:
                        continue
                    ax.scatter(p["dD"], p[y], color=colours[layer], marker="*" if final else
                               _STEP_MARKERS[si % len(_STEP_MARKERS)], s=70 if final else 30,
                               edgecolors="black", linewidths=0.4, zorder=3)
            if len(g) >= 2 and np.ptp(g["dD"].to_numpy()) > 0:
                slope, icpt, r = regression(g["dD"].to_numpy(), g[y].to_numpy())
                xs = np.linspace(g["dD"].min(), g["dD"].max(), 50)
                ax.plot(xs, slope * xs + icpt, color="black", ls="--", lw=1.0, zorder=2)
                ref = PAPER_CORRELATIONS.get(method)
                txt = f"r = {r:+.2f}" + (f"\n(paper {ref:+.2f})" if ref is not None else "")
                # put the label in the corner the regression line leaves empty
                x_at = 0.03 if slope < 0 else 0.97
                ax.text(x_at, 0.03, txt, transform=ax.transAxes, ha="left" if slope < 0 else "right",
                        va="bottom", fontsize=8, bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.7", lw=0.5))
            ax.set_title(f"({chr(97 + k)}) {method}")
            ax.set_xlabel(r"$\Delta D$")
            ax.set_ylabel(("relative " if y == "dM_rel" else "") + r"$\Delta M$" if k == 0 else "")
            ax.grid(True)
            ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 3))
        from matplotlib.lines import Line2D

        nsteps = max(df.groupby("method")["step"].nunique())
        handles = [Line2D([], [], ls="", marker="s", color=colours[l], label=f"layer {int(l)}") for l in layers]
        handles += [Line2D([], [], ls="", marker=_STEP_MARKERS[i % len(_STEP_MARKERS)], color="grey",
                           label=f"Inter step {i + 1}") for i in range(nsteps - 1)]
        handles += [Line2D([], [], ls="", marker="*", color="grey", ms=8, label="Final step")]
        fig.legend(handles=handles, loc="outside right center", fontsize=7.5)
        fig.suptitle(rf"$W_{kind}$: magnitude vs direction change", fontsize=10)
    return fig


def save(fig, stem: str | Path, *, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write the figure as <stem>.png and <stem>.pdf (the paper style's dpi); close it; return the paths."""
    import logging

    import matplotlib.pyplot as plt

    logging.getLogger("fontTools").setLevel(logging.ERROR)  # PDF font subsetting chatter
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.style.context(str(STYLE)):
        for ext in formats:
            p = stem.with_suffix(f".{ext}")
            fig.savefig(p)
            paths.append(p)
    plt.close(fig)
    return paths
