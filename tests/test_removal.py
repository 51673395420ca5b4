"""Every method comes off again: after ``lowrank.remove_adapters`` (and ``merge_and_unload``, and a failed load's
rollback) a model equals a freshly built one of the same seed in its module tree, parameters (values and
``requires_grad``), buffers, hooks, per-module attributes, config and outputs. The reference is the fresh model
itself, built independently; every registry entry is checked on a BERT classifier and on GPT-2 (Conv1D, fused
``c_attn``)."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowrank
from lowrank.adapters import ADAPTERS

V = 50
#: Small sizes so that every method builds on a 2-layer, width-16 model.
OPTIONS = {"prefix": {"length": 3, "hidden": 8}, "ptuning2": {"length": 3}, "prompt": {"length": 3, "init": "random"},
           "ptuning": {"length": 3, "hidden": 8, "init": "random"}, "gradual": {"every": 1}}
HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
         "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")


def build(family: str):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            num_labels=2, max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a flag the user set before adapt
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        model.transformer.wpe.weight.requires_grad_(False)
    return model.double().eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def outputs(model) -> torch.Tensor:
    ids, mask = inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def cases():
    return [(family, name) for family in ("bert", "gpt2") for name in ADAPTERS
            if not (family == "gpt2" and name == "head")]  # an LM head is the tied embedding, no task head


def options(family: str, name: str) -> dict:
    """On GPT-2, methods that take whole matrices only adapt the attention output and FFN projections (Conv1D):
    its q/k/v are slices of one fused c_attn, which only LoRA adapts."""
    spec = ADAPTERS[name]
    whole = spec.wraps and name != "lora" and {"q", "k", "v"} & set(spec.default_targets)
    return {**OPTIONS.get(name, {}), **({"targets": ["o", "down"]} if family == "gpt2" and whole else {})}


def adapted(family: str, name: str, perturb: str):
    """``(model adapted with name, its fresh twin)``; ``perturb``: 'adapter' moves only the parameters the
    adapter added (so the base's own values stay W0), 'all' every trainable one."""
    fresh, model = build(family), build(family)
    base_names = {n for n, _ in fresh.named_parameters()}
    lowrank.adapt(model, name, rank=2, **options(family, name))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            added = n.replace(".base.", ".") not in base_names
            if p.requires_grad and (added or perturb == "all"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, fresh


def assert_like_fresh(model, fresh, *, values: bool = True) -> None:
    """Modules, parameters, buffers, hooks, attributes and config of ``model`` are ``fresh``'s."""
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    ours, theirs = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert list(ours) == list(theirs)
    assert {n: p.requires_grad for n, p in ours.items()} == {n: p.requires_grad for n, p in theirs.items()}
    if values:
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs), [n for n in theirs if not torch.equal(ours[n],
                                                                                                           theirs[n])]
    buffers = dict(fresh.named_buffers())
    assert list(dict(model.named_buffers())) == list(buffers)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    for (name, m), f in zip(model.named_modules(), fresh.modules()):
        for hooks in HOOKS:
            assert not getattr(m, hooks), f"{name}.{hooks} holds {dict(getattr(m, hooks))}"
        assert sorted(vars(m)) == sorted(vars(f)), f"{name}: {set(vars(m)) ^ set(vars(f))}"
    assert model.config == fresh.config and model.config._attn_implementation == fresh.config._attn_implementation


def prefix_registered() -> bool:
    from transformers import AttentionInterface

    from lowrank.adapters.prefix import ATTENTION

    return ATTENTION in AttentionInterface._global_mapping


@pytest.mark.parametrize("family,name", cases())
def test_remove_adapters_gives_back_the_fresh_model(family, name):
    model, fresh = adapted(family, name, perturb="adapter")
    expected = outputs(fresh)
    if any(n.replace(".base.", ".") not in dict(fresh.named_parameters()) for n, _ in model.named_parameters()):
        assert not torch.allclose(outputs(model), expected), "the perturbed adapter changes the function"
    assert lowrank.remove_adapters(model) is model
    outputs(model), outputs(fresh)  # a forward may set attributes lazily: compare after one on both
    assert_like_fresh(model, fresh)
    assert torch.equal(outputs(model), expected)
    # and the method goes on again cleanly: one set of hooks, the same function as a first adaptation
    lowrank.adapt(model, name, rank=2, **options(family, name))
    again, _ = adapted(family, name, perturb="none")
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in again.named_modules()]
    assert all(len(getattr(m, h)) == len(getattr(a, h)) for m, a in zip(model.modules(), again.modules())
               for h in HOOKS)
    lowrank.remove_adapters(model), lowrank.remove_adapters(again)


@pytest.mark.parametrize("family,name", cases())
def test_merge_and_unload_keeps_the_outputs_or_refuses_in_one_line(family, name):
    model, fresh = adapted(family, name, perturb="all")
    expected = outputs(model)
    mergeable = all(m.mergeable for m in lowrank.adapted_modules(model).values()) and getattr(
        getattr(model, "lowrank_injected", None), "mergeable", True)
    if not mergeable:
        with pytest.raises(ValueError) as error:
            lowrank.merge_and_unload(model)
        assert "\n" not in str(error.value) and "remove_adapters" in str(error.value) and name in str(error.value)
        assert lowrank.adapter_config(model)["adapter"] == name and torch.equal(outputs(model), expected)
        return
    lowrank.merge_and_unload(model)
    outputs(model), outputs(fresh)
    assert_like_fresh(model, fresh, values=False)  # the weights hold ΔW now, by design
    torch.testing.assert_close(outputs(model), expected, rtol=1e-5, atol=1e-6)  # ΔW is formed in float32


@pytest.mark.parametrize("family,name", cases())
def test_a_failed_load_gives_back_the_fresh_model(family, name, tmp_path):
    model, _ = adapted(family, name, perturb="adapter")
    lowrank.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    save_file({**tensors, "not.in.the.model": torch.zeros(1)}, str(tmp_path / "adapter.safetensors"))
    target, fresh = build(family), build(family)
    with pytest.raises(ValueError, match="not.in.the.model"):
        lowrank.load_adapter(target, tmp_path)  # fails after adapt, in the last check before copying
    outputs(target), outputs(fresh)
    assert_like_fresh(target, fresh)
    assert torch.equal(outputs(target), outputs(fresh))


def test_adapting_an_adapted_model_is_refused_in_one_line():
    model = lowrank.adapt(build("bert"), "prompt", length=3, init="random")
    expected, hooks = outputs(model), len(model._forward_pre_hooks)
    for again in (lambda: lowrank.adapt(model, "lora"), lambda: lowrank.adapt(model, "prompt", length=3)):
        with pytest.raises(ValueError) as error:
            again()
        line = str(error.value)
        assert "\n" not in line and "'prompt'" in line and "lowrank.remove_adapters(model)" in line
    assert len(model._forward_pre_hooks) == hooks and torch.equal(outputs(model), expected)


def test_a_failed_adapt_undoes_what_it_had_done(monkeypatch):
    """Failures after some layers are wrapped, and after an injection changed the model, leave nothing behind."""
    from lowrank.adapters import prefix

    model, fresh = build("bert"), build("bert")
    with pytest.raises(ValueError, match="rank=40 exceeds"):  # the last module's rank does not fit: others wrapped
        lowrank.adapt(model, "lora", rank=2, rank_pattern={"layer.1.attention.self.value": 40})
    assert_like_fresh(model, fresh)

    def broken():
        raise RuntimeError("registry unavailable")
    monkeypatch.setattr(prefix, "_register", broken)  # fails after the attention slots are set
    with pytest.raises(RuntimeError, match="registry unavailable"):
        lowrank.adapt(model, "prefix", length=3, hidden=8)
    outputs(model), outputs(fresh)
    assert_like_fresh(model, fresh)


def test_a_copy_of_a_prefix_model_outlives_the_original_s_removal():
    """The transformers registration of the prefix attention lasts while a prefix model lives, and goes with the
    last one's removal."""
    gc.collect()  # prefix models of earlier tests that are garbage hold it no longer
    model = lowrank.adapt(build("gpt2"), "ptuning2", length=3)
    copied = copy.deepcopy(model)
    expected = outputs(model)
    lowrank.remove_adapters(model)
    assert prefix_registered()  # the copy still routes its attention through the prefixes
    assert torch.equal(outputs(copied), expected)
    lowrank.remove_adapters(copied)
    assert not prefix_registered()
    assert torch.equal(outputs(copied), outputs(build("gpt2")))


def test_unload_is_remove_adapters():
    assert lowrank.unload is lowrank.remove_adapters


def test_rank_and_alpha_patterns_adapt_the_modules_peft_does(tmp_path):
    """PEFT, given the same rank_pattern/alpha_pattern, builds the same per-module ranks and scalings; the
    patterns survive a save and load."""
    peft = pytest.importorskip("peft")
    ranks, alphas = {"layer.1.attention.self.value": 4}, {"0.attention.self.query": 6}
    ours = lowrank.adapt(build("bert"), "lora", targets=["q", "v"], rank=2, alpha=3, rank_pattern=ranks,
                         alpha_pattern=alphas)
    theirs = peft.get_peft_model(build("bert"), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["query", "value"],
                                                                rank_pattern=ranks, alpha_pattern=alphas))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    layers = lowrank.adapted_modules(ours)
    assert sorted(layers) == sorted(peft_layers)
    for name, layer in layers.items():
        assert (layer.rank, layer.scaling) == (peft_layers[name].r["default"], peft_layers[name].scaling["default"])
    lowrank.save_adapter(ours, tmp_path)
    loaded = lowrank.adapted_modules(lowrank.load_adapter(build("bert"), tmp_path))
    assert {n: (m.rank, m.scaling) for n, m in loaded.items()} == {n: (m.rank, m.scaling) for n, m in layers.items()}


@pytest.mark.parametrize("kwargs,fragment", [
    ({"adapter": "lora", "rank_pattern": {"layer.7.attention.self.query": 4}}, "matches no adapted module"),
    ({"adapter": "lora", "rank_pattern": {"query": 0}}, "rank_pattern['query']=0"),
    ({"adapter": "lora", "alpha_pattern": {"(query": 4}}, "not a valid regex"),
    ({"adapter": "bitfit", "rank_pattern": {"query": 4}}, "does not have"),
])
def test_bad_patterns_are_one_line_and_change_nothing(kwargs, fragment):
    model, fresh = build("bert"), build("bert")
    with pytest.raises(ValueError) as error:
        lowrank.adapt(model, kwargs.pop("adapter"), rank=2, **kwargs)
    assert "\n" not in str(error.value) and fragment in str(error.value), str(error.value)
    assert_like_fresh(model, fresh)


def test_the_runner_s_target_check_leaves_the_shared_model_config_alone(tiny_bert):
    """The runner adapts a weightless skeleton built on the same config object the model then loads with; a
    prefix method must not leave its attention setting there."""
    from hydra import compose, initialize_config_dir

    from lowrank.runner import models
    from lowrank.runner.app import check_targets
    from lowrank.runner.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model.pretrained={tiny_bert}", "model.name=tiny", "adapter=prefix"])
    config, expected = models.load_config(cfg.model, cfg.task), models.load_config(cfg.model, cfg.task)
    models.skeleton(cfg.model, cfg.task, expected)  # transformers itself fills in settings when it builds a model
    check_targets(cfg, config)
    assert config == expected and config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["lora", "dora", "flora", "ia3"])
def test_a_merged_adapter_is_unmerged_when_removed(name):
    """Unlike PEFT's unload, which leaves a merged weight merged: the base weights are W0 again."""
    model, fresh = adapted("bert", name, perturb="adapter")
    lowrank.merge_adapters(model)
    assert not torch.allclose(outputs(model), outputs(fresh))
    lowrank.remove_adapters(model)
    assert_like_fresh(model, fresh, values=False)
    theirs = dict(fresh.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, theirs[n], rtol=0, atol=1e-6)  # ΔW is formed in float32
    torch.testing.assert_close(outputs(model), outputs(fresh), rtol=1e-5, atol=1e-6)
