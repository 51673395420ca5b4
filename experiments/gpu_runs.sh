#!/usr/bin/env bash
# The GPU runs behind README's "longer budget" results: DoRA Fig. 2 with the paper's training shape, LoRA
# Fig. 4 over three seed pairs, LoRA Table 6 with two scaling rules, and the ΔW spectrum of FT vs LoRA/DoRA.
# One H200, ~6 min: runs share the GPU 15 at a time; after DEADLINE seconds no run starts and running ones stop.
#   bash experiments/gpu_runs.sh [OUT_DIR] [extra run.py overrides...]
set -euo pipefail
OUT_DIR="${1:-outputs/gpu_results}"; shift || true
DEADLINE="${DEADLINE:-300}"
MODEL="${LOWRANK_MINILM_BF16:+model.pretrained=$LOWRANK_MINILM_BF16}"
OV=(trainer.num_threads=1 logger=none $MODEL "$@")
RECIPES=(dora_fig2_paper lora_fig4_long lora_table6_long)
E=outputs/experiments
python -m experiments "${RECIPES[@]}" --jobs "${JOBS:-15}" --deadline "$DEADLINE" --train-only "${OV[@]}"
python -m experiments "${RECIPES[@]}" --analyse-only "${OV[@]}" > "$E/analyses.log" 2>&1 || echo "analyses: see $E/analyses.log"
python -m analysis spectrum "$E/dora_fig2_paper/paper" "$E"/lora_table6_long/alpha8/t=qv,r=*,seed=0 \
  --top 1 2 4 8 16 64 --out "$E/spectrum" --no-progress > "$E/spectrum.log" 2>&1 || echo "spectrum: see $E/spectrum.log"
mkdir -p "$OUT_DIR"
# reports, summaries, figures, tables, result.json and logs, and Figure 4's LoRA factors (small); no other weights
tar czf "$OUT_DIR/gpu_results.tgz" --exclude='checkpoints' --exclude='*.pt' \
  --exclude="$E/dora_fig2_paper/*/*/adapter" --exclude="$E/lora_table6_long/*/*/adapter" "$E"
cp "$E"/*/report_*.md "$OUT_DIR"/ 2>/dev/null || true
ls -la "$OUT_DIR"
