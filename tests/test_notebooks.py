"""The notebooks run top to bottom against a small sweep, and their jupytext pairs are in sync."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """LoRA and DoRA at two ranks on MiniLM/SST-2, a few steps each, target weights kept at steps 0 and 6."""
    sweep = tmp_path_factory.mktemp("nb") / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline"}
    cmd = [sys.executable, "run.py", "-m", "adapter=lora,dora", "rank=2,4", "trainer=smoke", "logger=none",
           f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return sweep


def test_notebooks_exist_paired_and_stripped():
    assert {p.stem for p in NOTEBOOKS} >= {"sweep_overview", "subspace_explorer", "amplification", "dora_decomposition"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"
        paired = jupytext.read(path.with_suffix(".py"))
        code = lambda n: [c.source.strip() for c in n.cells if c.cell_type == "code"]  # noqa: E731
        assert code(paired) == code(nb), f"{path.name} and its .py pair differ: run `jupytext --sync`"


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_a_sweep(path, small_sweep, monkeypatch):
    monkeypatch.setenv("LOWRANK_SWEEP_DIR", str(small_sweep))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
