"""PEFT's on-disk format against the real ``peft`` library, for every case PEFT writes: each test builds
tiny models from configs, puts random non-zero factors on one side, moves them through the files and
compares the other side's outputs and merged weights with PEFT's."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lowrank

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def perturb(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def run(model, x):
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    return getattr(y, "logits", None) if not isinstance(y, torch.Tensor) and hasattr(y, "logits") else \
        (y.start_logits if hasattr(y, "start_logits") else y)


def assert_same(ours, theirs, x, tol=1e-5):
    """Equal outputs, then equal merged weights (PEFT's merge_and_unload against lowrank's)."""
    assert rel(run(ours, x), run(theirs, x)) <= tol
    merged_ours = lowrank.merge_and_unload(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert set(merged_ours) == set(merged_theirs)
    for key, value in merged_theirs.items():
        torch.testing.assert_close(merged_ours[key], value, rtol=1e-5, atol=1e-6, msg=key)


def bert(cls=transformers.BertForSequenceClassification, seed=0, layers=2, hidden=32):
    torch.manual_seed(seed)
    return cls(transformers.BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=4, intermediate_size=48, num_labels=2)).eval()


def llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=0)).eval()


def gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=32)).eval()


def t5(seed=0):
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)).eval()


class Convs(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.proj(torch.relu(self.conv(x)))


def ids(seed=1):
    return torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def t5_inputs():
    return {"input_ids": ids(1), "decoder_input_ids": ids(2)[:, :5]}


def adapter_numel(peft_model) -> int:
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n or "modules_to_save" in n)


def from_peft(tmp_path, make, config, seed=9):
    """A PEFT model with random factors, saved; returns (PEFT model, lowrank model loaded from its files)."""
    theirs = peft.get_peft_model(make(), config).eval()
    perturb(theirs, seed)
    theirs.save_pretrained(tmp_path / "theirs")
    return theirs, lowrank.load_peft(make(), tmp_path / "theirs")


def to_peft(tmp_path, make, ours):
    """lowrank's model saved in PEFT's format and loaded by PEFT."""
    lowrank.save_peft(ours, tmp_path / "ours")
    return peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()


# ---- 1: DoRA on Conv2d (magnitude stored (1, out, 1, 1)) -------------------------------------------

def test_dora_conv2d_both_ways(tmp_path):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    ours = lowrank.adapt(Convs(), "dora", targets=["conv", "proj"], rank=2, alpha=5)
    perturb(ours)
    theirs = to_peft(tmp_path, Convs, ours)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["task_type"] is None
    assert_same(ours, theirs, x)
    theirs, back = from_peft(tmp_path, Convs, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["conv", "proj"],
                                                              use_dora=True))
    assert back.conv.magnitude.shape == (8,)
    assert_same(back, theirs, x)


# ---- 2: target_modules are module names (T5's q, v), or a regex -------------------------------------

def test_t5_default_targets_q_v_are_module_names(tmp_path):
    theirs, back = from_peft(tmp_path, t5, peft.LoraConfig(r=2, lora_alpha=4, task_type="SEQ_2_SEQ_LM"))
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["target_modules"] in (["q", "v"],
                                                                                                      ["v", "q"])
    assert set(lowrank.adapted_modules(back)) == {n for n, _ in theirs.base_model.model.named_modules()
                                                  if n.endswith((".q", ".v"))}
    assert lowrank.count_parameters(back)[0] == theirs.get_nb_trainable_parameters()[0]
    assert_same(back, theirs, t5_inputs())
    # and back: lowrank's T5 adapter (explicit module names) read by PEFT
    ours = lowrank.adapt(t5(), "lora", targets=["SelfAttention.q", "SelfAttention.v"], rank=2, alpha=4)
    perturb(ours, 5)
    loaded = to_peft(tmp_path, t5, ours)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    assert_same(ours, loaded, t5_inputs())


def test_regex_target_modules(tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=r".*layers\.[01]\.self_attn\.(q|v)_proj")
    theirs, back = from_peft(tmp_path, llama, config)
    assert len(lowrank.adapted_modules(back)) == 4
    assert_same(back, theirs, ids())


# ---- 3: exclude_modules, layers_to_transform, rank/alpha patterns, modules_to_save, lora_bias -------

@pytest.mark.parametrize("extra", [
    {"exclude_modules": ["model.layers.0.self_attn.q_proj"]},
    {"exclude_modules": r".*layers\.2\..*"},
    {"layers_to_transform": [0, 2], "layers_pattern": "layers"},
    {"layers_to_transform": 1},
    {"rank_pattern": {"v_proj": 4, r"layers\.1\.self_attn\.q_proj": 3}, "alpha_pattern": {"q_proj": 7}},
    {"modules_to_save": ["lm_head"], "use_rslora": True},
], ids=["exclude-list", "exclude-regex", "layers", "one-layer", "patterns", "save-rslora"])
def test_llama_options_both_ways(tmp_path, extra):
    theirs, back = from_peft(tmp_path, llama, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                                              **extra))
    assert lowrank.count_parameters(back)[0] == theirs.get_nb_trainable_parameters()[0]
    x = ids()
    assert rel(run(back, x), run(theirs, x)) <= 1e-5
    # lowrank -> PEFT: the same adapter written again in PEFT's format and read by PEFT
    again = to_peft(tmp_path, llama, back)
    assert adapter_numel(again) == adapter_numel(theirs)
    assert_same(back, again, x)
    # and lowrank's own format keeps the per-module ranks
    fresh = lowrank.load_peft(llama(), tmp_path / "theirs")
    lowrank.save_adapter(fresh, tmp_path / "own")
    assert rel(run(lowrank.load_adapter(llama(), tmp_path / "own"), x), run(theirs, x)) <= 1e-5


def test_exclude_modules_counts_as_peft(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             exclude_modules=["model.layers.0.self_attn.q_proj"])
    theirs, back = from_peft(tmp_path, llama, config)
    assert "model.layers.0.self_attn.q_proj" not in lowrank.adapted_modules(back)
    assert len(lowrank.adapted_modules(back)) == 5


@pytest.mark.parametrize("field,value", [("lora_bias", True), ("bias", "all"), ("layer_replication", [[0, 2]]),
                                         ("init_lora_weights", "pissa"), ("peft_type", "IA3")])
def test_unsupported_options_refused_in_one_line(tmp_path, field, value):
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        lowrank.load_peft(model, tmp_path)
    assert "\n" not in str(error.value) and (field in str(error.value) or value in str(error.value))
    assert not lowrank.adapted_modules(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- 5: GPT-2 fused q,v written as one rank-2r LoRA on c_attn ---------------------------------------

@pytest.mark.parametrize("targets,rslora", [(["q", "v"], False), (["q", "v", "o"], False), (["q", "v"], True)])
def test_gpt2_fused_qv_written_for_peft(tmp_path, targets, rslora):
    ours = lowrank.adapt(gpt2(), "lora", targets=targets, rank=2, alpha=5, rslora=rslora)
    perturb(ours)
    theirs = to_peft(tmp_path, gpt2, ours)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    c_attn = theirs.base_model.model.transformer.h[0].attn.c_attn
    assert c_attn.lora_A["default"].weight.shape == (4, 32)
    B = c_attn.lora_B["default"].weight
    assert torch.count_nonzero(B[32:64]) == 0 and torch.count_nonzero(B[:32, 2:]) == 0  # k rows, block structure
    assert c_attn.scaling["default"] == pytest.approx(ours.transformer.h[0].attn.c_attn.scaling)
    assert saved["task_type"] == "CAUSAL_LM"
    assert_same(ours, theirs, ids())
    # PEFT's file read back by lowrank as a plain rank-4 LoRA on c_attn: the same function
    back = lowrank.load_peft(gpt2(), tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "ours").eval()
    assert_same(back, again, ids())


# ---- 6: task type from the head -------------------------------------------------------------------

@pytest.mark.parametrize("cls,task", [(transformers.BertForQuestionAnswering, "QUESTION_ANS"),
                                      (transformers.BertForSequenceClassification, "SEQ_CLS"),
                                      (transformers.BertForTokenClassification, "TOKEN_CLS"),
                                      (transformers.BertModel, "FEATURE_EXTRACTION")])
def test_task_type_follows_the_head(tmp_path, cls, task):
    make = lambda: bert(cls)  # noqa: E731
    ours = lowrank.adapt(make(), "lora", targets=["q", "v"], rank=2, alpha=4)
    perturb(ours)
    theirs = to_peft(tmp_path, make, ours)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["task_type"] == task
    x = ids()
    if cls is transformers.BertModel:
        with torch.no_grad():
            assert rel(ours(x).last_hidden_state, theirs(input_ids=x).last_hidden_state) <= 1e-5
    else:
        assert_same(ours, theirs, {"input_ids": x})
