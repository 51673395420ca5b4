"""Quantized bases (model.quantize, lowrank.quantize): NF4 against float64 references of QLoRA's definition
(arXiv 2305.14314 §3, Appendix E), adapters on an NF4 base against a float model of the dequantized weights,
merging, the cost model, the runner. The CUDA tests compare with PEFT + bitsandbytes QLoRA and the compiled blocks
with eager steps, and skip without CUDA and bitsandbytes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import lowrank
from lowrank.quantize import BLOCK, NF4_VALUES, SCALE_BLOCK, Int8Linear, NF4Linear, dequantize, quantize, \
    quantized_layers


def nf4_reference() -> np.ndarray:
    """The 16 NF4 values from their definition (QLoRA §3 / Appendix E, bitsandbytes' create_normal_map): quantiles
    of N(0, 1) at 8 evenly spaced probabilities from δ = 0.9677083 to ½ for the positive half, 7 for the negative,
    plus an exact 0, normalised to [-1, 1] — in float64."""
    from scipy.stats import norm

    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    return values / values.max()


def tiny_llama(hidden=128, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_nf4_values_are_the_papers():
    ref = nf4_reference()
    assert np.abs(np.array(NF4_VALUES) - ref).max() < 1e-6
    assert len(set(NF4_VALUES)) == 16 and 0.0 in NF4_VALUES


def test_nf4_round_trip_matches_a_float64_quantiser():
    """Each weight is the NF4 value nearest to w/absmax of its 64-block (float64 reference codes) times that block's
    double-quantized absmax, which is within one 8-bit step of the true absmax of the block."""
    torch.manual_seed(1)
    w = torch.randn(96, 256) * 0.02  # 24576 weights: not whole 64·256 blocks, so the padded path is used too
    layer = NF4Linear(_linear_with(w))
    deq = layer.dequantize(torch.float32).double().reshape(-1, BLOCK)
    blocks = w.double().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    values = torch.tensor(nf4_reference())
    normalised = blocks / absmax
    codes = (normalised[..., None] - values).abs().argmin(-1)
    # the block scale ours used: deq / value (any nonzero value of the block)
    scale = torch.stack([(d[v != 0] / v[v != 0]).median() for d, v in zip(deq, values[codes])])[:, None]
    near_midpoint = ((normalised[..., None] - (values[1:] + values[:-1]) / 2).abs() < 1e-4).any(-1)
    assert torch.allclose(deq[~near_midpoint], (values[codes] * scale)[~near_midpoint], rtol=1e-6, atol=1e-9)
    assert near_midpoint.float().mean() < 0.01
    # second level: 8 bits over each 256-block of (absmax - mean), the constants of the zero padding (to whole
    # 64·256 blocks) included, at steps of range/128: error ≤ half a step (a whole one where +range clamps at 127)
    padded = torch.cat([absmax.flatten(), absmax.new_zeros(-w.numel() % (BLOCK * SCALE_BLOCK) // BLOCK)])
    centred = padded - padded.mean()
    step = centred.reshape(-1, SCALE_BLOCK).abs().amax(1).repeat_interleave(SCALE_BLOCK)[: absmax.numel()] / 128
    error = (scale - absmax).abs().flatten()
    assert (error <= step + 1e-9).all() and (error <= step * 0.5 + 1e-9).float().mean() > 0.95
    # storage: 4 bits + 8-bit constants + float32 second-level constants (+ the zero padding to 64·256)
    assert layer.storage_bytes() < 0.53 * 32768 and layer.predicted_bytes() == pytest.approx(24576 * (0.5 + 1 / 64 + 4 / 16384))


def _linear_with(w: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)


def test_int8_is_rowwise_absmax():
    torch.manual_seed(2)
    w = torch.randn(16, 32, dtype=torch.float64)
    layer = Int8Linear(_linear_with(w.float()))
    scale = w.abs().amax(1, keepdim=True) / 127
    ref = torch.round(w / scale) * scale
    assert torch.allclose(layer.dequantize(torch.float64), ref, atol=1e-6)
    assert layer.qweight.dtype == torch.int8 and layer.storage_bytes() == 16 * 32 + 16 * 4


@pytest.mark.parametrize("adapter,options", [("lora", {"rank": 4}), ("dora", {"rank": 4}), ("flora", {"rank": 4}),
                                             ("ia3", {}), ("lora", {"rank": 4, "method": "int8"})])
def test_adapters_on_a_quantized_base_equal_the_dequantized_float_model(adapter, options):
    """Forward and adapter gradients on an NF4 (int8) base equal those of a float model holding the dequantized
    weights in plain nn.Linear layers, with the same adapter weights."""
    options = dict(options)
    method = options.pop("method", "nf4")
    model = tiny_llama()
    summary = quantize(model, method)
    assert summary["layers"] == 14 and "lm_head" not in " ".join(quantized_layers(model))
    ref = dequantize(copy.deepcopy(model))
    assert not quantized_layers(ref)
    lowrank.adapt(model, adapter, **options)
    lowrank.adapt(ref, adapter, **options)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn_like(p) * 0.05)
    ref.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    ids = torch.randint(0, 64, (2, 12))
    out, expected = model(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads and grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_qdora_magnitude_is_the_norm_of_the_dequantized_base():
    model = tiny_llama()
    quantize(model, "nf4")
    lowrank.adapt(model, "dora", rank=4, targets=["q"])
    layer = next(iter(lowrank.adapted_modules(model).values()))
    w0 = layer.base.dequantize(torch.float32).double()
    torch.testing.assert_close(layer.magnitude.double(), w0.norm(dim=1), rtol=1e-6, atol=1e-8)


def test_merge_into_a_quantized_base_is_refused_or_dequantized():
    model = tiny_llama()
    quantize(model, "nf4")
    lowrank.adapt(model, "lora", rank=4)
    with torch.no_grad():
        for layer in lowrank.adapted_modules(model).values():
            layer.lora_B.normal_(std=0.05)
    ids = torch.randint(0, 64, (1, 8))
    before = model(ids).logits
    with pytest.raises(ValueError, match="nf4-quantized base.*dequantize=True") as err:
        lowrank.merge_adapters(model)
    assert "\n" not in str(err.value)
    lowrank.merge_adapters(model, dequantize=True)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert not any(type(layer.base) is not nn.Linear for layer in lowrank.adapted_modules(model).values())
    assert quantized_layers(model)  # the layers without an adapter stay in NF4
    lowrank.merge_and_unload(model, dequantize=True)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert not quantized_layers(model) and not lowrank.adapted_modules(model)


def test_what_would_write_into_a_quantized_base_is_refused_in_one_line():
    model = tiny_llama()
    quantize(model, "int8")
    with pytest.raises(ValueError, match=r"cannot initialise \(init=pissa\) from the weight of a int8-quantized") as e:
        lowrank.adapt(model, "lora", rank=2, targets=["q"], init="pissa")
    assert "\n" not in str(e.value) and not lowrank.adapted_modules(model)
    lowrank.adapt(model, "dora", rank=2, targets=["q"])
    layer = next(iter(lowrank.adapted_modules(model).values()))
    with pytest.raises(ValueError, match="cannot merge into a int8-quantized base"):
        layer.merge()
    assert not layer.merged


def test_cost_model_counts_the_4bit_base():
    from lowrank.runner import costs

    model = tiny_llama()
    summary = quantize(model, "nf4")
    lowrank.adapt(model, "lora", rank=4)
    small = costs.predict(model, batch=1, seq=8, autocast=False, kind="generation")
    lowrank.adapt(base := tiny_llama(), "lora", rank=4)
    ref = costs.predict(base, batch=1, seq=8, autocast=False, kind="generation")
    # the linear layers' float32 bytes (4 per weight) become 0.5 + 1/64 + 4/16384 per weight
    saved = summary["params"] * (4 - (0.5 + 1 / 64 + 4 / 16384))
    assert ref.frozen_weights - small.frozen_weights == pytest.approx(saved, abs=summary["layers"])
    assert small.flops_forward == ref.flops_forward


def test_config_rejects_an_unknown_method_and_full_fine_tuning():
    from test_config import composed

    from lowrank.runner.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"model.quantize='nf3' is unknown; fix: one of none, nf4, int8"):
        validate(composed("model.quantize=nf3"), check_data=False)
    with pytest.raises(ConfigError, match="adapter=full trains every weight"):
        validate(composed("model.quantize=nf4", "adapter=full"), check_data=False)
    with pytest.raises(ConfigError, match="adapter.init=pissa writes the residual"):
        validate(composed("model.quantize=nf4", "adapter.init=pissa"), check_data=False)
    assert validate(composed("model.quantize=nf4", "adapter=dora"), check_data=False).model.quantize == "nf4"


def test_run_on_an_nf4_base_records_it(tiny_llama, tiny_data, tmp_path):
    from conftest import run_cli, tiny_args

    out = tmp_path / "run"
    proc = run_cli(*tiny_args(tiny_llama, "task=e2e", "task.generation.max_new_tokens=2", "model.quantize=nf4",
                              "adapter=dora", f"hydra.run.dir={out}"), data_dir=tiny_data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["config"]["model"]["quantize"] == "nf4"
    q = result["quantization"]
    assert q["method"] == "nf4" and q["kernel"] == "torchao" and q["layers"] == 14 and q["block"] == 64


cuda_bnb = pytest.mark.skipif(not torch.cuda.is_available() or __import__("importlib").util.find_spec("bitsandbytes")
                              is None, reason="needs CUDA and bitsandbytes")


@cuda_bnb
@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_equals_peft_with_bitsandbytes_on_the_same_nf4_weights(use_dora):
    """Ours (NF4Linear over bitsandbytes) and PEFT's LoRA/DoRA over bitsandbytes' Linear4bit, holding the same
    packed NF4 weights and the same adapter weights: logits and adapter gradients agree within bf16 tolerance."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(hidden=256).to(device="cuda", dtype=torch.bfloat16)
    theirs = copy.deepcopy(model)
    quantize(model, "nf4")
    for name, layer in quantized_layers(model).items():  # the same packed weights in bitsandbytes' Linear4bit
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=True, device="cuda")
        q.weight = bnb.nn.Params4bit(layer.packed, requires_grad=False, quant_state=layer.quant_state, blocksize=64,
                                     compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=q)
        q.quant_state = layer.quant_state
        parent, _, child = name.rpartition(".")
        setattr(theirs.get_submodule(parent), child, q)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lowrank.adapt(model, "dora" if use_dora else "lora", rank=8, alpha=16, targets=["q", "k", "v", "o"])
    theirs = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=use_dora))
    torch.manual_seed(4)
    mine = lowrank.adapted_modules(model)
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict) and "default" in module.lora_A:
            layer = mine[name.removeprefix("base_model.model.")]
            with torch.no_grad():
                layer.lora_B.normal_(std=0.02)
                module.lora_A["default"].weight.copy_(layer.lora_A)
                module.lora_B["default"].weight.copy_(layer.lora_B)
                if use_dora:
                    module.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    ids = torch.randint(0, 64, (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours, peft_out = model(ids, labels=ids), theirs(ids, labels=ids)
    torch.testing.assert_close(ours.logits.float(), peft_out.logits.float(), rtol=2e-2, atol=2e-2)
    ours.loss.backward()
    peft_out.loss.backward()
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict) and "default" in module.lora_A:
            layer = mine[name.removeprefix("base_model.model.")]
            g, ref = layer.lora_A.grad.float(), module.lora_A["default"].weight.grad.float()
            assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6


def test_peers_bars_take_the_fastest_peer_and_the_lowest_memory():
    from benchmarks.peers import bars, table

    def row(ms, gb, mfu=None):
        return {"summary": {"step_ms": ms, "peak_gb": gb, "mfu": mfu}}

    result = {"cases": {"llama1b:lora:qkvo": {"ours": row(40.0, 6.0), "ours-nf4": row(45.0, 4.0),
                                               "hf": row(160.0, 10.0), "hf+compile": row(80.0, 7.0, 0.3),
                                               "unsloth": row(100.0, 6.5), "hf-qlora": row(150.0, 8.0),
                                               "unsloth-4bit": row(90.0, 5.0)}}}
    lines = bars(result)
    assert lines[0].startswith("- llama1b:lora:qkvo ours: step 0.50× the fastest peer (hf+compile;")
    assert "peak 6.0 GB vs the lowest peer's 6.5 GB" in lines[0]
    assert "no step can be under 0.30× hf+compile's" in lines[0]  # 4·N·T at the ceiling
    assert "step 0.50× the fastest peer (unsloth-4bit; 0.30× hf-qlora, 0.50× unsloth-4bit)" in lines[1]
    assert table(result).count("\n") == 2 + 6


@pytest.mark.integration
def test_the_gguf_smollm2_base_is_requantized_to_nf4_from_its_float_weights():
    """SmolLM2 ships as a 4-bit GGUF file; with model.quantize=nf4 its dequantized float weights become NF4: every
    linear layer but the head, each within NF4's error of the float weight (float64 reference: ‖Ŵ − W‖ / ‖W‖)."""
    from omegaconf import OmegaConf

    from lowrank.runner import models
    from lowrank.runner.config import CONF_DIR

    cfg, task = OmegaConf.load(CONF_DIR / "model" / "smollm2.yaml"), OmegaConf.create({"kind": "generation"})
    dense, _ = models.load(cfg, task)
    cfg.quantize = "nf4"
    model, _ = models.load(cfg, task)
    assert model.lowrank_quantization["layers"] == 7 * model.config.num_hidden_layers
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        w = dense.get_submodule(name).weight.double()
        error = (model.get_submodule(name).dequantize(torch.float64) - w).norm() / w.norm()
        assert 0.01 < error < 0.15, (name, error)


@cuda_bnb
def test_compiled_nf4_base_equals_bitsandbytes_eager_on_cuda():
    """Blocks compiled over an NF4 base (the GPU fast path) give the loss and LoRA gradients of eager steps through
    bitsandbytes' matmul_4bit (checked against PEFT's QLoRA above) on the same storage, within bf16 tolerance."""
    from lowrank.runner import accel

    model = tiny_llama(hidden=256).to(device="cuda", dtype=torch.bfloat16)
    quantize(model, "nf4")
    lowrank.adapt(model, "lora", rank=8, alpha=16, targets=["q", "k", "v", "o"])
    for layer in lowrank.adapted_modules(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    compiled = copy.deepcopy(model)
    accel.compile(compiled)
    ids = torch.randint(0, 64, (2, 32), device="cuda")
    losses, grads = [], []
    for m in (model, compiled):
        loss = accel.causal_lm_loss(m, ids)
        loss.backward()
        losses.append(loss.float())
        grads.append(torch.cat([layer.lora_A.grad.float().flatten() for layer in lowrank.adapted_modules(m).values()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)
    assert (grads[1] - grads[0]).norm() <= 0.03 * grads[0].norm()
