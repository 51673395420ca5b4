"""lowrank.adapt on tiny Hugging Face models: targeting, freezing, counts, errors, save/load, PEFT."""

from __future__ import annotations

import json

import pytest
import torch

import lowrank

transformers = pytest.importorskip("transformers")


def tiny_bert(num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt_neox(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, bos_token_id=0, eos_token_id=1)
    return transformers.GPTNeoXForCausalLM(config).eval()


def tokens(seed: int = 1, shape=(2, 9)):
    return torch.randint(2, 64, shape, generator=torch.Generator().manual_seed(seed))


def out(model, x):
    with torch.no_grad():
        return model(x).logits


def perturb(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lowrank.trainable_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- targeting -------------------------------------------------------------------------------------

def test_paper_names_map_per_family():
    bert = lowrank.adapt(tiny_bert(), "lora", targets=["q", "k", "v", "o"], rank=2)
    names = set(lowrank.adapted_modules(bert))
    assert "bert.encoder.layer.1.attention.output.dense" in names
    assert not any(n.endswith("layer.1.output.dense") for n in names)  # the FFN output is not "o"
    assert len(names) == 8
    llama = lowrank.adapt(tiny_llama(), "lora", targets=["q", "v", "down"], rank=2, layers=[1])
    assert set(lowrank.adapted_modules(llama)) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                                   "model.layers.1.mlp.down_proj"}


@pytest.mark.parametrize("build", ["opt", "bart"])
def test_opt_and_bart_attention_names(build):
    if build == "opt":
        config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=32)
        model, per_layer = transformers.OPTForCausalLM(config), 1
    else:
        config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                         encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)
        model, per_layer = transformers.BartModel(config), None
    lowrank.adapt(model, "lora", targets=["q", "v", "o"], rank=2)
    names = set(lowrank.adapted_modules(model))
    if build == "opt":
        assert names == {f"model.decoder.layers.{i}.self_attn.{m}" for i in range(2)
                         for m in ("q_proj", "v_proj", "out_proj")}
    else:  # encoder self-attention, decoder self- and cross-attention
        assert {n.rsplit(".", 2)[-2] for n in names} == {"self_attn", "encoder_attn"} and len(names) == 3 * 3
    assert per_layer is None or len(names) == 3 * 2 * per_layer


@pytest.mark.parametrize("gated", [False, True])
def test_t5_paper_names(gated):
    """T5's modules are literally q, k, v, o (PEFT's default targets {q, v}); FFN wi / wi_0, wi_1 / wo."""
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=1,
                                   num_heads=2, feed_forward_proj="gated-gelu" if gated else "relu")
    model = transformers.T5Model(config)
    lowrank.adapt(model, "lora", targets=["q", "v", "up"], rank=2)
    names = set(lowrank.adapted_modules(model))
    attention = {f"encoder.block.{i}.layer.0.SelfAttention.{m}" for i in range(2) for m in "qv"} | \
        {f"decoder.block.0.layer.{j}.{a}.{m}" for j, a in ((0, "SelfAttention"), (1, "EncDecAttention")) for m in "qv"}
    ffn = {f"encoder.block.{i}.layer.1.DenseReluDense.{'wi_1' if gated else 'wi'}" for i in range(2)} | \
        {f"decoder.block.0.layer.2.DenseReluDense.{'wi_1' if gated else 'wi'}"}
    assert names == attention | ffn


def test_gpt_neox_fused_slices_are_interleaved_per_head():
    model = tiny_gpt_neox()
    x = tokens()
    y0 = out(model, x)
    lowrank.adapt(model, "lora", targets=["v"], rank=2)
    layer = lowrank.adapted_modules(model)["gpt_neox.layers.0.attention.query_key_value"]
    rows = layer.slices["v"].rows
    head_dim = 8
    expected = torch.cat([torch.arange(h * 3 * head_dim + 2 * head_dim, h * 3 * head_dim + 3 * head_dim)
                          for h in range(4)])
    assert torch.equal(rows, expected)
    assert torch.allclose(out(model, x), y0, atol=1e-6)
    perturb(model)
    y1 = out(model, x)
    lowrank.merge_adapters(model)
    assert rel(out(model, x), y1) <= 1e-5


def test_explicit_module_names_and_regex():
    model = lowrank.adapt(tiny_bert(), "lora", targets=["re:.*layer\\.0\\.attention\\.self\\.(query|key)"], rank=2)
    assert set(lowrank.adapted_modules(model)) == {"bert.encoder.layer.0.attention.self.query",
                                                   "bert.encoder.layer.0.attention.self.key"}
    model = lowrank.adapt(tiny_bert(), "lora", targets=["intermediate.dense"], rank=2)
    assert len(lowrank.adapted_modules(model)) == 2


# ---- freezing and counts ---------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", ["lora", "dora", "flora", "ia3", "bitfit", "head"])
def test_only_adapter_and_head_train_and_base_is_bit_identical(adapter):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lowrank.adapt(model, adapter, targets=["q", "v"] if adapter != "ia3" else None, rank=4, alpha=8)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(tokens()).logits, torch.tensor([0, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    opt.step()
    trained = lowrank.trainable_state_dict(model)
    for name, p in model.named_parameters():
        original = name.replace(".base.", ".")
        if name in trained:
            continue
        assert torch.equal(p, before[original]), f"frozen {name} changed"
    allowed = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "magnitude"),
               "flora": ("A_in", "A_out", "core"), "ia3": ("ia3_scale",), "bitfit": ("bias",), "head": ()}[adapter]
    for name in trained:
        assert name.startswith("classifier.") or name.endswith(allowed), name


def test_full_fine_tuning_trains_every_weight():
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)  # adapt("full") must switch them back on
    lowrank.adapt(model, "full")
    assert lowrank.count_parameters(model) == (total, total)
    assert not lowrank.adapted_modules(model)


@pytest.mark.parametrize("adapter,per_matrix", [
    ("lora", lambda r, i, o: r * (i + o)),
    ("dora", lambda r, i, o: r * (i + o) + o),
    ("flora", lambda r, i, o: r * r + i * r + o * r),
])
def test_trainable_counts_equal_closed_forms(adapter, per_matrix):
    model = tiny_bert()
    head = sum(p.numel() for p in model.classifier.parameters())
    _, total_before = lowrank.count_parameters(model)
    lowrank.adapt(model, adapter, targets=["q", "k", "v", "o"], rank=4)
    trainable, total = lowrank.count_parameters(model)
    expected = 2 * 4 * per_matrix(4, 32, 32) + head
    assert trainable == expected
    assert total == total_before + expected - head


def test_flora_conv_count_is_tucker_count():
    conv = torch.nn.Conv2d(256, 512, 3)
    layer = lowrank.adapters.FLoRA(conv, [32, 32, 2, 2])
    n = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert n == 32 * 32 * 2 * 2 + 256 * 32 + 512 * 32 + 3 * 2 + 3 * 2 == 28_684  # FLoRA's count: r1r2r3r4 + d_in r1 + d_out r2 + k r3 + k r4 (arXiv 2405.14739 §3)


def test_lora_count_matches_paper_roberta_budget():
    # LoRA §1.1: RoBERTa-base, r=8 on {q, v} in 12 layers: 2 · 24 · 768 · 8 = 294,912
    config = transformers.RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=8, vocab_size=8, max_position_embeddings=16)
    model = transformers.RobertaModel(config, add_pooling_layer=False)
    lowrank.adapt(model, "lora", targets=["q", "v"], rank=8)
    assert lowrank.count_parameters(model)[0] == 294_912


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,fragment", [
    ({"adapter": "lorax"}, "unknown adapter 'lorax'; choose one of: lora, dora"),
    ({"rank": 0}, "rank=0 is not a positive integer"),
    ({"rank": -2}, "rank=-2"),
    ({"rank": "four"}, "rank='four'"),
    ({"rank": 33}, "rank=33 exceeds min(in_features, out_features)=32"),
    ({"targets": ["nonexistent"]}, "target 'nonexistent' matched no adaptable module"),
    ({"targets": ["q"], "layers": [7]}, "in layers [7]"),
    ({"alpha": -1}, "alpha=-1"),
    ({"dropout": 1.5}, "dropout=1.5"),
    ({"adapter": "dora", "dora_norm": "approx"}, "dora_norm='approx'"),
    ({"bogus_option": 1}, "unknown option(s) ['bogus_option']"),
])
def test_bad_input_raises_one_line_value_error(kwargs, fragment):
    args = {"adapter": "lora", "targets": ["q", "v"], "rank": 4, **kwargs}
    with pytest.raises(ValueError) as err:
        lowrank.adapt(tiny_bert(), args.pop("adapter"), **args)
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_no_matching_target_lists_the_candidates():
    with pytest.raises(ValueError) as err:
        lowrank.adapt(tiny_bert(), "lora", targets=["attn.q_proj"], rank=2)
    assert "attention.self.query" in str(err.value) and "\n" not in str(err.value)


def test_unknown_architecture_lists_candidates():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"no q projection found in model_type 'Tiny'.*proj_in"):
        lowrank.adapt(Tiny(), "lora", targets=["q"], rank=2)
    model = lowrank.adapt(Tiny(), "lora", targets=["proj_in"], rank=2)
    assert list(lowrank.adapted_modules(model)) == ["proj_in"]


# ---- save / load -----------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter", ["lora", "dora", "flora", "ia3", "bitfit"])
def test_save_and_load_roundtrip(tmp_path, adapter):
    model = lowrank.adapt(tiny_bert(), adapter, targets=None if adapter == "ia3" else ["q", "v"], rank=3, alpha=6,
                          layers=[1])
    perturb(model)
    x = tokens()
    expected = out(model, x)
    lowrank.save_adapter(model, tmp_path / "adapter")
    assert not list((tmp_path / "adapter").glob("*.tmp"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["adapter"] == adapter and config["layers"] == [1]
    fresh = lowrank.load_adapter(tiny_bert(), tmp_path / "adapter")
    assert torch.equal(out(fresh, x), expected)
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in (tmp_path / "adapter").iterdir())


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs():
    model = lowrank.adapt(tiny_bert(), "dora", targets=["q", "v"], rank=3)
    perturb(model)
    x = tokens()
    expected = out(model, x)
    plain = lowrank.merge_and_unload(model)
    assert not lowrank.adapted_modules(plain)
    assert type(plain.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    assert rel(out(plain, x), expected) <= 1e-5


# ---- PEFT ------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


PEFT_CASES = [("bert", False), ("bert", True), ("llama", False), ("llama", True)]


def _pair(arch: str):
    if arch == "bert":
        return tiny_bert, ["query", "value"], "SEQ_CLS"
    return tiny_llama, ["q_proj", "v_proj"], "CAUSAL_LM"


@pytest.mark.parametrize("arch,use_dora", PEFT_CASES)
def test_outputs_agree_with_peft_on_the_same_weights(arch, use_dora):
    make, modules, task = _pair(arch)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=11, target_modules=modules,
                                                         use_dora=use_dora, task_type=task))
    perturb(theirs)
    ours = lowrank.adapt(make(), "dora" if use_dora else "lora", targets=["q", "v"], rank=4, alpha=11)
    # copy every adapter tensor across by name
    theirs_sd = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in theirs.state_dict().items()}
    with torch.no_grad():
        for name, p in lowrank.trainable_state_dict(ours).items():
            key = (name.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight")
                   .replace(".magnitude", ".lora_magnitude_vector.weight").replace("classifier.", "classifier.modules_to_save."))
            p.copy_(theirs_sd[key])
    x = tokens()
    assert rel(out(ours, x), out(theirs, x)) <= 1e-5


@pytest.mark.parametrize("arch,use_dora", PEFT_CASES)
def test_peft_format_roundtrip_both_ways(tmp_path, arch, use_dora):
    make, modules, task = _pair(arch)
    x = tokens()
    adapter = "dora" if use_dora else "lora"
    # ours -> PEFT
    ours = lowrank.adapt(make(), adapter, targets=["q", "v"], rank=4, alpha=11)
    perturb(ours)
    lowrank.save_peft(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    assert rel(out(loaded, x), out(ours, x)) <= 1e-5
    # PEFT -> ours
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=11, target_modules=modules,
                                                         use_dora=use_dora, task_type=task)).eval()
    perturb(theirs, seed=9)
    theirs.save_pretrained(tmp_path / "theirs")
    back = lowrank.load_peft(make(), tmp_path / "theirs")
    assert rel(out(back, x), out(theirs, x)) <= 1e-5
    assert lowrank.adapter_config(back)["adapter"] == adapter


def test_import_lowrank_stays_light():
    import subprocess
    import sys

    code = ("import sys, lowrank; heavy = [m for m in ('hydra', 'omegaconf', 'wandb', 'datasets') if m in sys.modules]; "
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"import lowrank pulled in {done.stdout.strip()}"


def test_library_never_imports_the_runner():
    """The library layer (lowrank/*.py, lowrank/adapters/) imports torch and safetensors, never the runner,
    Hydra, datasets, W&B or transformers at module level (the two layers of the package)."""
    import ast
    from pathlib import Path

    root = Path(lowrank.__file__).parent
    forbidden = ("lowrank.runner", "hydra", "omegaconf", "datasets", "wandb", "pandas")
    found = []
    for path in [*root.glob("*.py"), *(root / "adapters").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.startswith(forbidden)]
    assert found == []
