"""The methods through the runner: gradual unfreezing resumes on schedule, the cost prediction is recorded,
a prefix is saved folded; and the recipes' checks on planted numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, cli_env, run_cli, tiny_args

GRADUAL = ["adapter=gradual", "adapter.options.every=6", "trainer.lr=1e-4", "trainer.max_steps=24",
           "trainer.batch_size=16", "trainer.checkpoint_every=4", "trainer.eval_every=12", "trainer.log_every=4",
           "trainer.save_weights_at=[]"]


def test_gradual_unfreezing_resumes_after_sigkill_with_identical_numbers(tiny_bert, tiny_data, tmp_path):
    reference = tmp_path / "uninterrupted"
    proc = run_cli(*GRADUAL, *tiny_args(tiny_bert), f"hydra.run.dir={reference}", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, "run.py", *GRADUAL, *tiny_args(tiny_bert), f"hydra.run.dir={killed}"],
                              cwd=REPO, env=cli_env(tiny_data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, hit = time.time() + 240, False
    while time.time() < deadline and victim.poll() is None:
        steps = [int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")]
        if steps and 8 <= max(steps) < 24:  # past the first unfreezing, before the end
            os.kill(victim.pid, signal.SIGKILL)
            hit = True
            break
        time.sleep(0.01)
    victim.wait(timeout=60)
    assert hit, "the run ended before it could be interrupted"
    proc = run_cli(*GRADUAL, *tiny_args(tiny_bert), f"hydra.run.dir={killed}", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, ref = (json.loads((d / "result.json").read_text()) for d in (killed, reference))
    assert resumed["resumed_from_step"] is not None
    assert resumed["final"] == ref["final"]
    a, b = (load_file(str(d / "adapter" / "adapter.safetensors")) for d in (killed, reference))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # every=6, 2 blocks: from step 7 the top block trains, from step 13 both; the bottom embeddings never
    assert any(".layer.0." in k for k in a) and not any("embeddings" in k for k in a)
    assert ref["predicted_costs"]["trainable_params"] == ref["trainable_params"]


def test_prefix_run_saves_the_folded_prefix_and_records_costs(tiny_bert, tiny_data, tmp_path):
    run = tmp_path / "prefix"
    proc = run_cli("adapter=prefix", "adapter.options.length=4", "adapter.options.hidden=16",
                   *tiny_args(tiny_bert), f"hydra.run.dir={run}", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "result.json").read_text())
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(run / "adapter" / "adapter.safetensors"))
    assert config["options"]["reparam"] is False
    assert tensors["lowrank_injected.prefix"].shape == (4, 2 * 2 * 32)  # length × layers·2·d
    costs = result["predicted_costs"]
    assert costs["trainable_params"] == result["trainable_params"] and costs["layers_on_backward_path"] == 2
    assert result["rss_at_start_mb"] > 0
    from lowrank.runner.results import load_run

    with pytest.raises(ValueError, match="leaves the target weights unchanged"):
        load_run(run).deltas()


def test_recipe_checks_on_planted_latency_and_cost_rows(tmp_path):
    from experiments.recipes.methods import costs_checks, table1_checks

    rows = [{"variant": v, "batch": b, "seq": 128, "ms": 1.0, "std_ms": 0.0, "overhead_pct": o}
            for v, b, o in [("base", 1, 0), ("base", 8, 0), ("lora_merged", 1, 0.5), ("lora_merged", 8, -0.3),
                            ("lora_unmerged", 1, 9), ("lora_unmerged", 8, 4), ("houlsby", 1, 30), ("houlsby", 8, 3),
                            ("pfeiffer", 1, 2), ("pfeiffer", 8, 5), ("prefix", 1, 8), ("prefix", 8, 1)]]
    (tmp_path / "lora_table1.json").write_text(json.dumps({"cpu": {"where": "x", "rows": rows}}))
    verdicts = {c.what.split(": ")[1]: c.holds for c in table1_checks(tmp_path)}
    assert verdicts["merged LoRA overhead per batch (%)"] is True
    assert verdicts["houlsby overhead at batch 1 / 8 (%)"] is True
    assert verdicts["pfeiffer overhead at batch 1 / 8 (%)"] is False  # worse at the large batch: the claim fails
    cost = lambda a, ratio: {"adapter": a, "batch": 1, "seq": 8, "compared": "RSS growth", "predicted_mb": ratio,
                             "measured_mb": 1.0, "ratio": ratio}
    (tmp_path / "costs_cpu.json").write_text(json.dumps([cost("lora", 0.8), cost("full", 1.3)]))
    assert [c.holds for c in costs_checks(tmp_path)] == [True, False]
