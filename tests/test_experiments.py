"""Recipes: listed, rejected by name with a fix, and one run end to end on a smoke budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]


def _experiments(*args, **kw):
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def test_every_paper_artefact_has_a_recipe_with_a_preset():
    assert {"lora_fig3", "lora_fig4", "lora_fig6_7", "lora_fig8", "lora_table5", "lora_table6", "lora_table7",
            "dora_fig2", "flora_params"} <= set(RECIPES)
    presets = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    for recipe in RECIPES.values():
        for sweep in recipe.sweeps:
            named = [a.split("=", 1)[1] for a in sweep if a.startswith("experiment=")]
            assert all(n in presets for n in named), (recipe.name, named)
    listing = _experiments("--list").stdout
    assert all(name in listing for name in RECIPES)


def test_unknown_recipe_is_one_line_error():
    done = _experiments("lora_fig99")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unknown recipe 'lora_fig99'" in done.stderr


@pytest.mark.integration
def test_flora_recipe_end_to_end_on_smoke_budget(tmp_path):
    done = _experiments("flora_params", "--dir", str(tmp_path), "trainer=smoke", "logger=none", timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report_flora_params.json").read_text())
    conv = [c for c in report["checks"] if "Conv2d" in c["what"] and "loralib" in c["what"]][0]
    assert conv["holds"] is True and "28,684" in conv["ours"]  # FLoRA's Tucker parameter count (arXiv 2405.14739 §3), counted from modules
    assert len([c for c in report["checks"] if "accuracy" in c["what"]]) == 2
    # a second call reuses the finished sweep instead of training again
    again = _experiments("flora_params", "--dir", str(tmp_path), "trainer=smoke", "logger=none", timeout=900)
    assert again.returncode == 0 and "already completed" in (again.stdout + again.stderr)


def test_extra_run_directory_with_equals_sign_reaches_hydra(tmp_path):
    from experiments.__main__ import run_dir_override

    target = tmp_path / "dora_fig2" / "adapter=full"
    done = subprocess.run([sys.executable, "run.py", "--cfg", "hydra", "-p", "hydra.run.dir",
                           run_dir_override(target)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(target) in done.stdout
