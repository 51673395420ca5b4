"""Nothing lost, nothing stale: one owner per run directory, per-writer temporary files, result.json vouching
for its files, damaged checkpoints moved aside, task data checked when read, strict JSON, config checks."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, run_cli, tiny_args
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lowrank.atomic import atomic_path
from lowrank.runner import app, data
from lowrank.runner.config import CONF_DIR, ConfigError, validate
from lowrank.runner.rundir import RESULT, RunDirBusy, owned, read_result, write_result


def _cfg(*overrides: str, out: Path, data_dir: Path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    cfg.paths.output_dir = str(out)
    cfg.paths.data_dir = str(data_dir)
    return cfg


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and " W" not in line[:6]]


# ---- one owner per run directory ------------------------------------------------------------------------

def test_a_second_owner_is_refused_naming_the_holder(tmp_path):
    with owned(tmp_path / "run"):
        with pytest.raises(RunDirBusy, match=rf"in use by host \S+ pid {os.getpid()} since 20\d\d-.*; fix:"):
            with owned(tmp_path / "run"):
                pass
    with owned(tmp_path / "run"):  # released at the end of the block
        pass


def test_the_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lowrank.runner.rundir import owned\n"
                               f"with owned({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid} "):
            with owned(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with owned(tmp_path):  # no stale lock after a kill
        pass


# ---- per-writer temporary names -------------------------------------------------------------------------

def test_two_writers_of_one_file_never_touch_each_others_temporary_file(tmp_path):
    target = tmp_path / "cache.bin"
    with atomic_path(target) as first:
        first.write_bytes(b"a" * 1000)
        with atomic_path(target) as second:  # a second writer starts while the first is mid-write
            assert second != first and second.parent == first.parent
            second.write_bytes(b"b" * 1000)
        assert first.read_bytes() == b"a" * 1000, "the second writer left the first one's file alone"
    assert target.read_bytes() == b"a" * 1000 and sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]


def test_parallel_jobs_fill_an_empty_token_cache(tmp_path, monkeypatch, tiny_data, tiny_bert):
    from transformers import AutoTokenizer

    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    task = OmegaConf.load(CONF_DIR / "task" / "sst2.yaml")
    results, errors = [], []

    def job():
        try:
            results.append(data.load(task, tok, data_dir=tiny_data, max_seq_len=16))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cached = list((tmp_path / "cache").rglob("*"))
    assert [p.suffix for p in cached if p.is_file()] == [".pkl"], cached  # one whole entry, no temporary left
    again = data.load(task, tok, data_dir=tiny_data, max_seq_len=16)
    assert again.train["input_ids"] == results[0].train["input_ids"] and len(again.eval) == 64


# ---- data checked when read -----------------------------------------------------------------------------

def _sst2_copy(tiny_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    for f in (tiny_data / "sst2").iterdir():
        (root / "sst2" / f.name).write_bytes(f.read_bytes())
    return root


SST2 = OmegaConf.load(CONF_DIR / "task" / "sst2.yaml")
COLA = OmegaConf.load(CONF_DIR / "task" / "cola.yaml")


@pytest.mark.parametrize("task, file, content, needle", [
    (SST2, "sst2/stsa.binary.dev.txt", b"", r"stsa.binary.dev.txt: no examples.*; fix:"),
    (SST2, "sst2/stsa.binary.train.txt", b"1 good\n0 bad\n5 fine film\n", r"train.txt:3: label 5 is not one of task "
                                                                           r"sst2's labels 0..1; fix:"),
    (SST2, "sst2/stsa.binary.train.txt", b"1 good\n-100 bad\n", r"train.txt:2: label -100 is not one of"),
    (SST2, "sst2/stsa.binary.train.txt", b"1 good\nx bad\n", r"train.txt:2: label 'x' is not an integer; fix:"),
    (SST2, "sst2/stsa.binary.train.txt", b"1 good\n0 caf\xe9\n", r"train.txt:2: byte 0xe9 is not valid utf-8; fix:"),
    (COLA, "cola/in_domain_dev.tsv", b"gj04\t1\t\tFine.\nclc95\t0\n", r"in_domain_dev.tsv:2: 2 tab-separated column"),
    (COLA, "cola/in_domain_dev.tsv", b"gj04\tyes\t\tFine.\n", r"in_domain_dev.tsv:1: label 'yes' is not an integer"),
])
def test_bad_task_data_is_one_line_naming_file_and_line(task, file, content, needle, tiny_data, tmp_path):
    root = _sst2_copy(tiny_data, tmp_path)
    (root / "cola").mkdir()
    for name in ("in_domain_train.tsv", "in_domain_dev.tsv", "out_of_domain_dev.tsv"):
        (root / "cola" / name).write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    (root / file).write_bytes(content)
    with pytest.raises(data.DataError, match=needle) as e:
        data.raw_columns(task, root)
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)


def test_a_label_without_text_is_kept_as_an_empty_text_and_said_once(tmp_path, caplog):
    # the published SentEval files (CR, MPQA) hold such lines, and their example counts include them
    path = tmp_path / "t.txt"
    path.write_bytes(b"1 good\n\n0\n1 fine\n0 \n")
    with caplog.at_level("WARNING", logger="lowrank.runner.data"):
        rows = data.read_label_text(path)
    assert rows == {"text": ["good", "", "fine", ""], "label": [1, 0, 1, 0], "line": [1, 3, 4, 5]}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "2 line(s) hold a label but no text (first: line 3)" in warned[0]


def test_an_empty_eval_file_fails_before_any_model_loads_with_strict_json(tiny_data, tiny_bert, tmp_path,
                                                                         monkeypatch):
    from lowrank.runner import models

    root = _sst2_copy(tiny_data, tmp_path)
    (root / "sst2" / "stsa.binary.dev.txt").write_text("\n")
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("a model was loaded before the data check"))
    cfg = _cfg(*tiny_args(tiny_bert), out=tmp_path / "run", data_dir=root)
    with pytest.raises(data.DataError, match="stsa.binary.dev.txt: no examples"):
        app.run(cfg)
    result = json.loads((tmp_path / "run" / RESULT).read_text(), parse_constant=lambda c: pytest.fail(c))
    assert result["status"] == "failed" and "stsa.binary.dev.txt: no examples" in result["error"]


def test_result_json_is_strict_json_with_reasons_for_nulls(tmp_path):
    write_result(tmp_path, {"status": "completed", "final": {"eval/accuracy": math.nan, "eval/loss": 0.5},
                            "curve": [1.0, math.inf]})
    text = (tmp_path / RESULT).read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in result.json"))
    assert result["final"] == {"eval/accuracy": None, "eval/loss": 0.5} and result["curve"] == [1.0, None]
    assert set(result["null_reasons"]) == {"final.eval/accuracy", "curve[1]"}


# ---- the command line: a busy run dir, a sweep with a data error, damaged files ------------------------

def test_a_sweep_skips_a_busy_job_records_a_data_error_and_writes_its_table(tiny_data, tiny_bert, tmp_path):
    root = _sst2_copy(tiny_data, tmp_path)
    (root / "cola").mkdir()
    for name in ("in_domain_train.tsv", "out_of_domain_dev.tsv"):
        (root / "cola" / name).write_text("gj04\t1\t\tThe cat sat.\n" * 16)
    (root / "cola" / "in_domain_dev.tsv").write_bytes(b"gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat \xff\xfe sat.\n")
    sweep = tmp_path / "sweep"
    busy = sweep / "model.name=tiny,seed=1,task=sst2,trainer=smoke"
    with owned(busy):
        proc = run_cli("-m", *tiny_args(tiny_bert, "task=cola,sst2", "seed=0,1", f"hydra.sweep.dir={sweep}"),
                       data_dir=root, timeout=300)
        single = run_cli(*tiny_args(tiny_bert, "task=sst2", f"hydra.run.dir='{busy}'"), data_dir=root, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/result.json")}
    cola = [r for name, r in results.items() if "task=cola" in name]
    assert len(cola) == 2 and all(r["status"] == "failed" and "in_domain_dev.tsv:2: byte 0xff is not valid utf-8"
                                  in r["error"] for r in cola), results
    assert results["model.name=tiny,seed=0,task=sst2,trainer=smoke"]["status"] == "completed"
    assert busy.name not in results and f"skipped: run dir {busy} is in use by host" in proc.stderr
    assert (sweep / "aggregate.csv").is_file()
    errors = [line for line in _lines(single.stderr) if not line.startswith("[")]
    assert single.returncode == 2 and len(errors) == 1 and f"pid {os.getpid()} since" in errors[0], single.stderr


def test_damaged_adapter_reruns_and_damaged_checkpoint_is_moved_aside(tiny_data, tiny_bert, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = _cfg(*tiny_args(tiny_bert, "trainer.max_eval_samples=16"), out=out, data_dir=tiny_data)
    first = app.run(cfg)
    adapter = out / "adapter" / "adapter.safetensors"
    assert first["status"] == "completed"
    assert first["files"]["adapter/adapter.safetensors"]["size"] == adapter.stat().st_size
    whole = adapter.read_bytes()

    assert app.run(cfg)["started_at"] == first["started_at"], "a whole completed run is skipped"
    adapter.write_bytes(whole[:1000])
    with caplog.at_level("WARNING"):
        again = app.run(cfg)
    warned = [r.getMessage() for r in caplog.records if "adapter/adapter.safetensors" in r.getMessage()]
    assert len(warned) == 1 and "running the job again" in warned[0]
    assert again["status"] == "completed" and adapter.read_bytes() == whole, "resumed from the last checkpoint"

    caplog.clear()
    checkpoint = next((out / "checkpoints").glob("step-*"))
    for f in checkpoint.iterdir():
        f.write_bytes(f.read_bytes()[:50])
    (out / RESULT).unlink()
    with caplog.at_level("WARNING"):
        third = app.run(cfg)
    warned = [r.getMessage() for r in caplog.records if "does not load" in r.getMessage()]
    assert len(warned) == 1 and "resuming from step 0" in warned[0], caplog.text
    assert third["status"] == "completed" and third["resumed_from_step"] is None
    assert (out / "checkpoints" / f"damaged-{checkpoint.name}").is_dir()
    assert third["final"] == first["final"], "from step 0 again: the same numbers as the first run"
    assert len(json.loads((out / "attempts.json").read_text())) == 3 and read_result(out)["attempts"] == 1


# ---- configuration checks -------------------------------------------------------------------------------

def test_layers_out_of_range_names_the_models_layer_range(tiny_bert, tiny_data, tmp_path):
    from lowrank.runner import models

    cfg = validate(_cfg(*tiny_args(tiny_bert, "layers=[0,99]"), out=tmp_path, data_dir=tiny_data))
    with pytest.raises(ConfigError) as e:
        app.check_targets(cfg, models.load_config(cfg.model, cfg.task))
    message = str(e.value)
    assert "layers 0..1 (2 layers), so 99 is out of range; fix:" in message and len(message) < 250
