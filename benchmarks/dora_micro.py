"""One adapted linear layer, forward + backward, at the benchmark's shapes: where DoRA's extra time
over LoRA goes.

    python -m benchmarks.dora_micro --out benchmarks/results/dora_micro.json   # GPU; CUDA graphs, CUDA-event timing

Variants: the frozen base alone, our LoRA, our DoRA (lowrank/adapters/dora.py as is).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lowrank.adapters import DoRA, LoRA  # noqa: E402

SHAPES = {"llama q (8192x2048->2048)": (8192, 2048, 2048), "llama v (8192x2048->256)": (8192, 2048, 256),
          "bert (16384x768->768)": (16384, 768, 768)}


def make(variant: str, d_in: int, d_out: int, rank: int, device) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    if variant == "base":
        return base
    layer = (LoRA if variant == "lora" else DoRA)(base, rank, 2 * rank)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    return layer


def time_layer(module, x, g, reps: int = 100) -> float:
    fn = torch.compile(module, mode="reduce-overhead")

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        out = fn(x)
        out.backward(g)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev) * 1e3  # µs


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON file of the timings")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    rank = args.rank
    out = {}
    for label, (tokens, d_in, d_out) in SHAPES.items():
        x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
        row = {}
        for variant in ("base", "lora", "dora"):
            try:
                row[variant] = time_layer(make(variant, d_in, d_out, rank, device), x, g)
            except Exception as exc:  # noqa: BLE001
                row[variant] = f"{type(exc).__name__}: {exc}"[:200]
            torch._dynamo.reset()
        out[label] = row
        print(label, json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rank": rank, "us_per_fwd_bwd": out}, indent=1))


if __name__ == "__main__":
    main()
