"""The Hydra config: composition, the schema's validation, the translation to lowrank.adapt, and the
command line's one-line errors (exit code 2, no completed result written)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lowrank.runner.config import CONF_DIR, ConfigError, choices, validate
from lowrank.runner.app import adapt_kwargs, fingerprint
from lowrank.runner import command
from lowrank.runner.command import jobs_of, preflight

from conftest import run_cli, tiny_args


def composed(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    cfg.paths.output_dir = "/tmp/unused"
    return cfg


def test_defaults_are_the_documented_ones():
    cfg = validate(composed(), check_data=False)
    assert (cfg.model.name, cfg.task.name, cfg.adapter.name) == ("minilm", "sst2", "lora")
    assert (cfg.rank, cfg.alpha, list(cfg.targets), cfg.seed, cfg.layers) == (8, 8.0, ["q", "v"], 0, None)
    assert cfg.trainer.max_seq_len == 64 and cfg.trainer.batch_size == 32
    assert OmegaConf.select(cfg, "logger.name") == "wandb"


def test_alpha_is_fixed_across_ranks():
    """α does not follow r (LoRA §4.1): the scaling α/r halves when r doubles."""
    assert [adapt_kwargs(validate(composed(f"rank={r}"), check_data=False))["alpha"] for r in (4, 8, 64)] == [8.0] * 3


@pytest.mark.parametrize("group", ["model", "task", "adapter", "trainer", "logger", "experiment"])
def test_every_option_composes_and_validates(group):
    for option in choices(group):
        cfg = validate(composed(f"{group}={option}"), check_data=False)
        assert cfg is not None, option


def test_every_adapter_names_its_source():
    for option in choices("adapter"):
        cfg = composed(f"adapter={option}")
        assert cfg.adapter.name == option
        assert len(cfg.adapter.source) > 20, f"adapter/{option}.yaml must say where it comes from"


def test_adapt_kwargs_translation():
    kw = adapt_kwargs(validate(composed("adapter=dora", "rank=4", "alpha=16", "targets=[q,k,v,o]", "layers=[0,5]"),
                               check_data=False))
    assert kw == {"adapter": "dora", "targets": ["q", "k", "v", "o"], "rank": 4, "alpha": 16.0, "layers": [0, 5],
                  "dropout": 0.0, "dora_norm": "detached", "dora_fast": True}
    # FLoRA's scale=null means "the library's default": it is not passed at all
    assert "scale" not in adapt_kwargs(validate(composed("adapter=flora"), check_data=False))
    # a bare value is a one-element list
    assert adapt_kwargs(validate(composed("targets=q", "layers=3"), check_data=False))["targets"] == ["q"]


def test_fingerprint_ignores_where_and_how_a_run_is_logged():
    a = validate(composed(), check_data=False)
    b = validate(composed("logger=none", "paths.data_dir=/elsewhere", "trainer.progress=false"), check_data=False)
    c = validate(composed("rank=4"), check_data=False)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


@pytest.mark.parametrize("overrides, needle", [
    (["rank=four"], "rank='four'"),
    (["rank=0"], "rank=0"),
    (["alpha=-1"], "alpha=-1"),
    (["trainer.lr=abc"], "trainer.lr='abc'"),
    (["+trainer.typo=1"], "trainer.typo"),
    (["trainer.batch_size=10", "trainer.grad_accum=3"], "trainer.batch_size=10"),
    (["adapter=flora", "+adapter.options.rslora=true"], "rslora"),
    (["targets=[]"], "targets=[]"),
    (["trainer.weight_decay=-1"], "trainer.weight_decay=-1"),
    (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm=-1"),
    (["targets=[q,q]"], "names 'q' twice"),
    (["trainer.lr=0"], "trainer.lr=1e-3"),
])
def test_validation_errors_are_one_line_and_name_the_value(overrides, needle):
    from lowrank.runner.app import check

    with pytest.raises(ConfigError) as e:
        check(composed(*overrides))
    message = str(e.value)
    assert needle in message and "fix:" in message and "\n" not in message


def test_missing_data_dir_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"has no sst2/stsa.binary.train.txt.*LOWRANK_DATA_DIR"):
        validate(composed(f"paths.data_dir={tmp_path / 'nowhere'}"))


def test_sweep_expansion_includes_preset_params():
    jobs = jobs_of(["-m", "experiment=lora_fig3"])
    assert sorted((j[1], j[2]) for j in jobs) == sorted((f"rank={r}", f"seed={s}") for r in (8, 64) for s in (0, 1))
    assert len(jobs_of(["-m", "adapter=lora,dora", "rank=4,8,64"])) == 6
    # the command line wins over the preset's sweep
    assert {j[1] for j in jobs_of(["-m", "experiment=lora_fig3", "rank=4"])} == {"seed=0", "seed=1"}


def test_preflight_rejects_a_bad_value_in_a_later_job():
    with pytest.raises(ConfigError, match="rank='four'"):
        preflight(["-m", "rank=4,8,four"])
    with pytest.raises(ConfigError, match="adapter='loar' is unknown.*lora"):
        preflight(["-m", "adapter=lora,loar"])


def test_sweep_jobs_compose_as_hydra_composes_each_alone():
    # jobs sharing their config-group choices share one composition; each must equal Hydra's own compose
    argv = ["-m", "adapter=lora,dora", "rank=4,64", "trainer=smoke,default", "trainer.lr=0.01",
            "targets=[q,k]", "+trainer.extra=1", "~name", "model.dtype=float32", "experiment=lora_fig3",
            "hydra/launcher=parallel", "hydra.sweep.dir=/tmp/unused"]
    jobs = jobs_of(argv)
    assert len(jobs) == 2 * 2 * 2 * 2  # the preset sweeps rank and seed; the command line's rank wins
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        fast = [OmegaConf.to_container(cfg) for _, cfg in command.composed(jobs)]
        alone = [OmegaConf.to_container(compose("config", overrides=[o for o in job if not o.startswith("hydra")]))
                 for job in jobs]
    assert fast == alone
    assert {(c["adapter"]["name"], c["rank"], c["trainer"]["max_steps"]) for c in fast} == {
        (a, r, s) for a in ("lora", "dora") for r in (4, 64) for s in (6, 250)}


def test_preflight_names_an_unknown_key_in_one_line():
    for argv in (["-m", "adapter=lora,dora", "trainer=smoke,default", "trainer.nope=1"],
                 ["-m", "adapter=lora,dora", "trainer.nope=1,2"], ["trainer.nope=1"]):
        with pytest.raises(ConfigError, match="unknown config key 'trainer.nope'"):
            preflight(argv)


# ---- the command line, as a user types it --------------------------------------------------------------

def _check_cli_error(proc, needle: str, out_dir):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and needle in lines[0] and "fix:" in lines[0], lines[0]
    completed = [p for p in out_dir.rglob("result.json") if json.loads(p.read_text())["status"] == "completed"]
    assert not completed


@pytest.mark.parametrize("args, needle", [
    (["rank=four"], "rank='four'"),
    (["adapter=lorra"], "adapter='lorra' is unknown"),
    (["task=sst3"], "task='sst3' is unknown"),
    (["model=bert-huge"], "model='bert-huge' is unknown"),
    (["-m", "adapter=lora,dora", "rank=4,four"], "rank='four'"),
])
def test_cli_rejects_bad_names_and_types(args, needle, tmp_path, tiny_data):
    out = tmp_path / "out"
    dir_arg = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    proc = run_cli(*args, f"{dir_arg}={out}", "logger=none", data_dir=tiny_data, timeout=120)
    _check_cli_error(proc, needle, tmp_path)
    assert not out.exists(), "nothing may run before the whole command line is valid"


def test_cli_rejects_a_target_the_model_lacks(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "out"
    proc = run_cli(*tiny_args(tiny_bert, "targets=[q,gate]", f"hydra.run.dir={out}"), data_dir=tiny_data, timeout=120)
    _check_cli_error(proc, "'gate'", tmp_path)


def test_cli_rejects_a_missing_data_dir_offline(tmp_path):
    proc = run_cli("logger=none", f"hydra.run.dir={tmp_path / 'out'}", data_dir=tmp_path / "no-data", timeout=120)
    _check_cli_error(proc, str(tmp_path / "no-data"), tmp_path)
