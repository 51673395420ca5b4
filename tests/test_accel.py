"""lowrank.runner.accel: the fused linear cross-entropy against F.cross_entropy, causal_lm_loss against
transformers' own loss (plain and PEFT-wrapped models), regional compilation keeping the model intact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank.runner import accel

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                      tie_word_embeddings=False, **kw)
    return LlamaForCausalLM(cfg)


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(cfg)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [3, 7, 1000])
def test_linear_cross_entropy_matches_reference(bias, chunk_rows):
    g = torch.Generator().manual_seed(chunk_rows + bias)
    rows, hidden, vocab = 23, 8, 31
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::4] = -100  # ignored rows
    ref = F.cross_entropy(F.linear(h, w, b), labels, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [t for t in (h, w, b) if t is not None])
    got = accel.linear_cross_entropy(h, w, labels, bias=b, impl="torch", chunk_rows=chunk_rows)
    got_grads = torch.autograd.grad(got * 1.0, [t for t in (h, w, b) if t is not None])
    torch.testing.assert_close(got, ref)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r)


def test_linear_cross_entropy_scales_with_upstream_gradient():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, generator=g, requires_grad=True)
    w = torch.randn(11, 4, generator=g)
    labels = torch.randint(0, 11, (5,), generator=g)
    (3.0 * accel.linear_cross_entropy(h, w, labels, impl="torch")).backward()
    ref_h = h.detach().clone().requires_grad_(True)
    (3.0 * F.cross_entropy(ref_h @ w.t(), labels)).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)


def test_linear_cross_entropy_errors():
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="impl"):
        accel.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), impl="cuda")
    with pytest.raises(ValueError, match="rows"):
        accel.linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long), impl="torch")


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_causal_lm_loss_equals_transformers_loss(adapter):
    model = tiny_llama()
    lowrank.adapt(model, adapter, targets=["q", "v"], rank=4, alpha=8)
    with torch.no_grad():
        for layer in lowrank.adapted_modules(model).values():
            layer.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    ref = model(input_ids=ids, labels=ids, use_cache=False).loss
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    got = accel.causal_lm_loss(model, ids, impl="torch")
    got_grads = torch.autograd.grad(got, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(got, ref)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_causal_lm_loss_on_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(accel.causal_lm_loss(model, ids, impl="torch"), ref)


def test_causal_lm_loss_refuses_logit_softcapping():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        accel.causal_lm_loss(model, torch.zeros(1, 4, dtype=torch.long))


def test_repeated_blocks_finds_the_layers():
    llama, bert = tiny_llama(), tiny_bert()
    assert accel.repeated_blocks(llama) == list(llama.model.layers)
    assert accel.repeated_blocks(bert) == list(bert.bert.encoder.layer)
    with pytest.raises(ValueError, match="ModuleList"):
        accel.repeated_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_compile_keeps_the_model_and_its_outputs():
    model = tiny_llama()
    lowrank.adapt(model, "lora", targets=["q", "k", "v", "o"], rank=2)
    with torch.no_grad():
        for layer in lowrank.adapted_modules(model).values():
            layer.lora_B.normal_(0, 0.1)
    ids = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(5))
    ref = model(input_ids=ids).logits
    keys = list(model.state_dict())
    out = accel.compile(model, backend="eager")
    assert out is model and list(model.state_dict()) == keys
    assert all(block._compiled_call_impl is not None for block in model.model.layers)
    assert set(lowrank.adapted_modules(model)) == {n for n in lowrank.adapted_modules(model)}
    torch.testing.assert_close(model(input_ids=ids).logits, ref)
    torch._dynamo.reset()


def test_liger_needs_a_gpu_and_the_package():
    if accel.liger_available():
        pytest.skip("Liger is available here; the refusal is for machines without it")
    with pytest.raises(RuntimeError, match="liger-kernel"):
        accel.liger(tiny_llama())
