"""DDP across processes (torchrun, gloo on the CPU) gives the adapter weights of one process with the
same global batch; a multi-GPU machine's parallel jobs each pick their own GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cli_env, make_tiny_bert, tiny_args
from lowrank.runner import distributed


@pytest.fixture(scope="module")
def tiny_bert_no_dropout(tmp_path_factory):
    # dropout draws different random numbers in 1 vs 2 processes; without it the runs must agree
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


def _train(cmd_prefix, model_dir, run_dir, data_dir):
    args = tiny_args(model_dir, f"hydra.run.dir={run_dir}", "trainer.max_steps=4", "trainer.save_weights_at=[]",
                     "trainer.batch_size=8",                      "trainer.group_by_length=false", "trainer.eval_every=0", "trainer.checkpoint_every=2")
    done = subprocess.run([*cmd_prefix, "run.py", *args], cwd=REPO, env=cli_env(data_dir, OMP_NUM_THREADS=1),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(run_dir / "adapter" / "adapter.safetensors"))


@pytest.mark.integration
def test_two_process_ddp_equals_one_process(tmp_path, tiny_bert_no_dropout, tiny_data):
    one = _train([sys.executable], tiny_bert_no_dropout, tmp_path / "one", tiny_data)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _train(torchrun, tiny_bert_no_dropout, tmp_path / "two", tiny_data)
    assert set(one) == set(two) and any(".lora_A" in k for k in one)
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-6), name
    # rank 0 alone wrote the run dir
    assert (tmp_path / "two" / "result.json").is_file()
    # and the launch really was sharded: a global batch of 7 cannot be split over 2 processes
    args = tiny_args(tiny_bert_no_dropout, f"hydra.run.dir={tmp_path / 'odd'}", "trainer.batch_size=7")
    odd = subprocess.run([*torchrun, "run.py", *args], cwd=REPO, env=cli_env(tiny_data), capture_output=True,
                         text=True, timeout=600)
    assert odd.returncode != 0 and "not divisible by the 2 processes" in odd.stdout + odd.stderr


def test_batch_not_divisible_by_processes_is_one_line_error():
    world = distributed.World(rank=0, size=3)
    with pytest.raises(ValueError, match=r"trainer.batch_size=8 is not divisible by the 3 processes"):
        world.shard(list(range(8)))
    assert distributed.World(rank=1, size=2).shard(list(range(6))) == [1, 3, 5]


def test_parallel_jobs_take_their_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [distributed.job_device("auto", n).index for n in range(6)] == [0, 1, 2, 3, 0, 1]
    assert distributed.job_device("cpu", 3).type == "cpu"


def test_torchrun_ranks_share_one_run_dir_and_only_rank_0_writes_hydra_files():
    env = {"WORLD_SIZE": "2", "RANK": "1", "TORCHELASTIC_RUN_ID": "abc"}
    assert distributed.torchrun_overrides(["rank=4"], env) == [
        "hydra.run.dir=outputs/torchrun/abc", "hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
    assert distributed.torchrun_overrides(["hydra.run.dir=x"], {**env, "RANK": "0"}) == []
    assert distributed.torchrun_overrides(["rank=4"], {}) == []  # not under torchrun
    with pytest.raises(ValueError, match="pass hydra.run.dir="):
        distributed.torchrun_overrides([], {"WORLD_SIZE": "2", "RANK": "0"})
