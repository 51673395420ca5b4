"""AdaLoRA (arXiv 2303.10512) and DoRA with AdaLoRA's allocation, against independent references: the budget
schedule and the importance scores against float64/rational evaluations of the paper's formulas, the masks and
the regulariser against the real ``peft`` (its RankAllocator driven by the same planted weights and gradients),
PEFT's AdaLoRA format both ways, and a resume through the runner's checkpoint code."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import lowrank
from lowrank.adapters.adalora import AdaDoRA, AdaLoRA, budget_schedule

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

QV = ["query", "value"]


def bert(seed=0, layers=2):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
        num_labels=2)).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=16)).eval()


def perturb(model, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# ---- the schedule and the importance against the paper's formulas ----------------------------------------------

def paper_budget(t, b0, bT, ti, tf, T) -> Fraction:
    """§3.3: b(0) during warm-up, b(T) + (b(0) − b(T))(1 − (t − t_i)/(T − t_i − t_f))³, then b(T); exact rationals."""
    if t <= ti:
        return Fraction(b0)
    if t > T - tf:
        return Fraction(bT)
    return bT + (b0 - bT) * (1 - Fraction(t - ti, T - ti - tf)) ** 3


@pytest.mark.parametrize("b0,bT,ti,tf,T", [(72, 48, 10, 20, 100), (18, 12, 0, 0, 37), (30, 6, 5, 3, 23)])
def test_budget_schedule_is_the_papers_cubic_truncated(b0, bT, ti, tf, T):
    budgets = []
    for t in range(1, T + 1):
        budget, mask = budget_schedule(t, b0, bT, ti, tf, T, delta_t=4)
        assert budget == math.floor(paper_budget(t, b0, bT, ti, tf, T)), t
        assert mask == (t > T - tf or (ti < t and t % 4 == 0))
        budgets.append(budget)
    assert budgets[0] <= b0 and budgets[-1] == bT and all(a >= b for a, b in zip(budgets, budgets[1:]))


def test_importance_is_smoothed_sensitivity_times_uncertainty_in_float64():
    torch.manual_seed(0)
    layer = AdaLoRA(torch.nn.Linear(7, 5), rank=4, alpha=4.0, target_rank=2)
    allocator = lowrank.adapters.adalora.RankAllocator({"m": layer}, {"beta1": 0.7, "beta2": 0.6}, 10, None)
    g = torch.Generator().manual_seed(5)
    ref_bar = {n: 0.0 for n in ("lora_P", "lora_E", "lora_Q")}
    ref_unc = dict(ref_bar)
    for _ in range(4):
        for name in ref_bar:
            p = getattr(layer, name)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
            p.grad = torch.randn(p.shape, generator=g)
            sens = np.abs(p.detach().double().numpy() * p.grad.double().numpy())        # I = |w ∂L/∂w|
            ref_bar[name] = 0.7 * ref_bar[name] + 0.3 * sens                           # Ī
            ref_unc[name] = 0.6 * ref_unc[name] + 0.4 * np.abs(sens - ref_bar[name])   # Ū
        allocator.update_importance()
    s = {n: ref_bar[n] * ref_unc[n] for n in ref_bar}
    expected = s["lora_E"][:, 0] + s["lora_P"].mean(axis=0) + s["lora_Q"].mean(axis=1)  # S_i of the triplet
    np.testing.assert_allclose(allocator.triplet_scores()["m"].double().numpy(), expected, rtol=1e-5)


# ---- against PEFT: masks, regulariser, format ------------------------------------------------------------------

def paired(init_r=6, target_r=3, **schedule):
    """A PEFT AdaLoRA model and a lowrank one on the same base with the same factors."""
    cfg = peft.AdaLoraConfig(target_modules=QV, init_r=init_r, target_r=target_r, lora_alpha=8, **schedule)
    theirs = peft.get_peft_model(bert(), cfg)
    ours = lowrank.adapt(bert(), "adalora", targets=QV, rank=target_r, alpha=8, init_r=init_r,
                         **{k: v for k, v in schedule.items() if k != "total_step"})
    perturb(theirs, seed=2, scale=0.05)
    with torch.no_grad():
        for name, layer in lowrank.adapted_modules(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            layer.lora_Q.copy_(peft_layer.lora_A["default"])
            layer.lora_E.copy_(peft_layer.lora_E["default"])
            layer.lora_P.copy_(peft_layer.lora_B["default"])
    return ours, theirs


def test_masks_equal_peft_rank_allocator_on_planted_sensitivities():
    total = 14
    ours, theirs = paired(tinit=2, tfinal=4, deltaT=2, total_step=total, beta1=0.8, beta2=0.7)
    hooks = lowrank.training_hooks(ours, total_steps=total)
    peft_layers = {n: theirs.base_model.model.get_submodule(n) for n in lowrank.adapted_modules(ours)}
    g = torch.Generator().manual_seed(9)
    loud = "bert.encoder.layer.1.attention.self.value"  # planted: 20× the gradients of the others
    for step in range(1, total + 1):
        for name, layer in lowrank.adapted_modules(ours).items():
            for ours_name, peft_name in (("lora_Q", "lora_A"), ("lora_E", "lora_E"), ("lora_P", "lora_B")):
                p, q = getattr(layer, ours_name), getattr(peft_layers[name], peft_name)["default"]
                delta = torch.randn(p.shape, generator=g) * 0.01
                grad = torch.randn(p.shape, generator=g) * (20.0 if name == loud else 1.0)
                with torch.no_grad():
                    p.add_(delta)
                    q.add_(delta)
                p.grad, q.grad = grad.clone(), grad.clone()
        hooks.after_step(step)
        theirs.base_model.update_and_allocate(step)
        pattern = theirs.peft_config["default"].rank_pattern
        for name, layer in lowrank.adapted_modules(ours).items():
            torch.testing.assert_close(layer.lora_E, peft_layers[name].lora_E["default"], rtol=0, atol=0)
            if pattern:
                key = next(k for k in pattern if k.startswith(name + ".lora_E"))
                assert layer.rank_mask.tolist() == list(pattern[key]), (step, name)
    ranks = hooks.ranks()
    assert sum(ranks.values()) == 3 * 4 and ranks[loud] == 6, ranks   # the budget b(T); the loud module keeps all


def test_orthogonality_regulariser_equals_peft_and_the_papers_form():
    ours, theirs = paired(total_step=10)
    x, y = torch.randint(0, 64, (2, 6)), torch.tensor([0, 1])
    with torch.no_grad():
        with_reg = theirs.base_model(input_ids=x, labels=y).loss   # AdaLoraModel.forward adds the regulariser
        plain = theirs.base_model.model(input_ids=x, labels=y).loss   # same adapted forward, no regulariser
    torch.testing.assert_close(lowrank.training_hooks(ours, 10).penalty().detach(), with_reg - plain,
                               rtol=1e-5, atol=1e-7)
    paper = lowrank.adapters.adalora.hooks(ours, {"orth_reg": "paper", "orth_reg_weight": 0.3}, 10, None).penalty()
    expected = 0.0
    for layer in lowrank.adapted_modules(ours).values():
        P, Q = layer.lora_P.detach().double().numpy(), layer.lora_Q.detach().double().numpy()
        expected += ((P.T @ P - np.eye(P.shape[1])) ** 2).sum() + ((Q @ Q.T - np.eye(Q.shape[0])) ** 2).sum()
    assert paper.item() == pytest.approx(0.3 * expected, rel=1e-5)


@pytest.mark.parametrize("make,targets", [(bert, ["q", "v"]), (gpt2, ["c_attn"])])
def test_save_peft_loads_in_peft_with_equal_logits(tmp_path, make, targets):
    ours = lowrank.adapt(make(), "adalora", targets=targets, rank=8 if make is bert else 4)
    perturb(ours)
    layers = lowrank.adapted_modules(ours)
    x = torch.randint(0, 64, (2, 7))
    lowrank.save_peft(ours, tmp_path / "full")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "full").eval()
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits(ours, x), logits(make(), x), atol=1e-4)   # the update is not zero
    # an allocation: masked triplets are left out of the file and named in rank_pattern
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.rank_mask[i % layer.rank::3] = False
            layer.lora_E[~layer.rank_mask] = 0.0
    lowrank.save_peft(ours, tmp_path / "masked")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "masked").eval()
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), rtol=1e-5, atol=1e-6)
    name, layer = next(iter(layers.items()))
    assert theirs.base_model.model.get_submodule(name).lora_A["default"].shape[0] == layer.allocated_rank() < layer.rank


def test_load_peft_reads_a_peft_adalora_adapter_with_its_rank_pattern(tmp_path):
    cfg = peft.AdaLoraConfig(target_modules=QV, init_r=5, target_r=2, lora_alpha=6, total_step=10,
                             task_type="SEQ_CLS")
    theirs = peft.get_peft_model(bert(), cfg)
    perturb(theirs)
    pattern = {}
    for name, module in theirs.base_model.model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            keep = [True, False, True, len(pattern) % 2 == 0, False]
            with torch.no_grad():
                module.lora_E["default"][~torch.tensor(keep)] = 0.0
            pattern[f"{name}.lora_E.default"] = keep
    theirs.peft_config["default"].rank_pattern = pattern
    theirs.save_pretrained(tmp_path)
    x = torch.randint(0, 64, (3, 5))
    ours = lowrank.load_peft(bert(), tmp_path)
    torch.testing.assert_close(logits(ours, x), logits(theirs.eval(), x), rtol=1e-5, atol=1e-6)
    assert sorted(lowrank.training_hooks(ours).ranks().values()) == [2, 2, 3, 3]


# ---- DoRA with AdaLoRA's allocation -----------------------------------------------------------------------------

def test_dora_allocate_adalora_is_doras_formula_on_the_svd_form_update():
    torch.manual_seed(0)
    model = lowrank.adapt(bert(), "dora", targets=["q"], rank=2, alpha=4, allocate="adalora", init_r=4)
    perturb(model)
    layer = next(iter(lowrank.adapted_modules(model).values()))
    assert isinstance(layer, AdaDoRA)
    W0 = layer.base.weight.detach().double()
    P, E, Q = (getattr(layer, n).detach().double() for n in ("lora_P", "lora_E", "lora_Q"))
    V = W0 + 4 / (4 + 1e-5) * P @ torch.diag(E[:, 0]) @ Q                     # W0 + s P Λ Q
    expected = layer.magnitude.detach().double()[:, None] * V / V.norm(dim=1, keepdim=True) - W0
    torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x).double(), x.double() @ (W0 + expected).T + layer.base.bias.double(),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="allocate=adalora"):
        lowrank.save_peft(model, "unused")
    with pytest.raises(ValueError, match="allocate='svd'"):
        lowrank.adapt(bert(), "dora", targets=["q"], rank=2, allocate="svd")


# ---- resume -------------------------------------------------------------------------------------------------------

def test_a_resumed_run_continues_with_the_same_importance_and_masks(tmp_path):
    """Train 8 steps straight, and 4 steps + checkpoint (runner's checkpoint code) + a fresh process's model +
    4 steps: identical factors, masks and scores."""
    from lowrank.runner.checkpoints import load_checkpoint, save_checkpoint

    total, x, y = 8, torch.randint(0, 64, (4, 6)), torch.tensor([0, 1, 1, 0])
    options = dict(targets=QV, rank=2, init_r=4, tinit=1, tfinal=2, deltaT=1)

    def setup():
        model = lowrank.adapt(bert(), "adalora", **options).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), lowrank.training_hooks(model, total)

    def train(model, opt, sched, hooks, steps):
        for step in steps:
            (model(input_ids=x, labels=y).loss + hooks.penalty()).backward()
            opt.step()
            hooks.after_step(step)
            sched.step()
            opt.zero_grad()

    straight = setup()
    train(*straight, range(1, total + 1))
    first = setup()
    train(*first, range(1, 5))
    save_checkpoint(tmp_path, first[0], first[1], first[2], {"step": 4})
    resumed = setup()
    load_checkpoint(tmp_path / "step-4", resumed[0], resumed[1], resumed[2], torch.device("cpu"))
    train(*resumed, range(5, total + 1))
    for (name, a), b in zip(lowrank.adapted_modules(straight[0]).items(), lowrank.adapted_modules(resumed[0]).values()):
        for key in ("lora_Q", "lora_E", "lora_P", "rank_mask", "sensitivity_lora_E", "uncertainty_lora_Q"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (name, key)
    assert straight[3].ranks() == resumed[3].ranks() and sum(straight[3].ranks().values()) == 2 * 4


# ---- through the runner and the analysis ---------------------------------------------------------------------

def test_sweep_records_final_ranks_and_the_ranks_analysis_draws_them(tiny_bert, tiny_data, tmp_path):
    import json

    from conftest import run_cli, tiny_args

    from analysis.cli import main
    from analysis.commands.ranks import grid

    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "adapter=adalora,full", "rank=2", "trainer.max_steps=8",
                   *tiny_args(tiny_bert), f"hydra.sweep.dir={sweep}", data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next(p for p in sweep.iterdir() if p.name.startswith("adapter=adalora"))
    result = json.loads((run / "result.json").read_text())
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    ranks = result["allocated_ranks"]
    assert ranks == config["allocated_ranks"] and set(ranks) == set(config["modules"])
    assert sum(ranks.values()) == 2 * len(ranks)          # b(T) = target rank × modules
    from lowrank.runner.results import load_run
    from safetensors.torch import load_file

    tensors = load_file(str(run / "adapter" / "adapter.safetensors"))
    for module, delta in load_run(run).deltas().items():       # the results API's ΔW: s·P diag(λ) Q in float64
        P, E, Q = (tensors[f"{module}.lora_{n}"].double() for n in "PEQ")
        expected = config["scaling"][module] * P @ torch.diag(E[:, 0]) @ Q
        torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-7)
        assert torch.linalg.matrix_rank(expected).item() <= ranks[module]
    assert main(["ranks", str(sweep), "--wandb", "off", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "ranks" / "summary.json").read_text())
    assert summary["total"]["AdaLoRA r=2: final rank"] == 2 * len(ranks)
    assert (tmp_path / "out" / "ranks" / "ranks.png").stat().st_size > 0
    # the grid puts each module in its (matrix, layer) cell
    kinds, layers, values = grid({"bert.encoder.layer.1.attention.self.value": 3,
                                  "bert.encoder.layer.0.attention.self.query": 5})
    assert kinds == ["q", "v"] and layers == [0, 1]
    np.testing.assert_array_equal(values, [[5, np.nan], [np.nan, 3]])


@pytest.mark.parametrize("options, needle", [({"init": "pissa"}, "init='pissa' does not apply"),
                                             ({"rslora": True}, "rslora=True does not apply")])
def test_dora_with_allocation_refuses_options_it_would_drop(options, needle):
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    with pytest.raises(ValueError, match=needle) as e:
        lowrank.adapt(model, "dora", targets=["q"], rank=2, allocate="adalora", **options)
    assert "\n" not in str(e.value) and not lowrank.adapted_modules(model)


def test_adapter_allocate_is_doras_option_and_refused_elsewhere():
    from test_config import composed

    from lowrank.runner.config import ConfigError, validate

    cfg = validate(composed("adapter=dora", "adapter.allocate=adalora"), check_data=False)
    assert cfg.adapter.options.allocate == "adalora"
    with pytest.raises(ConfigError, match="adapter.allocate='adalora' is an option of dora, not of lora"):
        validate(composed("adapter=lora", "+adapter.allocate=adalora"), check_data=False)
