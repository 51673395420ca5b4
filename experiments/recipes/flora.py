"""FLoRA (arXiv 2405.14739): trainable parameters of the Tucker form against LoRA, and accuracy at equal size."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import references as ref
from experiments.recipes.base import QUICK, Check, Recipe
from lowrank.atomic import write_json


def flora_checks(d: Path) -> list[Check]:
    report = json.loads((d / "flora_params.json").read_text())
    checks = []
    for row in report["counts"]:
        checks.append(Check(f"{row['layer']}: FLoRA / LoRA trainable parameters ({row['lora_convention']})",
                            f"{row['flora']:,} / {row['lora']:,} = {row['ratio']:.1%}", row.get("paper"),
                            None if row.get("expect_fewer") is None else (row["ratio"] < 1) == row["expect_fewer"]))
    for row in report.get("accuracy", []):
        checks.append(Check(f"SST-2 accuracy at ≈ equal parameters: {row['adapter']} ({row['trainable']:,} trainable)",
                            row["accuracy"]))
    return checks


def flora_params(sweep_dir: Path) -> None:
    """Trainable parameters of FLoRA and LoRA on real layers (counted from the modules, not a formula),
    and the accuracy of the sweep's LoRA and FLoRA runs at r=8 (≈ equal parameters on linear layers)."""
    from torch import nn

    from lowrank.adapters import FLoRA, LoRA
    from lowrank.runner.results import load_sweep

    def trainable(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    conv = lambda: nn.Conv2d(256, 512, 3)  # noqa: E731  FLoRA's worked parameter count: k=3, 256→512, r=32
    linear = lambda: nn.Linear(384, 384)   # noqa: E731  a MiniLM attention projection
    paper = ref.FLORA_PARAMS["conv_example"]
    counts = []
    flora_conv = trainable(FLoRA(conv(), [32, 32, 2, 2]))
    # loralib's ConvLoRA: A (r·k, in·k), B (out·k, r·k)
    loralib_conv = 32 * 3 * 256 * 3 + 512 * 3 * 32 * 3
    for name, lora, p in (("loralib ConvLoRA", loralib_conv, paper["lora_loralib"]),
                          ("PEFT Conv2d (out × in·k²)", trainable(LoRA(conv(), 32)), paper["lora_reshape_out_by_in_k2"])):
        counts.append({"layer": "Conv2d 256→512 k=3, r=32", "lora_convention": name, "flora": flora_conv, "lora": lora,
                       "ratio": flora_conv / lora, "paper": f"{paper['flora']:,} / {p:,}", "expect_fewer": True})
    fl, lo = trainable(FLoRA(linear(), 8)), trainable(LoRA(linear(), 8))
    counts.append({"layer": "Linear 384→384, r=8", "lora_convention": "LoRA r(in+out)", "flora": fl, "lora": lo,
                   "ratio": fl / lo, "paper": "slightly more (r² extra)", "expect_fewer": False})
    accuracy = []
    table = load_sweep(sweep_dir)
    metric = next((c for c in table.columns if c.startswith("final/") and "accuracy" in c), None)
    for _, row in table[table["status"] == "completed"].iterrows():
        accuracy.append({"adapter": row["adapter"], "trainable": int(row["trainable_params"]),
                         "accuracy": float(row[metric]) if metric else None})
    write_json(sweep_dir / "flora_params.json", {"counts": counts, "accuracy": accuracy})


RECIPES = [
    Recipe("flora_params", "FLoRA vs LoRA at equal trainable parameters (linear and convolution)",
           ref.FLORA_PARAMS, [["adapter=lora,flora", "rank=8", *QUICK]], [],
           flora_checks, "2 runs × ~1 min + parameter counts", collect=lambda d: flora_params(d)),
]
