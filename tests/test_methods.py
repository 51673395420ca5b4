"""Bottleneck adapters, prefixes, soft prompts and block selection against independent references: float64
formulas of their defining equations, the papers' parameter counts, and transformers' own key/value cache
(prefix keys and values are what a cache of P earlier tokens holds)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import lowrank
from lowrank.adapters.bottleneck import Bottleneck

V = 50


def tiny(family: str, layers: int = 2):
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
            num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=32))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=layers, n_head=2, bos_token_id=0,
                                           eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return model.double().eval()


def batch(T: int = 6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, T - 2:] = 0
    return ids, mask


# ---- bottleneck adapters ------------------------------------------------------------------------------------

def test_bottleneck_output_is_the_float64_adapter_formula():
    base = torch.nn.Linear(8, 6).double()
    layer = Bottleneck(base, 3, nonlinearity="swish").double()
    with torch.no_grad():
        for p in (layer.adapter_down.weight, layer.adapter_down.bias, layer.adapter_up.weight, layer.adapter_up.bias):
            p.normal_()
    x = torch.randn(4, 8, dtype=torch.float64)
    h = x @ base.weight.T + base.bias
    z = layer.adapter_down.weight @ h.T + layer.adapter_down.bias[:, None]
    expected = h + (layer.adapter_up.weight @ (z * torch.sigmoid(z)) + layer.adapter_up.bias[:, None]).T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_bottleneck_parameter_counts_are_lora_section_5_1(family):
    """|Θ| = L̂·(2·d·r + r + d), plus 2·d per trained LayerNorm (houlsby) and the task head (LoRA §5.1)."""
    r, d, L = 4, 16, 2
    for adapter, per_block in (("houlsby", 2), ("pfeiffer", 1)):
        model = lowrank.adapt(tiny(family), adapter, rank=r)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
        norms = {n.rsplit(".", 1)[0] for n in trained if not ("adapter_" in n or n.startswith("classifier."))}
        norm_params = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in norms)
        if adapter == "pfeiffer":
            assert not norms
        else:
            assert norms and all(re.search(r"(?i)(layernorm|ln_|norm)", n) for n in norms)
            assert norm_params == sum(2 * d if family != "llama" else d for _ in norms)
        assert lowrank.count_parameters(model)[0] == per_block * L * (2 * d * r + r + d) + norm_params + head


def test_bottleneck_starts_near_identity_and_refuses_merge():
    base = tiny("bert")
    ids, mask = batch()
    model = lowrank.adapt(copy.deepcopy(base), "houlsby", rank=4)
    ref = base(input_ids=ids, attention_mask=mask).logits
    out = model(input_ids=ids, attention_mask=mask).logits
    assert 0 < (out - ref).abs().max() < 1e-2
    with pytest.raises(ValueError, match="not a ΔW"):
        lowrank.merge_adapters(model)


# ---- prefixes -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_equals_a_key_value_cache_of_earlier_tokens(family):
    """Prefix keys/values = a transformers cache of P tokens; the output at the real tokens (padded batch,
    positions from 0) must equal the base model run with that cache (GQA for LLaMA, Conv1D GPT-2)."""
    from transformers import DynamicCache

    base, (ids, mask), P = tiny(family), batch(), 3
    prompt = torch.randint(1, V, (1, P), generator=torch.Generator().manual_seed(2))
    cache = base(input_ids=prompt, use_cache=True).past_key_values
    layers = [(cache.layers[i].keys[0], cache.layers[i].values[0]) for i in range(2)]
    reference = DynamicCache(config=base.config)
    for i, (k, v) in enumerate(layers):
        reference.update(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), i)
    expected = base(input_ids=ids, attention_mask=torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1),
                    past_key_values=reference, position_ids=torch.arange(ids.shape[1]).expand(2, -1)).logits
    model = lowrank.adapt(copy.deepcopy(base), "ptuning2", length=P).double()
    flat = torch.stack([torch.stack(kv) for kv in layers])  # (layers, 2, heads, P, head_dim)
    with torch.no_grad():
        model.lowrank_injected.prefix.copy_(flat.permute(3, 0, 1, 2, 4).reshape(P, -1))
    out = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-10)


def test_prefix_on_bert_is_the_float64_attention_formula():
    base, (ids, mask), P = tiny("bert", layers=1), batch(), 3
    model = lowrank.adapt(copy.deepcopy(base), "ptuning2", length=P).double()
    attention = model.bert.encoder.layer[0].attention.self
    seen = {}
    attention.register_forward_hook(lambda m, a, k, out: seen.update(x=k.get("hidden_states", a[0] if a else None),
                                                                     out=out[0]), with_kwargs=True)
    model(input_ids=ids, attention_mask=mask)
    x, H, D = seen["x"], 2, 8
    heads = lambda t: t.view(2, -1, H, D).transpose(1, 2)
    q, k, v = heads(attention.query(x)), heads(attention.key(x)), heads(attention.value(x))
    pk, pv = (t.view(P, 2, H, D)[:, j].transpose(0, 1)[None].expand(2, -1, -1, -1)
              for j, t in enumerate([model.lowrank_injected.prefix] * 2))
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    scores = q @ k.transpose(-1, -2) / D ** 0.5
    visible = torch.cat([torch.ones(2, P, dtype=torch.bool), mask.bool()], 1)[:, None, None, :]
    expected = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(2, -1, H * D)
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_prefix_mlp_folds_exactly_and_reloads(family, tmp_path):
    base, (ids, mask), P = tiny(family), batch(), 4
    model = lowrank.adapt(copy.deepcopy(base), "prefix", length=P, hidden=8).double()
    kv = model.config.num_key_value_heads if family == "llama" else 2
    width = 2 * 2 * kv * (16 // model.config.num_attention_heads)  # layers · 2 · d_kv
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    assert lowrank.count_parameters(model)[0] == P * 16 + (16 * 8 + 8) + (8 * width + width) + head
    before = model(input_ids=ids, attention_mask=mask).logits
    lowrank.fold(model)
    assert lowrank.count_parameters(model)[0] == P * width + head
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=1e-12)
    lowrank.save_adapter(model, tmp_path / "a")
    again = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "a").double()
    # adapt builds float32 parameters: the reloaded values are the saved ones rounded to float32
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=1e-5)


def test_prefix_layers_restrict_where_prefixes_go():
    model = lowrank.adapt(tiny("llama", layers=3), "ptuning2", length=2, layers=[2])
    assert model.lowrank_injected.layers == 1
    assert lowrank.count_parameters(model)[0] == 2 * 2 * 2 * 4  # P · 2 · kv_heads · head_dim


# ---- soft prompts -------------------------------------------------------------------------------------------

def test_prompt_on_bert_keeps_cls_first_and_equals_the_embedding_formula():
    base, (ids, mask), n = tiny("bert"), batch(), 3
    model = lowrank.adapt(copy.deepcopy(base), "prompt", length=n, init="random").double()
    p = model.lowrank_injected.prompt
    word = base.bert.embeddings.word_embeddings(ids)
    embeds = torch.cat([word[:, :1], p[None].expand(2, -1, -1), word[:, 1:]], 1)
    full_mask = torch.cat([mask[:, :1], torch.ones(2, n, dtype=torch.long), mask[:, 1:]], 1)
    expected = base(inputs_embeds=embeds, attention_mask=full_mask).logits
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-12)
    assert lowrank.count_parameters(model)[0] == n * 16 + 16 * 2 + 2


def test_prompt_on_a_causal_lm_prepends_and_returns_input_positions():
    base, (ids, mask), n = tiny("llama"), batch(), 3
    model = lowrank.adapt(copy.deepcopy(base), "prompt", length=n, init="text", init_ids=[5, 7]).double()
    p = model.lowrank_injected.prompt
    torch.testing.assert_close(p, base.model.embed_tokens.weight[[5, 7, 5]].float().double())
    embeds = torch.cat([p[None].expand(2, -1, -1), base.model.embed_tokens(ids)], 1)
    expected = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, n, dtype=torch.long), mask], 1))
    out = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == (2, ids.shape[1], V)
    torch.testing.assert_close(out, expected.logits[:, n:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_ptuning_encoder_is_the_reference_network_and_folds_exactly(encoder, tmp_path):
    base, (ids, mask), n = tiny("bert"), batch(), 3
    model = lowrank.adapt(copy.deepcopy(base), "ptuning", length=n, encoder=encoder, hidden=8).double()
    prompt = model.lowrank_injected
    h = prompt.inputs
    if encoder == "lstm":  # a float64 re-run of the same LSTM weights in torch's reference cell, both directions
        h = _bilstm(prompt.lstm, h)
    else:
        h = F.relu(prompt.mlp[2](F.relu(prompt.mlp[0](h))))
        h = prompt.mlp[4](h)
        torch.testing.assert_close(prompt.embeddings(), h, rtol=0, atol=1e-12)
    if encoder == "lstm":
        torch.testing.assert_close(prompt.embeddings(), prompt.mlp(h), rtol=0, atol=1e-10)
    before = model(input_ids=ids, attention_mask=mask).logits
    lowrank.fold(model)
    assert lowrank.count_parameters(model)[0] == n * 16 + 16 * 2 + 2
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=1e-12)
    lowrank.save_adapter(model, tmp_path / "a")
    again = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "a").double()
    # adapt builds float32 parameters: the reloaded values are the saved ones rounded to float32
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=1e-5)


def _bilstm(lstm, x):
    """Two bidirectional LSTM layers from the gate equations (float64), PyTorch's gate order i, f, g, o."""
    for layer in range(lstm.num_layers):
        outs = []
        for suffix, order in (("", range(len(x))), ("_reverse", range(len(x) - 1, -1, -1))):
            W, U = getattr(lstm, f"weight_ih_l{layer}{suffix}"), getattr(lstm, f"weight_hh_l{layer}{suffix}")
            b = getattr(lstm, f"bias_ih_l{layer}{suffix}") + getattr(lstm, f"bias_hh_l{layer}{suffix}")
            h = c = torch.zeros(lstm.hidden_size, dtype=x.dtype)
            out = [None] * len(x)
            for t in order:
                i, f, g, o = (W @ x[t] + U @ h + b).chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                out[t] = h
            outs.append(torch.stack(out))
        x = torch.cat(outs, -1)
    return x


def test_prompt_refusals_are_one_line():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    scorer = LlamaForSequenceClassification(LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="last token"):
        lowrank.adapt(scorer, "prompt")
    with pytest.raises(ValueError, match="no input embedding"):
        lowrank.adapt(torch.nn.Sequential(torch.nn.Linear(2, 2)), "prompt")
    with pytest.raises(ValueError, match="init='nope'"):
        lowrank.adapt(tiny("bert"), "prompt", init="nope")


# ---- block selection ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_top_trains_exactly_the_top_k_blocks_and_the_head(family):
    model = lowrank.adapt(tiny(family, layers=4), "top", k=2)
    expected = {n for n in dict(model.named_parameters())
                if re.search(r"\.(?:layer|layers|h)\.(2|3)\.", n) or n.startswith("classifier.")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_gradual_unfreezes_one_block_every_n_steps_from_the_top():
    model = lowrank.adapt(tiny("bert", layers=3), "gradual", every=2)
    blocks = model.bert.encoder.layer
    trains = lambda: [all(p.requires_grad for p in b.parameters()) for b in blocks]
    assert lowrank.count_parameters(model)[0] == sum(p.numel() for p in blocks.parameters()) + 16 * 2 + 2
    seen = []
    for step in range(1, 9):
        model.lowrank_injected.on_step(step)
        seen.append(trains())
    off, top, two, all3 = [False] * 3, [False, False, True], [False, True, True], [True] * 3
    assert seen == [off, off, top, top, two, two, all3, all3]
    assert all(p.requires_grad for p in model.classifier.parameters())
