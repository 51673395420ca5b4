"""LoRA+ (arXiv 2402.12354): after one AdamW step, whose first update is lr·g/(|g| + ε) per entry (Adam's bias-corrected
first step), every entry of B moved by ratio·lr and every entry of A by lr."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.runner.train import make_optimizer


def _step(ratio):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    lowrank.adapt(model, "lora", targets=["0"], rank=3)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()                       # so that A gets a gradient too
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(model, 1e-3, 0.0, (0.9, 0.999), lora_plus_ratio=ratio)
    model(torch.randn(5, 12)).square().sum().backward()
    opt.step()
    return {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters() if p.requires_grad}


def test_b_moves_ratio_times_as_far_as_a():
    moved = _step(16.0)
    torch.testing.assert_close(moved["0.lora_A"], torch.full_like(moved["0.lora_A"], 1e-3), rtol=1e-3, atol=0)
    torch.testing.assert_close(moved["0.lora_B"], torch.full_like(moved["0.lora_B"], 16e-3), rtol=1e-3, atol=0)
    plain = _step(None)
    torch.testing.assert_close(plain["0.lora_B"], torch.full_like(plain["0.lora_B"], 1e-3), rtol=1e-3, atol=0)


def test_bad_ratio_is_one_line():
    model = lowrank.adapt(torch.nn.Sequential(torch.nn.Linear(4, 4)), "lora", targets=["0"], rank=2)
    with pytest.raises(ValueError, match="lora_plus_ratio=-1"):
        make_optimizer(model, 1e-3, 0.0, (0.9, 0.999), lora_plus_ratio=-1)
