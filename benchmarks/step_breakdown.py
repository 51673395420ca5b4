"""Where a causal LM's training step goes on a GPU, and what each stage of the fast path takes off it.

The job is ``gpu_step.py``'s LLaMA preset (random init, bf16 base, random tokens filling every row) at batch 4 ×
``--seq``, LoRA r = 8 (α = 16) on q,k,v,o with B random (every gradient is real), the fused loss, AdamW. Each
variant is a fresh copy of one base with the same adapter weights:

- ``blocks-cg``: each block compiled (regional inductor) and replayed as CUDA graphs (``reduce-overhead``), the
  loss's chunks eager (``trainer.compile=inductor+cudagraphs``);
- ``whole-eager-loss``: the compiled blocks and everything around them, embedding to loss and its backward,
  captured as one CUDA graph (``lowrank.runner.graphs.GraphedStep``: ``trainer.compile=inductor+whole-graph``),
  the loss's chunks eager (``impl="torch"``);
- ``whole``: the same with the loss's chunks through inductor (``impl="compiled"``): what ``python run.py`` does;
- ``whole+fused-proj``: ``whole`` with the frozen q,k,v and gate,up products fused into one matrix product each
  (the base weights become views of one concatenated matrix; LoRA's updates added to the slices): an
  experiment, not part of the library;
- ``whole+packed``: ``whole`` on the same tokens as one packed row, collated and scored as ``trainer.packing``
  does (``data.pack``, the runner's ``batch_loss``: attention within each sequence, each sequence's first token
  unscored), what packing costs where it saves no padding;
- ``whole+traced-nf4`` (with ``--quantize nf4``): ``whole`` with each NF4 product's dequantisation written in
  PyTorch operations (``nf4_dequantize``: bitsandbytes' storage, read bit for bit) and traced into the compiled
  block, where inductor fuses it into one kernel, instead of bitsandbytes' ``matmul_4bit`` (its dequantize
  kernel, then cuBLAS): an experiment, not part of the library;
- ``eager``, ``eager+fused-proj``, ``eager+packed``: no compilation, no graphs (the CPU smoke run's variants).

Per variant: the median step (CUDA events around forward, backward and AdamW), ``host_issue_ms`` (the host's
time for 10 steps without synchronising, ÷ 10: it includes waiting once the GPU's queue is full), peak memory
and the first loss (all variants must agree); for ``--profile`` variants, the kernels' time per step by kind
(torch.profiler, 3 steps).

    python -m benchmarks.step_breakdown --out benchmarks/results/step_breakdown_llama1b_h200.json
    python -m benchmarks.step_breakdown --preset tiny-llama --device cpu --variants eager eager+fused-proj --steps 2
    python -m benchmarks.step_breakdown --table benchmarks/results/step_breakdown_llama1b_h200.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import gc
import importlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.step_variants import PRESETS, Variant, apply_adapter, build_base, make_batch  # noqa: E402
from experiments.portable import portable  # noqa: E402
from lowrank.runner import accel  # noqa: E402
from lowrank.runner.data import collate  # noqa: E402
from lowrank.runner.graphs import GraphedStep  # noqa: E402
from lowrank.runner.loss import batch_loss  # noqa: E402

#: kernels listed by name in a profiled row, the longest first
TOP_KERNELS = 30
#: ``--sdpa``: the SDPA backend tried first (the others stay as fallbacks), PyTorch's own order by default
SDPA_BACKENDS = ("default", "cudnn", "flash", "efficient")
VARIANTS = ("blocks-cg", "whole-eager-loss", "whole", "whole+fused-proj", "whole+packed", "whole+traced-nf4", "eager",
            "eager+fused-proj", "eager+packed")


# ---------------------------------------------------------------------------------------------------
# the fused-projection experiment

def _linear(module: nn.Module) -> nn.Linear:
    return getattr(module, "base", module)  # an adapted layer wraps the nn.Linear as .base


def _fuse(owner: nn.Module, names: tuple[str, ...]) -> list[int]:
    """Concatenate the frozen weights of ``owner``'s ``names`` into one matrix (a buffer); each weight becomes a
    view of its rows. Returns the row counts."""
    layers = [_linear(getattr(owner, n)) for n in names]
    if any(lin.bias is not None for lin in layers):
        raise ValueError("the fused-projection experiment handles bias-free projections only")
    fused = torch.cat([lin.weight.data for lin in layers]).contiguous()
    sizes, start = [], 0
    for lin in layers:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        sizes.append(rows)
        start += rows
    owner.register_buffer("fused_weight", fused, persistent=False)
    return sizes


def _projections(owner: nn.Module, names: tuple[str, ...], sizes: list[int], x: torch.Tensor) -> list[torch.Tensor]:
    parts = list(F.linear(x, owner.fused_weight).split(sizes, -1))
    for i, name in enumerate(names):
        layer = getattr(owner, name)
        if hasattr(layer, "lora_output"):
            parts[i] = parts[i] + layer.lora_output(x).to(parts[i].dtype)
    return parts


def fuse_projections(model: nn.Module) -> None:
    """Fuse q,k,v and gate,up of every block of a LLaMA-family ``model`` (the training forward only: a call with
    a cache runs the block's own forward)."""
    modeling = importlib.import_module(type(model).__module__)
    qkv, gate_up = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn_sizes, mlp_sizes = _fuse(attn, qkv), _fuse(mlp, gate_up)
        own = attn.forward

        def attention(self, hidden_states, position_embeddings=None, attention_mask=None, _own=own,
                      _sizes=attn_sizes, **kwargs):
            if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
                return _own(hidden_states, position_embeddings, attention_mask, **kwargs)
            shape = (*hidden_states.shape[:-1], -1, self.head_dim)
            q, k, v = (p.view(shape).transpose(1, 2) for p in _projections(self, qkv, _sizes, hidden_states))
            q, k = modeling.apply_rotary_pos_emb(q, k, *position_embeddings)
            kernel = modeling.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            out, weights = kernel(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
            return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

        def mlp_forward(self, x, _sizes=mlp_sizes):
            gate, up = _projections(self, gate_up, _sizes, x)
            return self.down_proj(self.act_fn(gate) * up)

        attn.forward = types.MethodType(attention, attn)
        mlp.forward = types.MethodType(mlp_forward, mlp)


# ---------------------------------------------------------------------------------------------------
# the traced NF4 experiment

def nf4_dequantize(stored: tuple[torch.Tensor, ...], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' NF4 storage dequantized by PyTorch operations. ``stored`` is (packed, absmax, code) or, doubly
    quantized, (packed, absmax, code, absmax_code, absmax_scale, offset): ``packed`` holds two 4-bit codes a
    byte (the first element in the high half) and element i is ``code[index] · absmax[i // 64]`` in float32,
    rounded once to ``dtype``; doubly quantized, block constant j is
    ``absmax_code[absmax[j]] · absmax_scale[j // 256] + offset``."""
    from lowrank.quantize import BLOCK, SCALE_BLOCK

    packed, absmax, code, *nested = stored
    if nested:
        absmax_code, absmax_scale, offset = nested
        blocks = torch.arange(absmax.numel(), device=absmax.device) // SCALE_BLOCK
        absmax = absmax_code[absmax.long()] * absmax_scale[blocks] + offset
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 15), -1).reshape(-1)
    numel = shape[0] * shape[1]
    scales = absmax[torch.arange(numel, device=absmax.device) // BLOCK]
    return (code[codes[:numel].long()] * scales).to(dtype).view(shape)


def nf4_linear(x: torch.Tensor, stored: tuple[torch.Tensor, ...], shape: tuple[int, int]) -> torch.Tensor:
    """x Wᵀ for W in bitsandbytes' NF4 storage, the dequantisation checkpointed (compiled, the backward
    dequantizes again rather than keeping W)."""
    w = torch.utils.checkpoint.checkpoint(nf4_dequantize, stored, shape, x.dtype, use_reentrant=False)
    return F.linear(x, w)


def bnb_stored(layer) -> tuple[torch.Tensor, ...]:
    """An ``NF4Linear``'s bitsandbytes storage in ``nf4_dequantize``'s order."""
    s = layer.quant_state
    return (layer.packed, s.absmax, s.code, *((s.state2.code, s.state2.absmax, s.offset) if s.nested else ()))


def _traced_matmul(layer, x):
    return nf4_linear(x, bnb_stored(layer), (layer.out_features, layer.in_features))


# ---------------------------------------------------------------------------------------------------
# variants

def build(base: nn.Module, variant: str, device: torch.device, quantize: str = "none"):
    """``(step, params)``: ``step()`` runs one optimizer step of ``variant`` and returns the loss."""
    model = copy.deepcopy(base)
    if quantize != "none":
        from lowrank.quantize import quantize as to_quantized, quantized_layers

        to_quantized(model, quantize)
        if variant.endswith("+traced-nf4"):
            for layer in quantized_layers(model).values():
                layer._matmul = types.MethodType(_traced_matmul, layer)
    torch.manual_seed(0)
    layers = apply_adapter(model, Variant.parse("ours:lora:plain"), "llama", 8, ["q", "k", "v", "o"])
    g = torch.Generator().manual_seed(1)
    for _, layer in sorted(layers.items()):
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    if "fused-proj" in variant:
        fuse_projections(model)
    if variant != "eager" and not variant.startswith("eager+"):
        accel.compile(model, mode="reduce-overhead" if variant == "blocks-cg" else None)
    impl = "torch" if variant in ("whole-eager-loss", "blocks-cg") or variant.startswith("eager") else "compiled"
    params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward(batch):
        if variant == "blocks-cg":
            torch.compiler.cudagraph_mark_step_begin()
        loss = batch_loss(model, model, batch, "generation", fused=True, loss_impl=impl)
        loss.backward()
        return loss.detach()

    whole = variant.startswith("whole")
    run = GraphedStep(forward_backward, params, device) if whole else forward_backward
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step(batch):
        loss = run(batch)
        opt.step()
        opt.zero_grad(set_to_none=not whole)
        return loss

    return step, params


def packed(batch: dict) -> dict:
    """``batch``'s rows as one packed row, as ``trainer.packing`` collates a micro-batch (``data.pack``)."""
    rows = batch["input_ids"].tolist()
    return collate({"input_ids": rows, "labels": rows}, 0, "generation", packed=True,
                   device=batch["input_ids"].device)


def _kind(kernel: str) -> str:
    name = kernel.lower()
    if name.startswith("triton"):  # inductor's kernels are named after the operations they fuse
        return "inductor elementwise"
    if any(k in name for k in ("sdpa", "attention", "fmha", "flash", "dot_do_o", "convert_dq")):
        return "attention"  # before the products: flash kernels are CUTLASS templates
    if any(k in name for k in ("nvjet", "gemm", "cutlass", "splitk")):
        return "matrix products"
    if any(k in name for k in ("elementwise", "reduce", "copy", "scatter")):
        return "other elementwise"
    return "other"


def profile(step, batch, device) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(batch)
        torch.cuda.synchronize(device)
    kinds, names, kernels = collections.Counter(), collections.Counter(), 0
    for event in prof.key_averages():
        t = getattr(event, "self_device_time_total", 0)
        if event.device_type == torch.autograd.DeviceType.CUDA and t:
            kinds[_kind(event.key)] += t / 3e3
            names[event.key[:120]] += t / 3e3
            kernels += event.count / 3
    return {"kernel_ms": {k: round(v, 2) for k, v in kinds.most_common()},
            "kernel_ms_total": round(sum(kinds.values()), 2),
            "kernels_per_step": round(kernels),
            "top_kernels_ms": {k: round(v, 3) for k, v in names.most_common(TOP_KERNELS)}}


def sdpa_first(backend: str):
    """A context in which SDPA tries ``backend`` first (compiled graphs keep the choice made when traced)."""
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    return sdpa_kernel(order, set_priority=True)


def measure(base, variant: str, batch, device, steps: int, do_profile: bool, quantize: str = "none") -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step, _ = build(base, variant, device, quantize)
    batch = packed(batch) if variant.endswith("+packed") else {**batch, "labels": batch["input_ids"]}
    first = step(batch).item()
    for _ in range(3):
        step(batch)
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(batch)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step(batch)
            times.append(1e3 * (time.perf_counter() - t))
    row = {"variant": variant, "step_ms": round(statistics.median(times), 2), "first_loss": first}
    if cuda:
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(10):
            step(batch)
        row["host_issue_ms"] = round(1e2 * (time.perf_counter() - t), 2)
        torch.cuda.synchronize(device)
        row["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        if do_profile:
            row.update(profile(step, batch, device))
    return row


def table(result: dict) -> str:
    """The README table of a breakdown JSON (GPU idle: the step less its kernels' time, where profiled)."""
    kinds = ("matrix products", "attention", "inductor elementwise", "other elementwise", "other")
    lines = ["| variant | step (ms) | kernels (ms) | GPU idle (ms) | kernels by kind (ms): " + ", ".join(kinds)
             + " | kernels per step | peak (GB) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ms = r.get("kernel_ms")
        total = r.get("kernel_ms_total")
        idle = f"{r['step_ms'] - total:.2f}" if total else "–"
        split = ", ".join(str(ms.get(k, 0)) for k in kinds) if ms else "–"
        name = r["variant"] + (f" ({r['quantize']} base)" if "quantize" in r else "") + (
            f" (SDPA: {r['sdpa']} first)" if "sdpa" in r else "")
        lines.append(f"| {name} | {r['step_ms']} | {total or '–'} | {idle} | {split} | "
                     f"{r.get('kernels_per_step', '–')} | {r.get('peak_gb', '–')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama1b", choices=[k for k, v in PRESETS.items() if v["family"] == "llama"])
    p.add_argument("--device", default=None)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--variants", nargs="+", default=["blocks-cg", "whole-eager-loss", "whole", "whole+fused-proj"],
                   choices=VARIANTS)
    p.add_argument("--profile", nargs="*", default=["blocks-cg", "whole"], help="variants to profile")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quantize", default="none", choices=("none", "nf4", "int8"),
                   help="the frozen base quantized (lowrank.quantize) in every variant")
    p.add_argument("--sdpa", nargs="+", default=["default"], choices=SDPA_BACKENDS,
                   help="run every variant under each of these SDPA backends (tried first, the others as fallbacks; "
                        "packed rows use variable-length flash attention whatever the order)")
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None, help="print the table of a breakdown JSON and exit")
    args = p.parse_args(argv)
    traced = [v for v in args.variants if v.endswith("+traced-nf4")]
    if traced and (args.quantize != "nf4" or (args.device or PRESETS[args.preset]["device"]) != "cuda"):
        p.error(f"{traced[0]} reads bitsandbytes' NF4 storage: it needs --quantize nf4 on a CUDA device")
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    preset = dict(PRESETS[args.preset], seq=args.seq)
    device = torch.device(args.device or preset["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base, source = build_base(preset, device, dtype)
    batch = make_batch(preset, base, device)
    import transformers

    result = {"preset": args.preset, "batch": preset["batch"], "seq": args.seq, "source": source,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "command": portable("python -m benchmarks.step_breakdown "
                                  + " ".join(argv if argv is not None else sys.argv[1:])),
              "rows": []}
    for backend in args.sdpa:
        for variant in args.variants:
            with sdpa_first(backend):
                row = measure(base, variant, batch, device, args.steps,
                              variant in args.profile and device.type == "cuda", args.quantize)
            if backend != "default":
                row["sdpa"] = backend
            if args.quantize != "none":
                row["quantize"] = args.quantize
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top_kernels_ms"}), flush=True)
            torch._dynamo.reset()  # the next variant (or SDPA order) is traced afresh
            gc.collect()  # the previous variant's model, optimizer and graphs go before the next peak is taken
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
