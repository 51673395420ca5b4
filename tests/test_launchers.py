"""Sweeps through the launchers researchers use: joblib (local parallel) and submitit (SLURM; its local
executor stands in for a cluster here). Same seeds → same aggregate as the basic launcher; a killed
submitit job resumes from its checkpoint when the sweep is submitted again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO, cli_env, run_cli, tiny_args

pytestmark = pytest.mark.integration
SWEEP = ["-m", "rank=2,4", "seed=0,1", "trainer.max_steps=4", "trainer.save_weights_at=[0,4]", "trainer.eval_every=2"]


def _aggregate(sweep) -> pd.DataFrame:
    table = pd.read_csv(sweep / "aggregate.csv")
    cols = ["run", "status"] + sorted(c for c in table.columns if c.startswith(("final/", "best/")))
    return table[cols].sort_values("run").reset_index(drop=True)


@pytest.fixture(scope="module")
def basic(tiny_bert, tiny_data, tmp_path_factory):
    sweep = tmp_path_factory.mktemp("basic")
    proc = run_cli(*SWEEP, *tiny_args(tiny_bert), f"hydra.sweep.dir={sweep}", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _aggregate(sweep)


@pytest.mark.parametrize("launcher", ["parallel", "local"])
def test_launcher_sweep_equals_basic_launcher(launcher, basic, tiny_bert, tiny_data, tmp_path):
    proc = run_cli(*SWEEP, f"hydra/launcher={launcher}", *tiny_args(tiny_bert), f"hydra.sweep.dir={tmp_path}",
                   data_dir=tiny_data, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = _aggregate(tmp_path)
    assert len(ours) == 4 and (ours["status"] == "completed").all()
    pd.testing.assert_frame_equal(ours, basic)


def test_killed_submitit_job_resumes_from_checkpoint(tiny_bert, tiny_data, tmp_path):
    args = ["-m", "seed=0", "hydra/launcher=local", "trainer.max_steps=40", "trainer.checkpoint_every=5",
            "trainer.eval_every=0", *tiny_args(tiny_bert), f"hydra.sweep.dir={tmp_path}"]
    victim = subprocess.Popen([sys.executable, "run.py", *args], cwd=REPO, env=cli_env(tiny_data),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, killed = time.time() + 300, False
    while time.time() < deadline and victim.poll() is None:
        if [p for p in tmp_path.glob("*/checkpoints/step-*") if not p.name.endswith(".tmp")]:
            os.killpg(victim.pid, signal.SIGKILL)  # the submitter and its submitit job with it
            killed = True
            break
        time.sleep(0.05)
    victim.wait(timeout=60)
    assert killed, "the job finished before it could be killed"
    assert not list(tmp_path.glob("*/result.json"))
    proc = run_cli(*args, data_dir=tiny_data, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*/result.json")).read_text())
    assert result["status"] == "completed"
    assert result["resumed_from_step"] is not None and 0 < result["resumed_from_step"] < 40
