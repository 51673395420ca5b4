"""The default run on the CPU: `python run.py` as a user types it (MiniLM, SST-2, LoRA r=8 on q,v; W&B offline) —
its wall time on this CPU and its SST-2 dev accuracy. The target: under 5 minutes and at least 80%.

    python -m benchmarks.cpu_default                 # one run; prints a table, writes the JSON below
    python -m benchmarks.cpu_default --repeat 2      # several runs (fresh run dirs)
    python -m benchmarks.cpu_default -- logger=none  # extra overrides after --
    python -m benchmarks.cpu_default --against ../old-checkout -- logger=none   # the same runs from another
                                                     # checkout, alternating with this one's, in one call

Writes benchmarks/results/cpu_default.json. The load average before and after is recorded: other processes
on the same cores slow a CPU run down a lot (PyTorch's threads spin-wait), so read times with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lowrank.runner.rundir import METRICS, read_result

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "cpu_default.json"
BUDGET_S, TARGET_ACCURACY = 300.0, 0.80


def one_run(extra: list[str], repo: Path = REPO) -> dict:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("LOWRANK_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
    with tempfile.TemporaryDirectory(prefix="cpu_default-") as tmp:
        run_dir = Path(tmp) / "run"
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={run_dir}", *extra], cwd=repo, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"run.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        result = read_result(run_dir)
        records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    evals = {r["step"]: round(r["eval/accuracy"], 4) for r in records if "eval/accuracy" in r}
    return {
        "wall_time_s": round(wall, 1),                       # process start to exit, what a user waits
        "run_wall_time_s": result["wall_time_s"],            # inside the job (after imports)
        "train_time_s": result.get("train_time_s"),
        "final_accuracy": result["final"]["eval/accuracy"],
        "best_accuracy": result["best"]["eval/accuracy"],
        "accuracy_by_step": evals,
        "steps": result["steps"],
        "trainable_params": result["trainable_params"],
        "total_params": result["total_params"],
        "peak_memory_mb": result["peak_memory_mb"],
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--against", type=Path, default=None,
                        help="another checkout (e.g. a git worktree of main) run the same way, alternating")
    parser.add_argument("overrides", nargs="*", help="extra run.py overrides (after --)")
    args = parser.parse_args()
    import torch

    runs, other = [], []
    for i in range(args.repeat):
        print(f"run {i + 1}/{args.repeat}: python run.py {' '.join(args.overrides)}", flush=True)
        runs.append(one_run(args.overrides))
        if args.against is not None:
            print(f"run {i + 1}/{args.repeat} of {args.against.name}", flush=True)
            other.append(one_run(args.overrides, args.against.resolve()))
    rows = [("run", "wall time (s)", "train (s)", "dev acc (final)", "dev acc (best)", "load avg before/after")]
    for i, r in enumerate(runs, 1):
        rows.append((str(i), f"{r['wall_time_s']:.1f}", f"{r['train_time_s']:.1f}", f"{r['final_accuracy']:.4f}",
                     f"{r['best_accuracy']:.4f}", f"{r['load_avg_before']:.2f} / {r['load_avg_after']:.2f}"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    worst = max(r["wall_time_s"] for r in runs)
    lowest = min(r["final_accuracy"] for r in runs)
    verdict = {"under_5_min": worst < BUDGET_S, "accuracy_at_least_80": lowest >= TARGET_ACCURACY}
    print(f"\ntarget: < {BUDGET_S:.0f} s and >= {TARGET_ACCURACY:.0%} dev accuracy -> {verdict}")
    against = None
    if other:
        ratio = statistics.median(r["wall_time_s"] for r in runs) / statistics.median(r["wall_time_s"] for r in other)
        against = {"commit": _commit(args.against), "runs": other, "wall_time_ratio": round(ratio, 3)}
        walls = ", ".join(str(r["wall_time_s"]) for r in other)
        accuracies = ", ".join(f"{r['final_accuracy']:.4f}" for r in other)
        print(f"against {against['commit']}: wall {walls} s, dev acc {accuracies}; this checkout / that one = "
              f"{ratio:.3f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "command": "python run.py " + " ".join(args.overrides),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "commit": _commit(REPO), "runs": runs, "verdict": verdict, "against": against,
    }, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")


def _commit(repo: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


if __name__ == "__main__":
    main()
