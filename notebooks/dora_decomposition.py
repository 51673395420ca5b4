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
# # DoRA's magnitude / direction decomposition (DoRA §3.2, Figure 2)
# ΔM = mean |‖W_n‖ − ‖W0_n‖| and ΔD = mean (1 − cos(W_n, W0_n)) over output rows n, at every checkpoint
# whose weights a run kept (`trainer.save_weights_at`), for FT, LoRA and DoRA runs.

# %% tags=["parameters"]
import os

SWEEP_DIR = os.environ.get("LOWRANK_SWEEP_DIR", "multirun/latest")
MATRIX = "q"   # the paper's Figure 2 uses the query matrices (Figure 7: value)

# %%
import matplotlib.pyplot as plt
import pandas as pd

from analysis import decomposition, figures
from analysis.inputs import load_runs

NAMES = {"full": "FT", "lora": "LoRA", "dora": "DoRA"}
runs = [i for i in load_runs([SWEEP_DIR]) if i.adapter in NAMES]
frames = []
for info in runs:
    steps = info.run.weight_trajectory()
    if len(steps) < 2:
        continue
    base = info.run.base_weights()
    trajectory = {s: w for s, w in steps.items() if s > 0}
    frames.append(decomposition.trajectory(base, trajectory, kinds=(MATRIX,), method=NAMES[info.adapter]))
df = pd.concat(frames, ignore_index=True)
df.groupby(["method", "step"])[["dM", "dD"]].mean()

# %%
decomposition.correlations(df)

# %%
fig = figures.dora_figure2(df, kind=MATRIX)
plt.show()
