# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Subspace similarity explorer (LoRA §7.2, Figures 3, 4, 6, 7)
# φ(A₁, A₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j), U the right singular vectors of the learned A.
# Pick a layer, a matrix, two ranks and seeds from any sweep of LoRA runs.

# %% tags=["parameters"]
import os

SWEEP_DIR = os.environ.get("LOWRANK_SWEEP_DIR", "multirun/latest")
ADAPTER = None        # None: LoRA if present, else the only low-rank adapter in the sweep
LAYER = None          # None: the middle layer (the paper uses layer 48 of 96)
MATRIX = "q"          # q, k, v or o
RANKS = None          # (small, large); None: the smallest and largest ranks found
SEEDS = None          # (seed of the small-rank run, seed of the large-rank run); None: the first found

# %%
import matplotlib.pyplot as plt
import numpy as np

from analysis import figures, subspace
from analysis.inputs import by_layer, load_runs

runs = [i for i in load_runs([SWEEP_DIR]) if i.rank is not None]
if ADAPTER:
    runs = [i for i in runs if i.adapter == ADAPTER]
elif any(i.adapter == "lora" for i in runs):
    runs = [i for i in runs if i.adapter == "lora"]
ranks = sorted({i.rank for i in runs})
small, large = RANKS or (ranks[0], ranks[-1])
print("runs:", [i.label() for i in runs])

def pick(rank, seed):
    return next(i for i in runs if i.rank == rank and (seed is None or i.seed == seed))

run_small = pick(small, SEEDS and SEEDS[0])
run_large = pick(large, SEEDS and SEEDS[1])
factors_small = by_layer({k: v["A"] for k, v in run_small.run.factors().items()})
factors_large = by_layer({k: v["A"] for k, v in run_large.run.factors().items()})
layers = sorted({l for l, _ in factors_small})
layer = LAYER if LAYER is not None else layers[len(layers) // 2]
print(f"{run_small.label()} vs {run_large.label()}, layer {layer}, ΔW{MATRIX}")

# %%
phi = subspace.similarity(factors_small[(layer, MATRIX)], factors_large[(layer, MATRIX)])
print(f"φ(1, 1) = {phi[0, 0]:.3f}   (paper, GPT-3 layer 48: > 0.5)")
print(f"chance level for i=j=1 at d={factors_small[(layer, MATRIX)].shape[1]}: "
      f"{subspace.chance_level(1, 1, factors_small[(layer, MATRIX)].shape[1])[0, 0]:.4f}")
fig, ax = plt.subplots(figsize=(8, 2.2))
figures.heatmap(ax, phi, vmin=0, vmax=1, figure="fig3", title=f"ΔW{MATRIX}, layer {layer}")
plt.show()

# %% [markdown]
# ## Same rank, two seeds, against two random Gaussian matrices (Figure 4)

# %%
same_rank = [i for i in runs if i.rank == large]
if len(same_rank) >= 2:
    a, b = same_rank[:2]
    Aa = by_layer({k: v["A"] for k, v in a.run.factors().items()})[(layer, MATRIX)]
    Ab = by_layer({k: v["A"] for k, v in b.run.factors().items()})[(layer, MATRIX)]
    phi_seeds = subspace.similarity(Aa, Ab)
    phi_random = subspace.random_gaussian_similarity(Aa.shape, seed=0)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    figures.heatmap(axes[0], phi_seeds, vmin=0, vmax=0.5, figure="fig4", title=f"seeds {a.seed} vs {b.seed}")
    figures.heatmap(axes[1], phi_random, vmin=0, vmax=0.5, figure="fig4", title="random Gaussian")
    plt.show()
    print(f"mean φ over the top-8 block: seeds {phi_seeds[:8, :8].mean():.3f}, random {phi_random[:8, :8].mean():.3f}")
else:
    print(f"only one run at r={large}; sweep seed=0,1 for Figure 4")
