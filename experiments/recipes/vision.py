"""FLoRA (arXiv 2405.14739) on a pretrained ConvNet: accuracy against trainable parameters (``flora_vision``) and
the scale s on convolutions and on linear layers (``flora_scale``).

The ConvNet is EfficientNet-Lite0 (ImageNet weights, offline) on scikit-learn's digits at 64 px; the adapted
layers are its k×k convolutions (``targets=[conv]``: the stem and the 16 depthwise convolutions, the spatial
kernels FLoRA's convolution core keeps). EfficientNet is depthwise-separable, so these kernels have one input
channel per group: FLoRA's A_in is (1, r1) and its saving over LoRA comes from the spatial modes only, unlike
the dense 3×3 convolutions of the paper's worked example.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from experiments import references as ref
from experiments.recipes.base import Check, Recipe, markdown
from lowrank.atomic import write_json

VISION = ["model=efficientnet_lite0", "task=digits", "logger=none", "trainer.max_steps=60", "trainer.batch_size=32",
          "trainer.eval_every=60", "trainer.checkpoint_every=60", "trainer.lr=3e-3", "trainer.save_weights_at=[]"]
SEEDS = (0, 1, 2)  # one run.py sweep per seed, so that --jobs N trains them side by side
#: two trainable-parameter budgets for the rank-based methods (≈ 19k and ≈ 75k adapter parameters on the 17
#: k×k convolutions; the 12.8k of the 10-way head come on top of each); loralib's ConvLoRA has no rank small
#: enough for the first (r k² (in + out/groups) parameters, in = all input channels), so it runs at r=1
BUDGETS = {"small": {"flora": 2, "lora": 2, "dora": 1}, "large": {"flora": 8, "lora": 8, "dora": 7}}
FULL_LR = "trainer.lr=5e-4"  # full fine-tuning at the adapters' 3e-3 moves the pretrained weights too far
SCALES = "0.04,0.25,1,4,16"
LINEAR = ["model=minilm", "task=sst2", "logger=none", "targets=[q,v]", "trainer.max_steps=100", "trainer.eval_every=100",
          "trainer.checkpoint_every=100", "trainer.save_weights_at=[]"]


def _rows(sweep_dir: Path) -> list[dict]:
    """One dict per completed run: method (adapter and conv form), rank, scale, seed, params, accuracy."""
    from lowrank.runner.results import load_sweep

    table = load_sweep(sweep_dir)
    out = []
    for _, row in table.iterrows():
        if row["status"] != "completed":
            continue
        get = lambda key, default=None: default if key not in row or row[key] is None or (  # noqa: E731
            isinstance(row[key], float) and math.isnan(row[key])) else row[key]
        adapter = get("adapter")
        form = get("adapter.options.conv_form", "peft")
        method = {"lora": f"LoRA ({'loralib ConvLoRA' if form == 'loralib' else 'PEFT Conv2d'})", "flora": "FLoRA",
                  "dora": "DoRA", "bitfit": "BitFit", "head": "head only", "full": "full FT"}[adapter]
        result = json.loads((sweep_dir / row["run"] / "result.json").read_text())
        device = "GPU, bf16 autocast" if "peak_gpu_memory_mb" in result else "CPU, float32"
        out.append({"method": method, "device": device, "adapter": adapter, "rank": int(get("rank", 8)) if adapter in ("lora", "flora", "dora")
                    else None, "scale": get("adapter.options.scale"), "model": get("model"), "seed": int(get("seed", 0)),
                    "trainable": int(row["trainable_params"]), "accuracy": float(row["final/accuracy"]),
                    "run": f"`{row['run'].split(',model=')[0]},seed={int(get('seed', 0))}`"})
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def collect_vision(sweep_dir: Path) -> None:
    rows = _rows(sweep_dir)
    summary = []
    for (method, rank), runs in sorted(_groups(rows, ("method", "rank")).items(), key=lambda kv: kv[1][0]["trainable"]):
        mean, std = _mean_std([r["accuracy"] for r in runs])
        summary.append({"method": method, "rank": rank, "device": runs[0]["device"], "trainable": runs[0]["trainable"],
                        "accuracy_mean": mean,
                        "accuracy_std": std, "seeds": {r["seed"]: r["accuracy"] for r in runs}})
    write_json(sweep_dir / "flora_vision.json", {"runs": rows, "summary": summary})


def _summary(d: Path) -> list[dict]:
    return json.loads((d / "flora_vision.json").read_text())["summary"]


def vision_checks(d: Path) -> list[Check]:
    summary = _summary(d)
    by = {(s["method"], s["rank"]): s for s in summary}
    head = by.get(("head only", None))
    checks = []
    for method in ("FLoRA", "LoRA (PEFT Conv2d)", "LoRA (loralib ConvLoRA)", "DoRA"):
        for (m, rank), s in sorted(by.items(), key=lambda kv: str(kv[0])):
            if m == method and head is not None:
                checks.append(Check(f"{method} r={rank} ({s['trainable']:,} trainable) beats head only (accuracy %)",
                                    f"{100 * s['accuracy_mean']:.1f} vs {100 * head['accuracy_mean']:.1f}", None,
                                    s["accuracy_mean"] > head["accuracy_mean"]))
    for budget, ranks in BUDGETS.items():
        flora, lora = by.get(("FLoRA", ranks["flora"])), by.get(("LoRA (PEFT Conv2d)", ranks["lora"]))
        if flora and lora:
            checks.append(Check(f"{budget} budget: FLoRA ≈ LoRA (PEFT) accuracy at matched parameters "
                                f"({flora['trainable']:,} vs {lora['trainable']:,}): within 1 point or better",
                                f"{100 * flora['accuracy_mean']:.1f} vs {100 * lora['accuracy_mean']:.1f}",
                                "comparable accuracy, 80 % fewer parameters (ConvNeXt, Table 1)",
                                flora["accuracy_mean"] >= lora["accuracy_mean"] - 0.01))
    full, flora_large = by.get(("full FT", None)), by.get(("FLoRA", BUDGETS["large"]["flora"]))
    if full and flora_large:
        checks.append(Check(f"FLoRA r={BUDGETS['large']['flora']} vs full fine-tuning: accuracy (within 1 point) with "
                            f"≥ 80 % fewer trainable parameters",
                            f"{100 * flora_large['accuracy_mean']:.1f} vs {100 * full['accuracy_mean']:.1f} "
                            f"({flora_large['trainable']:,} vs {full['trainable']:,})",
                            "comparable to full fine-tuning with an 80 % smaller budget",
                            flora_large["accuracy_mean"] >= full["accuracy_mean"] - 0.01
                            and flora_large["trainable"] <= 0.2 * full["trainable"]))
    bitfit = by.get(("BitFit", None))
    if bitfit and head:
        checks.append(Check(f"BitFit ({bitfit['trainable']:,} trainable) vs head only (accuracy %)",
                            f"{100 * bitfit['accuracy_mean']:.1f} vs {100 * head['accuracy_mean']:.1f}"))
    loralib = by.get(("LoRA (loralib ConvLoRA)", 1))
    flora_small = by.get(("FLoRA", BUDGETS["small"]["flora"]))
    if loralib and flora_small:
        checks.append(Check("FLoRA (small) vs loralib ConvLoRA r=1: trainable parameters, accuracy",
                            f"{flora_small['trainable']:,} vs {loralib['trainable']:,}; "
                            f"{100 * flora_small['accuracy_mean']:.1f} vs {100 * loralib['accuracy_mean']:.1f}",
                            "≈ 80 % fewer parameters at equal accuracy",
                            flora_small["trainable"] < 0.5 * loralib["trainable"]
                            and flora_small["accuracy_mean"] >= loralib["accuracy_mean"] - 0.01))
    return checks


def vision_tables(d: Path) -> list[str]:
    summary, runs = _summary(d), json.loads((d / "flora_vision.json").read_text())["runs"]
    lines = ["Accuracy against trainable parameters (digits eval, 360 images; mean ± std over seeds, %):", ""]
    lines += markdown(["method", "rank", "trainable params", "accuracy", "seed 0", "seed 1", "seed 2", "where"],
                      [[s["method"], s["rank"] if s["rank"] is not None else "-", f"{s['trainable']:,}",
                        f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}",
                        *[f"{100 * s['seeds'][k]:.1f}" if k in s["seeds"] else "-" for k in ("0", "1", "2")],
                        s.get("device", "")] for s in summary])
    lines += ["", f"Every run ({len(runs)}):", ""]
    lines += markdown(["method", "rank", "seed", "trainable params", "accuracy", "where", "run"],
                      [[r["method"], r["rank"] if r["rank"] is not None else "-", r["seed"], f"{r['trainable']:,}",
                        f"{100 * r['accuracy']:.2f}", r["device"], r["run"]] for r in sorted(runs, key=lambda r: (r["trainable"], r["method"],
                                                                                           r["seed"]))])
    return lines


def collect_scale(sweep_dir: Path) -> None:
    rows = _rows(sweep_dir)
    summary = []
    for (model, scale), runs in sorted(_groups(rows, ("model", "scale")).items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean, std = _mean_std([r["accuracy"] for r in runs])
        summary.append({"model": model, "scale": scale, "accuracy_mean": mean, "accuracy_std": std,
                        "seeds": {r["seed"]: r["accuracy"] for r in runs}, "trainable": runs[0]["trainable"]})
    best = {}
    for s in summary:
        if s["model"] not in best or s["accuracy_mean"] > best[s["model"]]["accuracy_mean"]:
            best[s["model"]] = s
    write_json(sweep_dir / "flora_scale.json", {"runs": rows, "summary": summary,
                                                "best_scale": {m: s["scale"] for m, s in best.items()}})


def scale_checks(d: Path) -> list[Check]:
    report = json.loads((d / "flora_scale.json").read_text())
    best = report["best_scale"]
    conv, linear = best.get("efficientnet_lite0"), best.get("minilm")
    checks = [Check("best s on the ConvNet's convolutions (EfficientNet-Lite0, digits)", conv, 4.0),
              Check("best s on MiniLM's linear layers (q, v; SST-2)", linear, 0.04)]
    if conv is not None and linear is not None:
        checks.append(Check("best s larger on convolutions than on linear layers", f"{conv:g} vs {linear:g}",
                            "4 (ConvNeXt) vs 0.04 (InternViT-6B / LLaVA)", conv > linear))
    return checks


def scale_tables(d: Path) -> list[str]:
    report = json.loads((d / "flora_scale.json").read_text())
    lines = ["Accuracy by FLoRA scale s (mean ± std over seeds, %; every seed listed):", ""]
    lines += markdown(["model (layers)", "s", "accuracy", "per seed"],
                      [[{"efficientnet_lite0": "EfficientNet-Lite0 (k×k convs)", "minilm": "MiniLM (q, v linear)"}
                        .get(s["model"], s["model"]), f"{s['scale']:g}",
                        f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}",
                        ", ".join(f"{k}: {100 * v:.1f}" for k, v in sorted(s["seeds"].items()))]
                       for s in report["summary"]])
    return lines


def _vision_sweeps() -> list[list[str]]:
    small, large = BUDGETS["small"], BUDGETS["large"]
    sweeps = []
    for seed in SEEDS:
        sweeps += [[*VISION, f"adapter={a}", f"rank={small[a]},{large[a]}", f"seed={seed}"] for a in ("flora", "lora", "dora")]
    sweeps.append([*VISION, "adapter=lora", "adapter.options.conv_form=loralib", "rank=1", "seed=0,1,2"])
    sweeps.append([*VISION, "adapter=bitfit,head", "seed=0,1,2"])
    sweeps.append([*VISION, "adapter=full", FULL_LR, "seed=0,1,2"])
    return sweeps


RECIPES = [
    Recipe("flora_vision", "FLoRA vs LoRA (PEFT and loralib conv forms), DoRA, BitFit, head-only and full FT on a "
           "pretrained ConvNet's convolutions at matched parameter budgets", ref.FLORA_VISION, _vision_sweeps(), [],
           vision_checks, "30 runs of 60 steps: ~1 h on a 2-core CPU; ~3 min on one H200 with --jobs 12", collect=collect_vision,
           tables=vision_tables),
    Recipe("flora_scale", "FLoRA's scale s on convolutions (EfficientNet-Lite0) and on linear layers (MiniLM)",
           ref.FLORA_SCALE, [[*VISION, "adapter=flora", f"adapter.options.scale={SCALES}", "seed=0"],
                             [*VISION, "adapter=flora", f"adapter.options.scale={SCALES}", "seed=1"],
                             [*LINEAR, "adapter=flora", f"adapter.options.scale={SCALES}", "seed=0"]], [],
           scale_checks, "10 ConvNet runs of 60 steps + 5 MiniLM runs of 100 steps: ~30 min on a 2-core CPU; ~3 min on one H200",
           collect=collect_scale, tables=scale_tables),
]
