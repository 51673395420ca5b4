"""The cost model (``lowrank.runner.costs``) against random-init models of the benchmark presets' shapes
(``benchmarks/step_variants.PRESETS``), measured by the runner's own step.

    python -m benchmarks.costs --preset llama1b --adapters lora,full --out rows.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.step_variants import PRESETS  # noqa: E402
from lowrank.runner.costs import compare, report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama1b", choices=sorted(k for k, v in PRESETS.items() if v["family"] == "llama"))
    p.add_argument("--adapters", default="lora,full")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--out")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    preset = PRESETS[args.preset]

    def factory():
        torch.manual_seed(0)
        config = LlamaConfig(**preset["config"])
        config._attn_implementation = "sdpa"
        with torch.device(preset["device"]):
            return LlamaForCausalLM(config)  # float32 weights, bf16 autocast: the runner's CUDA setting

    report(compare(factory, args.adapters.split(","), batch=args.batch or preset["batch"],
                   seq=args.seq or preset["seq"], kind="generation", device=preset["device"],
                   autocast=preset["device"] == "cuda"), args.out)


if __name__ == "__main__":
    main()
