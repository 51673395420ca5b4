"""benchmarks/gpu_step.py on the CPU with tiny models: the harness runs end to end, every variant
agrees with the float32 reference, and identical adapter weights reach ours and PEFT."""

from __future__ import annotations

import importlib.util
import json
import types

import pytest
import torch

pytest.importorskip("peft")

from benchmarks import assemble, gpu_step, step_variants  # noqa: E402


def test_variant_parsing():
    v = gpu_step.Variant.parse("ours:dora:compile+cg")
    assert (v.impl, v.adapter, v.base) == ("ours", "dora", "compile+cg")
    assert gpu_step.base_tokens("cg") == {"cg", "compile"}
    for bad in ("ours+dfn:dora:plain", "peft:flora:plain", "ours:lora:turbo", "theirs:lora:plain",
                "ours:lora:plain+compile"):
        with pytest.raises(ValueError):
            gpu_step.Variant.parse(bad)


def test_harness_end_to_end(tmp_path):
    out = tmp_path / "tiny.json"
    partial = tmp_path / "rows.json"
    rc = gpu_step.main(["--preset", "tiny-llama", "--device", "cpu", "--threads", "1", "--ranks", "4", "--targets", "qv",
                        "--steps", "2", "--warmup", "1", "--fast", "fused", "--variants", "peft:lora:plain",
                        "ours:lora:fused", "peft:dora:plain", "ours:dora:fused", "ours:flora:fused",
                        "--out", str(out), "--partial", str(partial)])
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 5 and all(r["status"] == "ok" for r in result["rows"])
    for r in result["rows"]:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["trainable_params"] > 0
        assert r["agreement"]["ok"], r
        assert r["agreement"]["vs_fp32"]["grad_rel"] < 1e-4  # float32 preset: same function
    assert any(c["check"].startswith("agreement") and c["ok"] for c in result["checks"])
    assert rc in (0, 1)  # CPU timings decide the speed checks; the structure is what is tested here
    assert len(json.loads(partial.read_text())) == 5


def test_ours_and_peft_get_identical_weights():
    sv = step_variants
    preset = sv.PRESETS["tiny-llama"]
    base, _ = sv.build_base(preset, torch.device("cpu"), torch.float32)
    for adapter in ("lora", "dora"):
        ours_v, peft_v = sv.Variant("ours", adapter, "plain"), sv.Variant("peft", adapter, "plain")
        ours, ours_layers, _ = sv.build_variant(base, ours_v, preset, 4, ["q", "k", "v", "o"], None)
        weights = sv.canonical_weights(base, peft_v, 4, ours_layers)
        sv.load_weights(ours_layers, ours_v, weights)
        peft, peft_layers, _ = sv.build_variant(base, peft_v, preset, 4, ["q", "k", "v", "o"], weights)
        assert set(weights) == set(ours_layers) == set(peft_layers)
        ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(ours(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert all(w["B"].abs().sum() > 0 for w in weights.values())  # the update is not zero


def test_assemble_from_partial_rows(tmp_path):
    rows = [{"preset": "tiny-llama", "variant": "peft:lora:plain", "impl": "peft", "adapter": "lora",
             "base": "plain", "rank": 4, "targets": "qv", "status": "ok", "error": None, "step_ms": 10.0,
             "step_ms_p10": 9.0, "step_ms_p90": 11.0, "tokens_per_s": 100.0, "peak_mem_gib": 1.0,
             "peak_reserved_gib": 1.2, "mfu": 0.3, "first_step_s": 1.0, "trainable_params": 10,
             "agreement": {"ok": True, "vs_fp32": {"grad_rel": 0.01, "hidden_rel": 0.01, "loss_abs": 0.0}}}]
    partial, log, out = tmp_path / "rows.json", tmp_path / "log.txt", tmp_path / "out.json"
    partial.write_text(json.dumps(rows))
    log.write_text('{"python": "3.12", "torch": "x"}\nmatmul ceiling (torch.bfloat16): 700.0 TFLOP/s\n'
                   'tiny-llama: random init, 1.0M params, N(matmul)=0.5M, batch 2x64, torch.float32\n')
    assemble.main(["--partial", str(partial), "--env-log", str(log), "--preset", "tiny-llama", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["matmul_ceiling_tflops"] == 700.0 and result["rows"][0]["run"] == "main"
    assert result["checks"][-1]["ok"]


def test_interleaved_cpu_timing(tmp_path):
    out = tmp_path / "bert.json"
    gpu_step.main(["--preset", "tiny-bert", "--ranks", "2", "--targets", "qkvo", "--steps", "2", "--warmup", "1",
                   "--threads", "1", "--interleave", "--variants", "peft:lora:plain", "ours:lora:plain",
                   "peft:dora:plain", "ours:dora:plain", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["peft:lora:plain", "ours:lora:plain", "peft:dora:plain",
                                            "ours:dora:plain"]
    assert all(r["status"] == "ok" and r["step_ms"] > 0 and r["agreement"]["ok"] for r in rows)


def test_step_breakdown_variants_compute_the_models_loss(tmp_path):
    """benchmarks/step_breakdown.py's fused q,k,v / gate,up experiment and its packed row compute the padded
    model's own loss (CPU, float32)."""
    from benchmarks import step_breakdown

    out = tmp_path / "breakdown.json"
    step_breakdown.main(["--preset", "tiny-llama", "--device", "cpu", "--variants", "eager", "eager+fused-proj",
                         "eager+packed", "--steps", "1", "--seq", "16", "--out", str(out)])
    plain, fused, packed = json.loads(out.read_text())["rows"]
    assert fused["first_loss"] == pytest.approx(plain["first_loss"], rel=1e-6)
    assert packed["first_loss"] == pytest.approx(plain["first_loss"], rel=1e-6)
    assert plain["step_ms"] > 0 and fused["step_ms"] > 0


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


def _bnb_nf4(w: torch.Tensor, nested: bool):
    """bitsandbytes' NF4 storage of ``w`` (``step_breakdown.bnb_stored``'s order) and its own dequantisation."""
    import bitsandbytes as bnb
    from benchmarks.step_breakdown import bnb_stored

    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4",
                                                 quant_storage=torch.uint8)
    layer = types.SimpleNamespace(packed=packed, quant_state=state)
    return bnb_stored(layer), bnb.functional.dequantize_4bit(packed, state)


@needs_bnb
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("shape", [(96, 256), (3, 40), (300, 1000)])
@pytest.mark.parametrize("nested", [True, False])
def test_traced_nf4_dequantize_reads_bitsandbytes_storage_exactly(shape, nested, device):
    """step_breakdown's traced NF4 experiment: its dequantisation equals bitsandbytes' dequantize_4bit bit for bit, with and without
    double quantisation, where the matrix is not whole 64-blocks (3 × 40) or its constants not whole 256-blocks."""
    from benchmarks.step_breakdown import nf4_dequantize

    torch.manual_seed(5)
    stored, ref = _bnb_nf4(torch.randn(shape, device=device) * 0.05, nested)
    assert torch.equal(nf4_dequantize(stored, shape, torch.float32), ref)
    assert torch.equal(nf4_dequantize(stored, shape, torch.bfloat16), ref.to(torch.bfloat16))


@needs_bnb
def test_traced_nf4_linear_compiled_saves_the_stored_bytes_not_the_weight():
    """step_breakdown's traced NF4 experiment, compiled: x Wᵀ over NF4 storage and its input gradient equal float64 products with
    bitsandbytes' dequantized W, and the backward keeps only the stored bytes: no tensor of W's size."""
    from benchmarks.step_breakdown import nf4_linear

    torch.manual_seed(6)
    shape = (256, 512)
    stored, w = _bnb_nf4(torch.randn(shape) * 0.05, nested=True)
    x = torch.randn(8, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = torch.compile(nf4_linear)(x, stored, shape)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(y.double(), x.detach().double() @ w.double().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), grad.double() @ w.double(), rtol=1e-5, atol=1e-5)
    assert saved and max(saved) <= stored[0].numel() < w.numel()
