"""Intruder dimensions (arXiv 2410.21228) against planted matrices and PEFT's own implementation
(``peft.tuners.lora.intruders.reduce_intruder_dimension``) on the same weights."""

from __future__ import annotations

import pytest
import torch

from analysis.intruders import find, mitigate


def _orthonormal(n, k, g):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


def _planted(g, big=100.0):
    """W0 (20×12, full rank, σ in [1, 3]) and y, a unit vector orthogonal to all of W0's left singular vectors."""
    basis = _orthonormal(20, 13, g)
    u0, y = basis[:, :12], basis[:, 12]
    v0 = _orthonormal(12, 12, g)
    w0 = u0 @ torch.diag(torch.linspace(3, 1, 12, dtype=torch.float64)) @ v0.T
    z = torch.nn.functional.normalize(torch.randn(12, generator=g, dtype=torch.float64), dim=0)
    return w0, u0, y, z


def test_a_planted_orthogonal_direction_is_the_one_intruder():
    g = torch.Generator().manual_seed(0)
    w0, u0, y, z = _planted(g)
    found = find(w0, 100.0 * torch.outer(y, z), k=10, epsilon=0.5)
    assert found.indices == [0] and found.max_cos[0] < 0.1
    # the same energy along W0's own top direction intrudes nowhere
    assert find(w0, 100.0 * torch.outer(u0[:, 0], z), k=10, epsilon=0.5).count == 0
    # a small update leaves W0's singular vectors in place: nothing intrudes
    assert find(w0, 1e-3 * torch.outer(y, z), k=10, epsilon=0.5).count == 0
    assert found.count_at(0.01) == 0 and found.count_at(0.99) >= 1


def test_mitigation_scales_the_intruders_singular_value_by_lambda():
    g = torch.Generator().manual_seed(1)
    w0, _, y, z = _planted(g)
    delta = 100.0 * torch.outer(y, z)
    found = find(w0, delta, k=10)
    s = torch.linalg.svdvals(w0 + delta)
    s_new = torch.linalg.svdvals(w0 + mitigate(w0, delta, found.indices, 0.25))
    expected = torch.sort(torch.cat([s[:1] * 0.25, s[1:]]), descending=True).values
    torch.testing.assert_close(s_new, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mitigate(w0, delta, [], 0.25), delta, rtol=0, atol=1e-12)


def test_counts_and_mitigated_update_equal_peft():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    g = torch.Generator().manual_seed(2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(12, 20, bias=False), torch.nn.Linear(12, 20, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    net = Net()
    w0, _, y, z = _planted(g)
    with torch.no_grad():
        net.a.weight.copy_(w0)
        net.b.weight.copy_(torch.randn(20, 12, generator=g, dtype=torch.float64))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"]))
    with torch.no_grad():
        la, lb = model.base_model.model.a, model.base_model.model.b
        la.lora_B["default"].weight.copy_(torch.stack([y, y], 1) * 5)     # s·BA = 100 y zᵀ: an intruder
        la.lora_A["default"].weight.copy_(torch.stack([z, z]) * 5)
        lb.lora_B["default"].weight.copy_(torch.randn(20, 2, generator=g) * 1e-3)   # a tiny update: none
        lb.lora_A["default"].weight.copy_(torch.randn(2, 12, generator=g) * 1e-3)
    ours = {}
    for name, layer in (("a", la), ("b", lb)):
        w, d = layer.get_base_layer().weight.detach().double(), layer.get_delta_weight("default").detach().double()
        ours[name] = (w, d, find(w, d, k=10, epsilon=0.5))
    lines = []
    reduce_intruder_dimension(model, top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75, logging_sink=lines.append)
    assert any(line.endswith("a: Intruders: 1") for line in lines) and ours["a"][2].count == 1
    assert any(line.endswith("b: No intruders") for line in lines) and ours["b"][2].count == 0
    w, d, found = ours["a"]
    theirs = la.get_delta_weight("intruder_reduced").double()
    u, s, vh = torch.linalg.svd(mitigate(w, d, found.indices, 0.75))    # PEFT keeps the rank-r part
    torch.testing.assert_close(theirs, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-5, atol=1e-5)


def test_cli_counts_are_the_maths_on_each_run(tmp_path):
    """`python -m analysis intruders` on synthetic run directories (the analysis CLI's own fixture): per-module
    counts equal ``find`` on the same W0 and ΔW, and the figure and summary are written."""
    import json

    from analysis.cli import main
    from analysis.commands.spectrum import final_deltas
    from analysis.inputs import describe
    from lowrank.runner.results import load_run
    from test_analysis_cli import _tiny_model_dir, _write_run

    model_dir = _tiny_model_dir(tmp_path)
    sweep = tmp_path / "sweep"
    runs = [_write_run(sweep, model_dir, "lora", 4, 0, 0.8), _write_run(sweep, model_dir, "full", 4, 0, 0.9)]
    assert main(["intruders", str(sweep), "--out", str(tmp_path / "out"), "--wandb", "off", "--no-evaluate",
                 "-k", "6", "--epsilon", "0.6"]) == 0
    summary = json.loads((tmp_path / "out" / "intruders" / "summary.json").read_text())
    for run, label in zip(runs, ("LoRA r=4", "FT")):
        r = load_run(run)
        base = r.base_weights()
        deltas = final_deltas(describe(r))
        expected = sum(find(base[m], d, k=6, epsilon=0.6).count for m, d in deltas.items())
        assert summary["total"][label] == expected
    assert (tmp_path / "out" / "intruders" / "intruders.png").is_file()
