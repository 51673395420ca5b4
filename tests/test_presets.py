"""Every Hydra preset (``conf/experiment/*``) runs: each one composes, every job of its sweep validates,
and its first job trains end to end on a tiny model for a few steps (``trainer=smoke``)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lowrank.runner import app, command
from lowrank.runner.config import CONF_DIR, choices

PRESETS = choices("experiment")


def test_presets_are_found():
    assert {"lora_fig3", "lora_table5", "lora_table6", "lora_table7", "dora_fig2", "lora_e2e"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs(preset, tiny_bert, tiny_llama, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_DATA_DIR", str(tiny_data))
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        base = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    sweep = {k: str(v).split(",")[0] for k, v in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items()}
    model = tiny_llama if base.task.kind == "generation" else tiny_bert
    overrides = [f"experiment={preset}", *(f"{k}={v}" for k, v in sweep.items()), "trainer=smoke", "logger=none",
                 f"model.pretrained={model}", "model.name=tiny", "model.gguf_file=null", "model.dtype=float32",
                 f"paths.data_dir={tiny_data}", "trainer.save_weights_at=[0,3,6]"]
    # every job of the preset's own sweep passes the command-line preflight, which adapts the model's skeleton
    # (built from config.json alone): a copy of the tiny model's config wide enough for the presets' ranks
    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=128, intermediate_size=256)
    (wide / "config.json").write_text(json.dumps(config))
    assert command.preflight(["-m", f"experiment={preset}", "trainer=smoke", "trainer.save_weights_at=[0,3,6]",
                          f"model.pretrained={wide}", "model.name=tiny", "model.gguf_file=null",
                          "model.dtype=float32"]) >= 1
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cfg.paths.output_dir = str(tmp_path / preset)
    result = app.run(cfg)
    assert result["status"] == "completed", result.get("error")
    assert result["config"]["name"] == base.name and result["steps"] == cfg.trainer.max_steps
    assert result["trainable_params"] > 0 and result["final"]
