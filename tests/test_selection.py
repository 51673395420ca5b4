"""Which adapters have a weight update ΔW = W − W0 (the registry's ``has_delta``), and the ΔW the weight
analyses read for the methods without low-rank factors: (IA)³ (ΔW = (diag(l) − I)·W0, arXiv 2205.05638
§3.3) and the block-wise top/gradual (ΔW = trained block weight − initial one). Run directories are written
the way the runner writes them (``lowrank.save_adapter``, ``checkpoints.save_weights`` of
``app.weight_modules``) for a tiny BERT, with the trained values set by hand; every number is checked
against a float64 formula on the raw base weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lowrank = pytest.importorskip("lowrank")

from analysis.cli import main  # noqa: E402
from lowrank.adapters import ADAPTERS  # noqa: E402

from test_analysis_cli import _config, _tiny_model_dir  # noqa: E402

STEPS = (0, 10, 20, 30)


def _bert(hidden=16, layers=2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2))


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_has_delta_is_whether_training_changes_the_target_weights(name):
    """Reference: perturb every trainable tensor, fold the adapter into the base weights and see whether any
    target weight matrix moved from W0 (a bottleneck adapter cannot be folded: it is no ΔW)."""
    from lowrank.targeting import resolve

    model = _bert()
    targets = [t.name for t in resolve(model, list(ADAPTERS[name].default_targets), None)]
    w0 = {t: model.get_submodule(t).weight.detach().clone() for t in targets}
    lowrank.adapt(model, name, rank=2, **({"k": 1} if name == "top" else {}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    try:
        lowrank.merge_and_unload(model)
    except ValueError as e:
        assert "not a ΔW" in str(e)
        moved = False
    else:
        moved = any(not torch.equal(model.get_submodule(t).weight, w0[t]) for t in targets)
    assert ADAPTERS[name].has_delta is moved


def test_selection_has_no_rule_of_its_own():
    from analysis import selection

    assert not hasattr(selection, "has_delta")
    for name, spec in ADAPTERS.items():
        runs = [type("Info", (), {"adapter": name})()]
        if spec.has_delta:
            assert selection.with_delta(runs) == runs
        else:
            with pytest.raises(selection.UsageError, match=f"adapter {name} .* has no weight update"):
                selection.with_delta(runs)


# ---- run directories ---------------------------------------------------------------------------------

def _w0(model_dir: Path, module: str) -> np.ndarray:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))[f"{module}.weight"].double().numpy()


def _write(root: Path, model_dir: Path, adapter: str, targets, set_step, options=None) -> Path:
    """A finished run: ``set_step(model, t)`` puts the trained tensors at fraction t of training; the trajectory
    holds what the runner saves (``weight_modules``) at every step of STEPS, the adapter the final state."""
    from omegaconf import OmegaConf
    from transformers import BertForSequenceClassification

    from lowrank.runner.app import weight_modules
    from lowrank.runner.checkpoints import save_weights

    run = root / f"adapter={adapter},seed=0"
    model = lowrank.adapt(BertForSequenceClassification.from_pretrained(model_dir), adapter, targets=targets,
                          **(options or {}))
    cfg = OmegaConf.create({"targets": targets, "layers": None, "trainer": {
        "save_weights_at": list(STEPS), "save_weights_every": 0, "save_weights_at_fractions": []}})
    names = weight_modules(model, cfg)
    for step in STEPS:
        with torch.no_grad():
            set_step(model, step / STEPS[-1])
        save_weights(model, names, run / "checkpoints", step)
    lowrank.save_adapter(model, run / "adapter")
    config = _config(model_dir, adapter, 8, 0)
    config["targets"] = list(targets)
    config["adapter"]["options"] = dict(options or {})
    (run / "result.json").write_text(json.dumps({"status": "completed", "config": config,
                                                 "final": {"eval/accuracy": 0.5}, "best": {}}))
    return run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny_model_dir(tmp_path_factory.mktemp("selection"))


@pytest.fixture(scope="module")
def ia3_run(model_dir, tmp_path_factory):
    """(IA)³ on k, v (output rows rescaled) and down (input columns rescaled), final vectors l set by hand."""
    g = torch.Generator().manual_seed(3)
    final = {}

    def set_step(model, t):
        for name, layer in lowrank.adapted_modules(model).items():
            if name not in final:
                final[name] = 1.0 + 0.3 * torch.randn(layer.ia3_scale.shape, generator=g)
            layer.ia3_scale.copy_(1.0 + t * (final[name] - 1.0))

    run = _write(tmp_path_factory.mktemp("ia3"), model_dir, "ia3", ["k", "v", "down"], set_step)
    return run, {m: l.double().numpy() for m, l in final.items()}


@pytest.fixture(scope="module", params=["top", "gradual"])
def block_run(request, model_dir, tmp_path_factory):
    """The top block trained (top k=1, or gradual unfreezing of one block): W_t = W0 + t·D + (t − t²)·E."""
    g = torch.Generator().manual_seed(5)
    start, D, E = {}, {}, {}

    def set_step(model, t):
        for name, p in model.named_parameters():
            if p.requires_grad and ".encoder.layer." in name:
                if name not in start:
                    start[name] = p.detach().clone()
                    D[name] = 0.05 * torch.randn(p.shape, generator=g)
                    E[name] = 0.05 * torch.randn(p.shape, generator=g)
                p.copy_(start[name] + t * D[name] + (t - t * t) * E[name])

    options = {"k": 1} if request.param == "top" else {"k": 1, "every": 1}
    run = _write(tmp_path_factory.mktemp(request.param), model_dir, request.param, ["q", "v"], set_step, options)
    trained = {n.removesuffix(".weight"): (start[n] + D[n]).double().numpy() for n in start if n.endswith(".weight")}
    return request.param, run, trained


def _ia3_delta(model_dir, module, l):
    W0 = _w0(model_dir, module)
    return W0 * (l - 1)[None, :] if module.endswith("output.dense") and "attention" not in module \
        else (l - 1)[:, None] * W0


def test_ia3_delta_is_diag_l_minus_identity_times_w0(model_dir, ia3_run):
    from analysis.commands.spectrum import final_deltas
    from analysis.inputs import load_runs

    run, final = ia3_run
    info = load_runs([run])[0]
    deltas = final_deltas(info)
    assert sorted(deltas) == sorted(final) and len(final) == 9  # k, v, down × 3 layers
    for module, l in final.items():
        np.testing.assert_allclose(deltas[module].double().numpy(), _ia3_delta(model_dir, module, l), rtol=0,
                                   atol=1e-6)
    # the last saved weights are diag(l)·W0 (W0·diag(l) for down): the same ΔW through the trajectory
    last = info.run.deltas(step=STEPS[-1])
    for module, l in final.items():
        np.testing.assert_allclose(last[module].double().numpy(), _ia3_delta(model_dir, module, l), rtol=0, atol=1e-6)


def test_ia3_spectrum_and_amplification_read_that_delta(model_dir, ia3_run, tmp_path):
    run, final = ia3_run
    assert main(["spectrum", str(run), "--out", str(tmp_path), "--wandb", "off", "--matrices", "k", "v",
                 "--top", "1", "2"]) == 0
    rows = pd.read_csv(tmp_path / "spectrum" / "spectrum_per_module.csv").set_index("module")
    assert len(rows) == 6
    for module, row in rows.iterrows():
        s = np.linalg.svd(_ia3_delta(model_dir, module, final[module]), compute_uv=False)
        assert row["norm"] == pytest.approx(np.sqrt((s ** 2).sum()), rel=1e-5)
        assert row["energy_top2"] == pytest.approx((s[:2] ** 2).sum() / (s ** 2).sum(), rel=1e-5)

    assert main(["amplification", str(run), "--out", str(tmp_path), "--wandb", "off", "--ranks", "2",
                 "--matrices", "v", "--layer", "1"]) == 0
    got = json.loads((tmp_path / "amplification" / "summary.json").read_text())["at_layer"]["r=2"]
    module = "bert.encoder.layer.1.attention.self.value"
    W0, dW = _w0(model_dir, module), _ia3_delta(model_dir, module, final[module])
    U, s, Vh = np.linalg.svd(dW)
    delta = np.linalg.norm(U[:, :2].T @ W0 @ Vh[:2].T)  # LoRA §7.3: ‖UᵀWVᵀ‖_F, U, V top-2 of ΔW
    assert got["delta"] == pytest.approx(delta, rel=1e-5)
    assert got["own"] == pytest.approx(np.sqrt((np.linalg.svd(W0, compute_uv=False)[:2] ** 2).sum()), rel=1e-6)
    assert got["norm_delta"] == pytest.approx(np.linalg.norm(dW), rel=1e-5)
    assert got["factor"] == pytest.approx(np.linalg.norm(dW) / delta, rel=1e-5)


def _dm_dd(W0, W):
    """DoRA eqs. 3-4 over the output rows, float64."""
    m0, m = np.linalg.norm(W0, axis=1), np.linalg.norm(W, axis=1)
    return np.mean(np.abs(m - m0)), np.mean(1 - (W * W0).sum(1) / (m * m0))


def test_block_methods_delta_is_trained_minus_initial_weight(model_dir, block_run, tmp_path):
    from analysis.commands.spectrum import final_deltas
    from analysis.inputs import load_runs

    adapter, run, trained = block_run
    top = [f"bert.encoder.layer.2.attention.self.{m}" for m in ("query", "value")]
    deltas = final_deltas(load_runs([run])[0])
    assert sorted(deltas) == top  # the adapter file holds the trained block only
    for module in top:
        np.testing.assert_allclose(deltas[module].double().numpy(), trained[module] - _w0(model_dir, module),
                                   rtol=0, atol=1e-6)
    assert main(["spectrum", str(run), "--out", str(tmp_path), "--wandb", "off", "--top", "1"]) == 0
    rows = pd.read_csv(tmp_path / "spectrum" / "spectrum_per_module.csv").set_index("module")
    assert sorted(rows.index) == top
    for module in top:
        dW = trained[module] - _w0(model_dir, module)
        assert rows.loc[module, "norm"] == pytest.approx(np.linalg.norm(dW), rel=1e-5)
    # DoRA Figure 2 over the trajectory: the frozen blocks (W = W0 throughout) are left out
    assert main(["decomposition", str(run), "--out", str(tmp_path), "--wandb", "off", "--bootstrap", "0"]) == 0
    pts = pd.read_csv(tmp_path / "decomposition" / "dora_fig2_q_points.csv")
    assert set(pts["layer"]) == {2} and sorted(pts["step"]) == [10, 20, 30]
    assert set(pts["method"]) == {ADAPTERS[adapter].label}
    from safetensors.torch import load_file

    module = top[0]
    for _, p in pts.iterrows():
        W = load_file(str(run / "checkpoints" / f"weights-step{p['step']}.safetensors"))[module].double().numpy()
        dM, dD = _dm_dd(_w0(model_dir, module), W)
        assert p["dM"] == pytest.approx(dM, rel=1e-6) and p["dD"] == pytest.approx(dD, rel=1e-6, abs=1e-12)
    final = load_file(str(run / "checkpoints" / f"weights-step{STEPS[-1]}.safetensors"))[module].double().numpy()
    np.testing.assert_allclose(final, trained[module], rtol=0, atol=1e-6)  # the last point is the trained weight
    assert main(["amplification", str(run), "--out", str(tmp_path), "--wandb", "off", "--ranks", "1", "4"]) == 0
    s = json.loads((tmp_path / "amplification" / "summary.json").read_text())
    assert s["layer"] == 2 and set(s["at_layer"]) == {"r=1", "r=4"}


def test_factor_analyses_refuse_delta_only_methods_in_one_line(ia3_run, block_run, tmp_path, capsys):
    run, _ = ia3_run
    adapter, block, _ = block_run
    for path, name in ((run, "ia3"), (block, adapter)):
        for analysis in ("subspace", "wsubspace"):
            assert main([analysis, str(path), "--out", str(tmp_path), "--wandb", "off"]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1
            assert f"adapter {name} ({ADAPTERS[name].label}) has no low-rank factors" in err
            assert "pass runs of lora, dora, flora" in err and "amplification, spectrum, decomposition" in err
    assert main(["amplification", str(run), "--out", str(tmp_path), "--wandb", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ia3 ((IA)³) has no rank: pass --ranks" in err
