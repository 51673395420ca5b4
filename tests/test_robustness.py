"""Odd starts (a truncated result.json or adapter file in a sweep: tests/test_runner.py): a data directory that
does not exist, a run started from another working directory, a resumed run's wall time and W&B run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli_env, run_cli, tiny_args

from lowrank.runner.config import DEFAULT_DATA_DIR
from lowrank.runner.rundir import ATTEMPTS, counted, end_attempt, start_attempt


def _env_without_offline(**extra):
    env = cli_env(**extra)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(key)
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # were the hub tried, it would be unreachable and slow
    return env


def test_an_explicit_missing_data_dir_fails_at_once_naming_it(tmp_path):
    missing = tmp_path / "nonexistent"
    started = time.time()
    proc = run_cli("logger=none", f"hydra.run.dir={tmp_path / 'out'}", env=_env_without_offline(data_dir=missing),
                   timeout=120)
    elapsed = time.time() - started
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and str(missing) in lines[0] and "does not exist" in lines[0], \
        proc.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "it stops before Hydra starts the job"
    print(f"failed in {elapsed:.1f} s")


@pytest.mark.skipif(not (DEFAULT_DATA_DIR / "sst2").is_dir(), reason="no data in the default location")
def test_the_default_data_dir_works_from_another_working_directory(tiny_bert, tmp_path):
    env = cli_env()
    env.pop("LOWRANK_DATA_DIR")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *tiny_args(tiny_bert, f"hydra.run.dir={out}",
                                                                            "trainer.max_eval_samples=16")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["config"]["paths"]["data_dir"] == str(DEFAULT_DATA_DIR)
    lines = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), "every log line is printed once"


def test_a_killed_attempt_counts_until_its_last_write(tmp_path):
    first = start_attempt(tmp_path, 1000.0, resumed=False)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    os.utime(tmp_path / "metrics.jsonl", (1030.0, 1030.0))      # the killed process's last write
    attempts = start_attempt(tmp_path, 1100.0, resumed=True)
    assert first[0]["started"] == 1000.0 and (attempts[0]["started"], attempts[0]["ended"]) == (1000.0, 1030.0)
    assert attempts[-1]["pid"] == os.getpid() and attempts[-1]["resumed"]
    assert end_attempt(tmp_path, attempts, 1150.0) == pytest.approx(30.0 + 50.0)
    assert len(json.loads((tmp_path / ATTEMPTS).read_text())) == 2
    over = start_attempt(tmp_path, 1200.0, resumed=False)
    assert len(over) == 3, "every attempt is recorded"
    assert end_attempt(tmp_path, over, 1210.0) == pytest.approx(10.0), "a run that starts over counts itself only"
    assert len(counted(over)) == 1


def test_a_resumed_run_has_one_offline_wandb_run_and_stages_nothing_outside(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lowrank.runner.tracking import Tracker
    from wandb_offline import read_offline_run

    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = type("C", (dict,), {"__getattr__": dict.__getitem__})(
        name="wandb", mode="offline", project="p", entity=None, tags=[], log_adapter_artifact=True)
    run_dir = tmp_path / "run"
    first = Tracker(cfg, run_dir, config={"a": 1}, name="job", group="g")
    for step in (1, 2, 3, 4):
        first.log({"train/loss": 1.0 / step}, step)
    first._wandb = None  # killed: never finished
    second = Tracker(cfg, run_dir, config={"a": 1}, name="job", group="g")
    second.rewind(2)                                          # resumed from the step-2 checkpoint
    for step in (3, 4, 5):
        second.log({"train/loss": 1.0 / step}, step)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter.safetensors").write_bytes(b"x" * 1000)
    second.log_artifact(run_dir / "adapter", name="adapter-x")
    second.finish()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    steps, deadline = [], time.time() + 60
    while steps != [1, 2, 3, 4, 5] and time.time() < deadline:  # W&B's writer may still be flushing the file
        time.sleep(0.2)
        steps = [h["_step"] for h in read_offline_run(run_dir)["history"]]
    assert steps == [1, 2, 3, 4, 5]
    staged = [p for sub in ("data", "cache") if (tmp_path / sub).exists() for p in (tmp_path / sub).rglob("*")
              if p.is_file() and "artifacts" in p.parts]
    assert not staged, staged
