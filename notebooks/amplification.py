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
# # Amplification across layers (LoRA §7.3, Table 7, App. H.4)
# ‖UᵀWVᵀ‖_F for U, V the top-r singular directions of ΔW, of W itself and random, and the amplification
# factor ‖ΔW‖_F / ‖UᵀWVᵀ‖_F, for every adapted matrix of every LoRA run in a sweep.

# %% tags=["parameters"]
import os

SWEEP_DIR = os.environ.get("LOWRANK_SWEEP_DIR", "multirun/latest")
SEED = None   # keep runs of this seed only (None: all)

# %%
import matplotlib.pyplot as plt

from analysis import figures
from analysis.amplification import amplification_study
from analysis.inputs import load_runs

runs = [i for i in load_runs([SWEEP_DIR]) if i.rank is not None and i.adapter in ("lora", "dora")]
runs = [i for i in runs if SEED is None or i.seed == SEED]
by_rank = {}
for info in runs:
    by_rank.setdefault(info.rank, info)   # one run per rank
base = next(iter(by_rank.values())).run.base_weights()
table = amplification_study(base, {rank: info.run.factors() for rank, info in sorted(by_rank.items())})
table.head()

# %%
summary = table.groupby(["label", "matrix"])[["delta", "own", "random", "norm_W", "norm_delta", "factor"]].mean()
summary

# %%
per_layer = table.rename(columns={"label": "rank"})
fig = figures.table7_plot(table)
plt.show()
