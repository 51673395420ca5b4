"""lowrank.runner.results (the API notebooks and analysis/ use) and lowrank.runner.tracking (JSONL + W&B offline), on
runs of a tiny random BERT; every number is checked against the raw files or a float64 formula."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank.runner import results
from lowrank.runner.tracking import Tracker
from wandb_offline import read_offline_run

from conftest import run_cli, tiny_args

MODULES = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


@pytest.fixture(scope="module")
def sweep(tiny_bert, tiny_data, tmp_path_factory) -> Path:
    """LoRA (r=8, α=16), DoRA and full fine-tuning, with weights kept at steps 0, 3 and 6."""
    root = tmp_path_factory.mktemp("results") / "sweep"
    proc = run_cli("-m", "adapter=lora,dora,full", "alpha=16",
                   *tiny_args(tiny_bert, "trainer.save_weights_at=[0,3,6]", f"hydra.sweep.dir={root}"),
                   data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def run_of(sweep: Path, adapter: str) -> results.Run:
    return results.load_run(next(sweep.glob(f"adapter={adapter},*")))


def w0(tiny_bert: Path, module: str) -> torch.Tensor:
    return load_file(str(tiny_bert / "model.safetensors"))[module.removeprefix("bert.") + ".weight"].double()


def test_load_run_reads_result_config_and_metrics(sweep):
    run = run_of(sweep, "lora")
    assert run.status == "completed" and run.config["alpha"] == 16 and run.config["adapter"]["name"] == "lora"
    raw = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert list(run.metrics["step"]) == [r["step"] for r in raw]
    assert run.metrics["eval/accuracy"].dropna().iloc[-1] == run.result["final"]["eval/accuracy"]
    assert run.adapter_config["rank"] == 8 and sorted(run.adapter_config["modules"]) == sorted(MODULES)


def test_factors_and_deltas_from_the_adapter_file(sweep):
    run = run_of(sweep, "lora")
    raw = load_file(str(run.dir / "adapter" / "adapter.safetensors"))
    factors = run.factors()
    assert sorted(factors) == sorted(MODULES)
    deltas = run.deltas()
    for m in MODULES:
        assert factors[m]["A"].shape == (8, 32) and factors[m]["B"].shape == (32, 8)
        assert factors[m]["scaling"] == pytest.approx(16 / 8)
        expected = 2.0 * raw[f"{m}.lora_B"].double() @ raw[f"{m}.lora_A"].double()
        torch.testing.assert_close(deltas[m].double(), expected, atol=1e-6, rtol=0)


def test_base_weights_trajectory_and_deltas_by_step(sweep, tiny_bert):
    run = run_of(sweep, "lora")
    base = run.base_weights()
    assert sorted(base) == sorted(MODULES)
    for m in MODULES:
        assert torch.equal(base[m].double(), w0(tiny_bert, m))
    trajectory = run.weight_trajectory()
    assert list(trajectory) == [0, 3, 6]
    final = run.deltas()
    by_step = run.deltas(step=6)
    for m in MODULES:
        assert torch.equal(trajectory[0][m], base[m])
        torch.testing.assert_close(by_step[m], final[m], atol=1e-6, rtol=0)
    assert all(run.deltas(step=0)[m].abs().max() == 0 for m in MODULES)
    with pytest.raises(KeyError, match="steps: \\[0, 3, 6\\]"):
        run.deltas(step=4)


def test_dora_deltas_rebuild_the_model_and_agree_with_the_trajectory(sweep, tiny_bert):
    run = run_of(sweep, "dora")
    factors = run.factors()
    assert all(f["magnitude"].shape == (32,) for f in factors.values())
    final, by_step = run.deltas(), run.deltas(step=6)
    for m in MODULES:
        # DoRA's W' = m · (W0 + sBA) / ||W0 + sBA||_row, in float64 from the raw factors
        f = factors[m]
        v = w0(tiny_bert, m) + f["scaling"] * f["B"].double() @ f["A"].double()
        expected = f["magnitude"].double()[:, None] * v / v.norm(dim=1, keepdim=True) - w0(tiny_bert, m)
        torch.testing.assert_close(final[m].double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(by_step[m], final[m], atol=1e-5, rtol=0)


def test_full_fine_tuning_deltas(sweep, tiny_bert):
    run = run_of(sweep, "full")
    assert run.factors() == {}
    deltas = run.deltas()
    assert sorted(deltas) == sorted(MODULES), "full fine-tuning reports the target modules' updates"
    trajectory = run.weight_trajectory()
    for m in MODULES:
        torch.testing.assert_close(deltas[m].double(), trajectory[6][m].double() - w0(tiny_bert, m), atol=1e-6, rtol=0)
        assert deltas[m].abs().max() > 0


def test_load_sweep_table(sweep):
    table = results.load_sweep(sweep)
    assert table.columns[0] == "run" and {"adapter", "alpha", "status", "best_step", "wall_time_s"} <= set(table.columns)
    assert sorted(table["adapter"]) == ["dora", "full", "lora"]
    assert set(table["status"]) == {"completed"} and (table["alpha"] == 16).all()
    for _, row in table.iterrows():
        result = json.loads((sweep / row["run"] / "result.json").read_text())
        assert row["final/accuracy"] == result["final"]["eval/accuracy"]
        assert row["trainable_params"] == result["trainable_params"]


def test_incomplete_run_is_listed(sweep, tmp_path):
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    (next(copy.glob("adapter=dora,*")) / "result.json").unlink()  # as if killed
    table = results.load_sweep(copy).set_index("adapter")
    assert table.loc["dora", "status"] == "incomplete" and table.loc["lora", "status"] == "completed"


# ---- tracking ------------------------------------------------------------------------------------------

def test_wandb_offline_run_reads_back(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [a for a in tiny_args(tiny_bert, f"hydra.run.dir={out}") if a != "logger=none"]
    proc = run_cli(*args, "logger=wandb", "rank=4", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B failed" not in proc.stdout + proc.stderr
    offline = read_offline_run(out)
    assert offline["config"]["rank"] == 4 and offline["config"]["adapter"]["name"] == "lora"
    assert offline["config"]["model"]["name"] == "tiny" and offline["group"] == "default"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    jsonl_evals = [(r["step"], r["eval/accuracy"]) for r in logged if "eval/accuracy" in r]
    wandb_evals = [(h["_step"], h["eval/accuracy"]) for h in offline["history"] if "eval/accuracy" in h]
    assert wandb_evals == jsonl_evals and len(jsonl_evals) == 2
    assert offline["summary"]["status"] == "completed"
    assert offline["summary"]["final/eval/accuracy"] == jsonl_evals[-1][1]


class _Config(dict):
    __getattr__ = dict.__getitem__


def test_tracker_warns_once_and_keeps_the_jsonl_when_wandb_breaks(tmp_path, monkeypatch, caplog):
    import wandb

    class BrokenRun:
        calls = 0

        def log(self, *a, **k):
            BrokenRun.calls += 1
            raise ConnectionError("no route to host")

    monkeypatch.setattr(wandb, "init", lambda **kwargs: BrokenRun())
    cfg = _Config(name="wandb", project="p", entity=None, mode="offline", tags=[], log_adapter_artifact=False)
    with caplog.at_level(logging.WARNING, logger="lowrank.runner.tracking"):
        tracker = Tracker(cfg, tmp_path, config={}, name="n", group="g")
        for step in (1, 2, 3):
            tracker.log({"train/loss": 1.0 / step}, step)
        tracker.finish()
    assert BrokenRun.calls == 3
    assert len([r for r in caplog.records if "W&B failed" in r.getMessage()]) == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    monkeypatch.setattr(wandb, "init", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("cannot start")))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowrank.runner.tracking"):
        tracker = Tracker(cfg, tmp_path / "b", config={}, name="n", group="g")
        tracker.log({"x": 1.0}, 1)
    assert not tracker.wandb_active and (tmp_path / "b" / "metrics.jsonl").is_file()
    assert len([r for r in caplog.records if "W&B failed to start" in r.getMessage()]) == 1


def test_tracker_rewind_drops_records_after_the_checkpoint(tmp_path):
    cfg = _Config(name="none", project="p", entity=None, mode="disabled", tags=[], log_adapter_artifact=False)
    tracker = Tracker(cfg, tmp_path, config={}, name="n", group="g")
    for step in range(1, 6):
        tracker.log({"v": step}, step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "v"')  # a line torn by SIGKILL
    tracker.rewind(3)
    assert [json.loads(line)["v"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
