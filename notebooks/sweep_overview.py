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
# # Sweep overview
# Metrics by adapter × rank × targets, and training curves, for one sweep directory written by
# `python run.py -m ...`. Everything is read through `lowrank.runner.results`.

# %% tags=["parameters"]
import os

SWEEP_DIR = os.environ.get("LOWRANK_SWEEP_DIR", "multirun/latest")  # a sweep directory
METRIC = None  # e.g. "eval/accuracy"; None = the task's main metric found in the table

# %%
import matplotlib.pyplot as plt
import pandas as pd

from lowrank.runner.results import load_run, load_sweep

sweep = load_sweep(SWEEP_DIR)
print(f"{len(sweep)} runs in {SWEEP_DIR}: {sweep['status'].value_counts().to_dict()}")
sweep.head()

# %%
metric_cols = [c for c in sweep.columns if c.startswith(("final/", "best/"))]
metric = METRIC or next((c for c in metric_cols if "accuracy" in c or "matthews" in c or "bleu" in c),
                        metric_cols[0] if metric_cols else None)
keys = [k for k in ("adapter", "targets", "rank", "seed") if k in sweep.columns]
print("metric:", metric, "| swept keys:", keys)
done = sweep[sweep["status"] == "completed"]
summary = done.groupby([k for k in keys if k != "seed"], dropna=False)[metric].agg(["mean", "std", "count"])
summary

# %%
if "rank" in done.columns and done["rank"].notna().any():
    table = done.pivot_table(index="adapter", columns="rank", values=metric, aggfunc="mean")
    ax = table.T.plot(marker="o", logx=True, figsize=(5, 3.2))
    ax.set_xlabel("rank r")
    ax.set_ylabel(metric)
    ax.set_title("metric by rank")
    plt.show()

# %% [markdown]
# ## Training curves

# %%
fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.2))
for label in done["run"]:
    m = load_run(os.path.join(SWEEP_DIR, label)).metrics
    if "train/loss" in m:
        m.dropna(subset=["train/loss"]).plot(x="step", y="train/loss", ax=ax_loss, label=label, legend=False)
    eval_cols = [c for c in m.columns if c.startswith("eval/") and c != "eval/loss"]
    if eval_cols:
        m.dropna(subset=[eval_cols[0]]).plot(x="step", y=eval_cols[0], ax=ax_eval, label=label, marker=".")
ax_loss.set_title("training loss")
ax_eval.set_title("evaluation")
ax_eval.legend(fontsize=7)
plt.show()
