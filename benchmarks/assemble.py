"""Rebuild a result JSON (checks and table included) from the per-variant rows that
``gpu_step --partial`` wrote, when a device run stopped at its time limit before the end, optionally
adding rows from a second run of the same preset on the same machine (marked with their ``run``).

    python -m benchmarks.assemble --partial rows.json --env-log log.txt --extra tail.json \\
        --out benchmarks/results/llama1b_h100.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_step  # noqa: E402
from experiments.portable import portable  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--partial", required=True, help="rows written by gpu_step --partial")
    p.add_argument("--env-log", required=True, help="that run's log (environment line, ceiling, model line)")
    p.add_argument("--extra", default=None, help="a complete result JSON whose rows fill in missing variants")
    p.add_argument("--preset", default="llama1b")
    p.add_argument("--fast", default="compile+cg")
    p.add_argument("--command", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    rows = json.loads(Path(args.partial).read_text())
    for r in rows:
        r["run"] = "main"
    log = Path(args.env_log).read_text()
    env = json.loads(next(line for line in log.splitlines() if line.startswith('{"python"')))
    ceiling = float(re.search(r"matmul ceiling \S+: ([\d.]+) TFLOP/s", log).group(1))
    n_matmul = float(re.search(r"N\(matmul\)=([\d.]+)M", log).group(1)) * 1e6
    preset = gpu_step.PRESETS[args.preset]
    tokens = preset["batch"] * preset["seq"]
    if args.extra:
        extra = json.loads(Path(args.extra).read_text())
        have = {(r["variant"], r["rank"], r["targets"]) for r in rows}
        for r in extra["rows"]:
            if (r["variant"], r["rank"], r["targets"]) not in have:
                r["run"] = f"second run, same machine (ceiling {extra['matmul_ceiling_tflops']:.1f} TFLOP/s)"
                rows.append(r)
    result = {
        "preset": args.preset, "preset_config": preset, "model_source": "random init", "dtype": preset["dtype"],
        "device_kind": "cuda", "environment": env, "matmul_ceiling_tflops": ceiling,
        "matmul_params": int(n_matmul), "tokens_per_step": tokens, "flops_per_step_4NT": int(4 * n_matmul * tokens),
        "warmup": 3, "steps": 20, "fast_base": args.fast, "command": args.command,
        "assembled_from": [args.partial] + ([args.extra] if args.extra else []), "rows": rows,
    }
    result["checks"] = gpu_step.performance_checks(result)
    Path(args.out).write_text(json.dumps(portable(result), indent=1, default=str))
    print(gpu_step.table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
