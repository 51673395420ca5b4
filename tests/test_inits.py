"""PiSSA / MiLoRA / OLoRA initialisations (``init``) against the real ``peft`` (init_lora_weights="pissa"/"olora" on
the same weights), float64 SVD formulas (MiLoRA), and ΔW measured against the original W0 through every reader."""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank
from lowrank.runner.checkpoints import target_weights

peft = pytest.importorskip("peft")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


IDS = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(5))


def _perturb(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _peft(init, dora=False):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=init,
                          use_dora=dora, modules_to_save=["classifier"])
    return peft.get_peft_model(_bert(), cfg).eval()


@pytest.mark.parametrize("init,dora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_same_residual_and_outputs_as_peft(init, dora):
    ours = lowrank.adapt(_bert(), "dora" if dora else "lora", targets=["q", "v"], rank=4, alpha=8, init=init)
    theirs = _peft(init, dora)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in lowrank.adapted_modules(ours).items():
        p = peft_layers[name]
        torch.testing.assert_close(layer.base.weight, p.base_layer.weight, rtol=0, atol=2e-5)   # the residual
        s = layer.scaling
        torch.testing.assert_close(s * layer.lora_B @ layer.lora_A, s * p.lora_B["default"].weight @
                                   p.lora_A["default"].weight, rtol=0, atol=2e-5)
        if dora:
            torch.testing.assert_close(layer.magnitude, p.lora_magnitude_vector["default"].weight, rtol=0, atol=1e-5)
    _perturb(ours)
    for name, layer in lowrank.adapted_modules(ours).items():
        p = peft_layers[name]
        with torch.no_grad():
            p.lora_A["default"].weight.copy_(layer.lora_A)
            p.lora_B["default"].weight.copy_(layer.lora_B)
            if dora:
                p.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_dora_pissa_magnitude_is_the_pretrained_norm():
    w0 = _bert().bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    ours = lowrank.adapt(_bert(), "dora", targets=["q"], rank=4, init="pissa")
    layer = ours.bert.encoder.layer[0].attention.self.query
    torch.testing.assert_close(layer.magnitude.detach(), w0.norm(dim=1), rtol=0, atol=1e-5)


def test_milora_takes_the_bottom_singular_triplets():
    w0 = _bert().bert.encoder.layer[1].attention.self.value.weight.detach().double()
    model = lowrank.adapt(_bert(), "lora", targets=["v"], rank=3, alpha=6, init="milora")
    layer = model.bert.encoder.layer[1].attention.self.value
    U, S, Vh = torch.linalg.svd(w0)
    bottom = U[:, -3:] @ torch.diag(S[-3:]) @ Vh[-3:]
    torch.testing.assert_close(layer.base.weight.double(), w0 - bottom, rtol=0, atol=1e-5)
    torch.testing.assert_close(2.0 * (layer.lora_B @ layer.lora_A).double(), bottom, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "milora", "olora"])
def test_delta_is_measured_against_the_original_w0_everywhere(init, tmp_path):
    base = _bert()
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("query", "value"))}
    model = lowrank.adapt(copy.deepcopy(base), "lora", targets=["q", "v"], rank=4, init=init)
    assert all(l.delta_weight().abs().max() == 0 for l in lowrank.adapted_modules(model).values())
    _perturb(model)
    eye = torch.eye(24)
    for name, layer in lowrank.adapted_modules(model).items():
        with torch.no_grad():
            effective = (layer(eye) - layer.base.bias).T                      # W_res + sBA, applied
        torch.testing.assert_close(layer.delta_weight(), effective - w0[name], rtol=0, atol=2e-5)
    trajectory = target_weights(model, list(w0))
    for name in w0:
        torch.testing.assert_close(trajectory[name] - w0[name], model.get_submodule(name).delta_weight(),
                                   rtol=0, atol=2e-5)
    lowrank.save_adapter(model, tmp_path / "a")
    from lowrank.adapters.lora import read_factors
    from lowrank.io import read_adapter

    config, tensors = read_adapter(tmp_path / "a")
    again = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "a")
    for name, layer in lowrank.adapted_modules(again).items():
        f = read_factors(name, tensors, layer.scaling)[name]
        torch.testing.assert_close(f["scaling"] * f["B"] @ f["A"], model.get_submodule(name).delta_weight(),
                                   rtol=0, atol=2e-5)
        torch.testing.assert_close(layer.delta_weight(), model.get_submodule(name).delta_weight(), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_peft_format_is_the_converted_rank_2r_adapter_on_the_original_base(adapter, tmp_path):
    model = lowrank.adapt(_bert(), adapter, targets=["q", "v"], rank=4, alpha=8, init="pissa")
    _perturb(model)
    lowrank.save_peft(model, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(_bert(), tmp_path / "p").eval()   # the original pretrained base
    assert theirs.peft_config["default"].r == 8 and theirs.peft_config["default"].lora_alpha == 16
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_bad_init_is_one_line():
    with pytest.raises(ValueError, match="init='svd' is not one of"):
        lowrank.adapt(_bert(), "lora", targets=["q"], rank=4, init="svd")


def test_a_failed_load_puts_the_pretrained_weights_back(tmp_path):
    model = lowrank.adapt(_bert(), "lora", targets=["q", "v"], rank=4, init="pissa")
    lowrank.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith("value.lora_B"))
    tensors[key] = tensors[key][:, :2].contiguous()                     # a wrong shape: the load must fail
    save_file(tensors, tmp_path / "a" / "adapter.safetensors")
    fresh, before = _bert(), {n: p.detach().clone() for n, p in _bert().named_parameters()}
    with pytest.raises(ValueError, match="saved shape"):
        lowrank.load_adapter(fresh, tmp_path / "a")
    for n, p in fresh.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
