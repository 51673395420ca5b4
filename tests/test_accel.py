"""lowrank.runner.accel: the fused linear cross-entropy against F.cross_entropy, causal_lm_loss against
transformers' own loss (plain and PEFT-wrapped models), regional compilation keeping the model intact,
and the trainer's fast path: what ``auto`` resolves to per device, float32 trainables over a bf16 base,
and a compiled, bucketed, fused-loss run ending with the numbers of the plain run."""

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


def test_compiled_linear_cross_entropy_matches_reference():
    """The chunks through inductor (the GPU default) against the float64 formula, chunks of two shapes."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(23, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(31, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 31, (23,), generator=g)
    labels[::3] = -100
    ref = F.cross_entropy(F.linear(h, w), labels, ignore_index=-100)
    (ref_h,) = torch.autograd.grad(ref, [h])
    got = accel.linear_cross_entropy(h, w, labels, impl="compiled", chunk_rows=10)
    (got_h,) = torch.autograd.grad(got, [h])
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_h, ref_h)


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


# ---- the trainer's fast path -------------------------------------------------------------------------

@pytest.fixture
def tiny_llama_dir(request):
    """conftest's tiny LLaMA model folder (this module's ``tiny_llama`` builds one in memory)."""
    return request.getfixturevalue("tiny_llama")


class _Trainer:
    def __init__(self, compile="auto", fused_loss="auto", length_buckets=None, max_seq_len=64):
        self.compile, self.fused_loss, self.length_buckets, self.max_seq_len = (compile, fused_loss,
                                                                               length_buckets, max_seq_len)


def test_plan_resolves_auto_per_device_and_keeps_the_off_switches():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU
    assert accel.plan(_Trainer(), cpu, None) == accel.FastPath("off", False, 0)
    assert accel.plan(_Trainer(), cuda, None, parameters=10**9) == accel.FastPath("inductor+whole-graph", True, 1)
    assert accel.plan(_Trainer(), cuda, None, parameters=10**9,
                      graph_blocker="DDP").compile == "inductor+cudagraphs"  # the compiled blocks, a graph each
    assert accel.plan(_Trainer(compile="inductor+whole-graph"), cpu, None).compile == "inductor"
    small = accel.plan(_Trainer(), cuda, None, parameters=22_713_986)  # launch-bound: one graph per step shape
    assert small == accel.FastPath("whole-graph", True, 4)  # 64 tokens: widths 16, 32, 48, 64
    assert accel.plan(_Trainer(), cuda, None, parameters=22_713_986,
                      graph_blocker="DDP").compile == "cudagraphs"  # the blocks alone
    assert accel.plan(_Trainer(compile="whole-graph"), cuda, None, graph_blocker="DDP").compile == "cudagraphs"
    assert accel.plan(_Trainer(compile="whole-graph"), cpu, None).compile == "off"
    assert accel.plan(_Trainer(max_seq_len=1024), cuda, None).buckets == 8
    assert accel.plan(_Trainer(max_seq_len=512), cuda, None, parameters=10**9).buckets == 3
    assert accel.plan(_Trainer(), cuda, "the task is not a causal LM").fused_loss is False
    assert accel.plan(_Trainer(compile="off", fused_loss="off"), cuda, None) == accel.FastPath("off", False, 0)
    assert accel.plan(_Trainer(compile="cudagraphs"), cpu, None).compile == "inductor"  # no CUDA graphs on a CPU
    assert accel.plan(_Trainer(fused_loss="on", length_buckets=4), cpu, None) == accel.FastPath("off", True, 4)


@pytest.mark.parametrize("fused", [False, True])
def test_causal_lm_loss_needs_no_padding_mask(fused):
    """The training loss of a right-padded causal-LM batch (no attention mask) against each sequence's loss
    computed alone, unpadded, in float64: token-weighted mean of the shifted next-token NLL."""
    from lowrank.runner.data import collate
    from lowrank.runner.loss import batch_loss

    model = tiny_llama().double().eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (5, 12, 9)]
    batch = collate({"input_ids": seqs, "labels": seqs}, 0, "generation")
    assert (batch["attention_mask"] == 0).any()  # padded
    masks = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
        for layer in model.model.layers]
    got = batch_loss(model, model, batch, "generation", fused=fused)
    for hook in hooks:
        hook.remove()
    assert masks == [None] * len(hooks)  # SDPA's causal kernel, no mask tensor (accel.causal_sdpa)
    assert model.config._attn_implementation == "sdpa"  # put back
    nll, tokens = 0.0, 0
    for s in seqs:
        ids = torch.tensor([s])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        tokens += len(s) - 1
    assert got.item() == pytest.approx(nll / tokens, rel=1e-6)  # the loss is taken in float32


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_causal_lm_loss_is_the_mean_over_target_tokens_and_zero_without_any(label_smoothing):
    from lowrank.runner.data import IGNORE
    from lowrank.runner.loss import loss_fn

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    labels[0, 4:] = IGNORE
    scored = labels[:, 1:] != IGNORE
    logp = torch.log_softmax(logits[:, :-1].detach(), -1)[scored]
    target = labels[:, 1:][scored]
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    expected = ((1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)).mean()
    assert loss_fn(logits, labels, "generation", label_smoothing).item() == pytest.approx(expected.item(), rel=1e-6)
    none = loss_fn(logits, torch.full_like(labels, IGNORE), "generation", label_smoothing)
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(logits.grad).all()  # every target truncated: 0, not NaN


def test_bucket_widths():
    from lowrank.runner.data import bucket_width

    # max_len 64 in 3 buckets: 64·1/3 = 21 -> 24, 64·2/3 = 42 -> 48, 64
    assert [bucket_width(n, 64, 3) for n in (1, 24, 25, 48, 49, 64)] == [24, 24, 48, 48, 64, 64]
    assert bucket_width(17, 64, 1) == 64 and bucket_width(17, 64, 0) == 17
    assert bucket_width(70, 64, 3) == 70  # longer than the maximum (not truncated): its own width


def test_prepare_keeps_a_bf16_base_and_float32_trainables():
    from lowrank.runner.models import weight_dtype

    assert weight_dtype("auto", torch.device("cuda", 0), True) == torch.bfloat16
    assert weight_dtype("auto", torch.device("cuda", 0), False) == torch.float32
    assert weight_dtype("auto", torch.device("cpu"), True) == torch.float32
    model = tiny_bert().to(torch.bfloat16)
    lowrank.adapt(model, "lora", targets=["q", "v"], rank=2)
    model.classifier.weight.requires_grad_(True)
    accel.prepare(model, accel.FastPath())
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert frozen and set(frozen.values()) == {torch.bfloat16}


def test_fast_path_run_matches_the_plain_run(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    """E2E on a tiny LLaMA: compiled blocks (dynamo + AOT autograd; inductor's code generation is what the
    GPU measurement covers), batches padded to 2 fixed widths and the fused loss give the adapter and the
    eval loss of the plain run (model logits + cross-entropy, batches padded to their longest) up to
    float32 rounding."""
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from lowrank.runner import app
    from lowrank.runner.config import CONF_DIR

    real_compile = accel.compile
    monkeypatch.setattr(accel, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": "aot_eager"}))
    results, adapters = [], []
    for name, fast in (("plain", ["trainer.compile=off", "trainer.fused_loss=off"]),
                       ("fast", ["trainer.compile=inductor", "trainer.fused_loss=on", "trainer.length_buckets=2"])):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"model.pretrained={tiny_llama_dir}", "model.name=tiny", "task=e2e",
                                               "trainer=smoke", "logger=none", "trainer.save_weights_at=[]",
                                               "task.generation.max_new_tokens=2", f"paths.data_dir={tiny_data}",
                                               *fast])
        cfg.paths.output_dir = str(tmp_path / name)
        results.append(app.run(cfg))
        adapters.append(load_file(str(tmp_path / name / "adapter" / "adapter.safetensors")))
        torch._dynamo.reset()
    assert [r["status"] for r in results] == ["completed", "completed"], results[1].get("error")
    assert "compile=inductor fused_loss=True length_buckets=2" == results[1]["fast_path"]
    assert results[1]["final"]["eval/loss"] == pytest.approx(results[0]["final"]["eval/loss"], rel=1e-5)
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=2e-6, rtol=1e-4)
    assert any(adapters[0][k].abs().max() > 0 for k in adapters[0] if k.endswith("lora_B"))
