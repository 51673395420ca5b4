"""MoRA (arXiv 2405.12130) against independent references: ΔW by applying the layer to the identity in float64,
the official code's own ``get_delta_weight`` loops (kongds/MoRA peft-mora tuners/lora/layer.py) written out here,
parameter count against LoRA's, rank, and exact merge."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import lowrank
from lowrank.adapters.mora import MoRA


def _moved(layer: MoRA, seed: int = 0) -> MoRA:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.mora_M.copy_(torch.randn(layer.mora_M.shape, generator=g))
    return layer


def _official_delta(M: torch.Tensor, in_f: int, out_f: int, mora_type: int) -> torch.Tensor:
    """The official get_delta_weight for types 1, 2, 6, transcribed (float64)."""
    r = M.shape[0]
    pad = (r - in_f % r) if in_f % r else 0
    repeat = -(-out_f // r)
    if mora_type == 1:
        w = torch.zeros(r, in_f, dtype=M.dtype)
        for i in range(in_f + pad):
            w[:, i % in_f] += M[:, i % r]
        return torch.cat([w] * repeat, 0)[:out_f]
    if mora_type == 2:
        mr, nr = in_f // r + 1, in_f // r
        m = in_f - r * nr
        w = torch.cat([torch.repeat_interleave(M[:, :m], mr, 1), torch.repeat_interleave(M[:, m:], nr, 1)], 1)
        mr, nr = out_f // r + 1, out_f // r
        m = out_f - r * nr
        return torch.cat([torch.repeat_interleave(w[:m], mr, 0), torch.repeat_interleave(w[m:], nr, 0)], 0)
    w = torch.zeros(in_f + pad, in_f, dtype=M.dtype)
    rb1 = -(-in_f // r)
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=M.dtype) / r))
    emb = torch.outer(torch.arange(rb1, dtype=M.dtype), inv)
    emb = torch.cat([emb, emb], -1)
    cos, sin = emb.cos(), emb.sin()
    M2 = torch.cat([M[:, r // 2:], -M[:, :r // 2]], -1)
    for i in range(rb1 - 1):
        w[i * r:(i + 1) * r, i * r:(i + 1) * r] = M2 * sin[i] + M * cos[i]
    i = rb1 - 1
    w[i * r:, i * r:] = (M2 * sin[i] + M * cos[i])[:, :r - pad]
    if pad:
        w[i * r:, :pad] = (M2 * sin[i] + M * cos[i])[:, r - pad:]
    return torch.cat([w] * repeat, 0)[:out_f] if in_f < out_f else w[:out_f]


@pytest.mark.parametrize("in_f,out_f,rank", [(40, 40, 4), (37, 53, 3), (64, 30, 2)])
@pytest.mark.parametrize("mora_type", [0, 1, 2, 3, 4, 6])
def test_delta_weight_is_the_layer_applied_to_the_identity(in_f, out_f, rank, mora_type):
    base = torch.nn.Linear(in_f, out_f).double()
    layer = _moved(MoRA(base, rank, mora_type=mora_type)).double()
    eye = torch.eye(in_f, dtype=torch.float64)
    applied = (layer(eye) - base(eye)).T                       # column j = ΔW e_j
    torch.testing.assert_close(layer._update_matrix(), applied, rtol=0, atol=1e-10)
    if mora_type in (1, 2, 6):
        official = _official_delta(layer.mora_M.detach(), in_f, out_f, mora_type)
        torch.testing.assert_close(applied, official, rtol=0, atol=1e-10)


def test_r_hat_is_the_official_rounding():
    layer = MoRA(torch.nn.Linear(384, 384), 8, mora_type=1)
    assert layer.r_hat == int(math.sqrt(768 * 8) + 0.5) == 78
    assert MoRA(torch.nn.Linear(50, 31), 3, mora_type=6).r_hat == 16   # √243 + 0.5 = 16.09
    assert MoRA(torch.nn.Linear(50, 31), 2, mora_type=6).r_hat == 12   # √162 + 0.5 = 13.2 → 13 → even
    with pytest.raises(ValueError, match="mora_type=5"):
        MoRA(torch.nn.Linear(8, 8), 1, mora_type=5)


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64)).eval()


def test_adapt_matches_lora_parameters_high_rank_and_merges_exactly():
    lora = lowrank.adapt(_bert(), "lora", targets=["q"], rank=8)
    mora = lowrank.adapt(_bert(), "mora", targets=["q"], rank=8)
    head = sum(p.numel() for p in mora.classifier.parameters())
    n_lora, n_mora = lowrank.count_parameters(lora)[0] - head, lowrank.count_parameters(mora)[0] - head
    assert abs(n_mora - n_lora) <= 0.15 * n_lora
    layers = lowrank.adapted_modules(mora)
    for i, layer in enumerate(layers.values()):
        _moved(layer, i)
        assert torch.linalg.matrix_rank(layer.delta_weight().double()) > 8
    ids = torch.randint(0, 40, (2, 7))
    w0 = {n: l.base.weight.detach().clone() for n, l in layers.items()}
    with torch.no_grad():
        before = mora(ids).logits
        lowrank.merge_adapters(mora)
        merged = mora(ids).logits
        for n, l in layers.items():
            torch.testing.assert_close(l.base.weight - w0[n], l.delta_weight(), rtol=0, atol=1e-5)
        lowrank.unmerge_adapters(mora)
    torch.testing.assert_close(merged, before, rtol=0, atol=1e-5)
    for n, l in layers.items():
        torch.testing.assert_close(l.base.weight, w0[n], rtol=0, atol=1e-5)


def test_save_and_load_rebuild_the_same_update(tmp_path):
    model = lowrank.adapt(_bert(), "mora", targets=["q", "v"], rank=4, mora_type=2)
    for i, layer in enumerate(lowrank.adapted_modules(model).values()):
        _moved(layer, i)
    lowrank.save_adapter(model, tmp_path / "a")
    again = lowrank.load_adapter(_bert(), tmp_path / "a")
    for (n, a), b in zip(lowrank.adapted_modules(model).items(), lowrank.adapted_modules(again).values()):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), rtol=0, atol=0)
