"""Packed causal-LM batches (``trainer.packing``): a micro-batch's sequences end to end in one row, attention
within each sequence. The loss must be the padded batch's, computed here from each sequence alone in float64."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowrank.runner import accel
from lowrank.runner.config import ConfigError
from lowrank.runner.data import IGNORE, collate, pack
from lowrank.runner.loss import batch_loss

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=97, max_position_embeddings=64)


def family_model(family: str) -> torch.nn.Module:
    import transformers

    classes = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
               "phi3": "Phi3", "olmo": "Olmo", "granite": "Granite"}
    name = classes[family]
    head = {"head_dim": 8} if family in ("qwen3", "gemma") else {}
    config = getattr(transformers, f"{name}Config")(**SMALL, pad_token_id=0, **head)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(config).double().eval()


def sequences():
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 12, 9)]
    labels = [[IGNORE] * 2 + s[2:] for s in ids]  # a prompt of two tokens, unscored
    return {"input_ids": ids, "labels": labels}


def alone_reference(model, examples) -> float:
    """Token-weighted mean of the shifted next-token NLL, each sequence through the model alone, float64."""
    nll, tokens = 0.0, 0
    for ids, labels in zip(examples["input_ids"], examples["labels"]):
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        target = torch.tensor(labels[1:])
        keep = target != IGNORE
        nll -= logp[keep].gather(1, target[keep, None]).sum().item()
        tokens += int(keep.sum())
    return nll / tokens


def test_pack_lays_sequences_end_to_end():
    examples = {"input_ids": [[5, 6, 7], [8, 9]], "labels": [[IGNORE, 6, 7], [8, 9]]}
    batch = pack(examples, pad_id=0, width=8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    # each sequence's first token is never a target (it would be scored from the other sequence's last token)
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE, IGNORE]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 8] and batch["cu_seq_lens"].dtype == np.int32
    assert pack(examples, 0)["cu_seq_lens"].tolist() == [0, 3, 5, 5]  # no padding: an empty last sequence


@pytest.mark.parametrize("family", accel.PACKING_FAMILIES)
@pytest.mark.parametrize("fused", [False, True])
def test_packed_loss_equals_each_sequence_alone(family, fused):
    model = family_model(family)
    examples = sequences()
    packed = collate(examples, 0, "generation", packed=True, width=32)
    got = batch_loss(model, model, packed, "generation", fused=fused)
    assert got.item() == pytest.approx(alone_reference(model, examples), rel=1e-6)  # loss_fn takes it in float32
    assert model.config._attn_implementation == "sdpa"  # put back


def test_packed_row_without_boundaries_is_another_loss():
    """The control: the same packed row under plain causal attention (each sequence sees the ones before it)."""
    model = family_model("llama")
    examples = sequences()
    packed = collate(examples, 0, "generation", packed=True, width=32)
    leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    from lowrank.runner.loss import loss_fn

    assert abs(loss_fn(leaky, packed["labels"], "generation").item() - alone_reference(model, examples)) > 1e-3


def test_packing_refuses_what_it_cannot_pack():
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=97))
    assert "model_type='gpt2'" in accel.packing_blocker(gpt2.config, 64)
    assert accel.packing_blocker(family_model("llama").config, 64) is None
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=97))
    assert accel.packing_blocker(bert.config, 64) is not None


def sliding_mistral(window: int = 4) -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**SMALL, pad_token_id=0, sliding_window=window)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return MistralForCausalLM(config).double().eval()


@pytest.mark.parametrize("fused", [False, True])
def test_a_sliding_window_keeps_its_mask(fused):
    """A window shorter than the batch: the padded loss keeps transformers' sliding-window mask (each sequence
    alone through the model is the reference), and packing is refused below the window."""
    model = sliding_mistral(4)
    examples = sequences()
    got = batch_loss(model, model, collate(examples, 0, "generation"), "generation", fused=fused)
    assert got.item() == pytest.approx(alone_reference(model, examples), rel=1e-6)
    assert "sliding window of 4 tokens" in accel.packing_blocker(model.config, 64)
    assert accel.packing_blocker(model.config, 4) is None  # no sequence is longer than the window


def test_packed_positions_stop_at_each_sequence():
    """A RoPE that rescales with the largest position (longrope): a row much wider than its sequences gives each
    sequence alone's loss (the padding sits at position 0)."""
    import transformers

    config = transformers.Phi3Config(**SMALL, pad_token_id=0, original_max_position_embeddings=16,
                                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                      "short_factor": [1.0] * 4, "long_factor": [4.0] * 4,
                                                      "original_max_position_embeddings": 16})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).double().eval()
    examples = sequences()  # 26 tokens, each sequence under 16
    packed = collate(examples, 0, "generation", packed=True, width=48)
    got = batch_loss(model, model, packed, "generation", fused=True)
    assert got.item() == pytest.approx(alone_reference(model, examples), rel=1e-9)


def test_packing_on_a_classification_task_is_refused():
    from hydra import compose, initialize_config_dir

    from lowrank.runner.config import CONF_DIR, validate

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["trainer.packing=true"])
    with pytest.raises(ConfigError, match=r"trainer.packing=true .* task 'sst2' is classification; fix: "
                                          r"trainer.packing=false"):
        validate(cfg, check_data=False)


def test_packing_buckets_under_graphs():
    from types import SimpleNamespace

    cfg = SimpleNamespace(compile="auto", fused_loss="auto", length_buckets=None, max_seq_len=1024)
    cuda = torch.device("cuda", 0)
    assert accel.plan(cfg, cuda, None, parameters=10**9, packed_width=4096).buckets == 16  # 256-token widths
    assert accel.plan(cfg, torch.device("cpu"), None, packed_width=4096).buckets == 0  # the total itself


def test_run_with_packing_matches_the_padded_run(tiny_llama, tiny_data, tmp_path):
    """E2E on a tiny LLaMA through ``python run.py``: packed and padded runs train the same adapter."""
    from safetensors.torch import load_file

    from conftest import run_cli, tiny_args

    adapters = []
    for name, packing in (("padded", "false"), ("packed", "true")):
        out = tmp_path / name
        proc = run_cli(*tiny_args(tiny_llama, "task=e2e", "task.generation.max_new_tokens=2",
                                  f"trainer.packing={packing}", f"hydra.run.dir={out}"), data_dir=tiny_data)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((out / "result.json").read_text())
        assert result["status"] == "completed" and ("packed=True" in result["fast_path"]) == (packing == "true")
        adapters.append(load_file(str(out / "adapter" / "adapter.safetensors")))
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=1e-5, rtol=1e-4)
    assert any(adapters[0][k].abs().max() > 0 for k in adapters[0] if k.endswith("lora_B"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention needs a GPU")
def test_packed_varlen_attention_on_the_gpu_equals_the_padded_batch():
    """bf16 on a GPU: the packed row through torch's variable-length flash attention against the padded batch
    through SDPA's causal kernel: the same loss and adapter gradients within bf16 rounding."""
    import lowrank

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, pad_token_id=0)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()
    lowrank.adapt(model, "lora", targets=["q", "k", "v", "o"], rank=4)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.02)
    examples = sequences()
    calls, results = [], []
    real = accel._varlen_causal

    def spy(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    for packed in (False, True):
        batch = collate(examples, 0, "generation", packed=packed, width=32 if packed else None, device="cuda")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(accel, "_varlen_causal", spy)
            loss = batch_loss(model, model, batch, "generation", fused=True)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results.append((loss.float(), [g.float() for g in grads]))
    assert calls and all(calls)  # the variable-length path ran, in every layer
    (padded, g_padded), (packed, g_packed) = results
    torch.testing.assert_close(packed, padded, rtol=2e-2, atol=0)
    for a, b in zip(g_packed, g_padded):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_packing_a_model_that_cannot_pack_is_refused_before_any_job(tiny_bert, tiny_data, tmp_path):
    """A sweep over trainer.packing on a BERT (no packed attention): the preflight refuses it in one line, naming the
    model type, before the first job (packing=false) runs."""
    from conftest import run_cli, tiny_args

    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *tiny_args(tiny_bert, "task=e2e", "trainer.packing=false,true", f"hydra.sweep.dir={sweep}"),
                   data_dir=tiny_data)
    assert proc.returncode == 2
    assert "trainer.packing=true: model_type='bert' is not one of the families" in proc.stderr
    assert "fix: trainer.packing=false" in proc.stderr
    assert not list(sweep.rglob("result.json"))  # no job ran
