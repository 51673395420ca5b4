"""Speed options for training adapters on a frozen transformers model; the model stays the
transformers model (same modules, same state dict, same outputs up to bf16 rounding).

With the base frozen, most of a step's time outside the big matrix products goes to memory-bound
work in the base model (RMSNorm, rotary embedding, the SwiGLU activation, residual adds) and to the
vocabulary-sized loss (a 4×2048×32000 logits tensor, upcast to float32, written and read several
times). Three independent options attack it; ``benchmarks/gpu_step.py`` measures each:

- ``compile(model)``: regional ``torch.compile`` — each repeated transformer block (the decoder or
  encoder layers, adapters included) is compiled in place with ``nn.Module.compile``. The blocks share
  one compiled graph, so compiling costs one block's time, not the whole model's, and the rest of the
  model (embedding, mask, loss) stays eager.
- ``liger(model)``: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) on a LLaMA-family instance, patched
  onto this instance only (no class or module global stays replaced outside its forward).
- ``causal_lm_loss(model, input_ids, labels)`` / ``linear_cross_entropy``: the LM head and the
  cross-entropy fused and chunked over tokens, so the logits never exist whole; the gradient with
  respect to the hidden states is computed during the forward, chunk by chunk (each chunk through
  inductor on a GPU, eager PyTorch otherwise; Liger's kernel on request). Equal to transformers'
  ``ForCausalLMLoss`` (mean over non-ignored shifted labels).
- ``causal_sdpa(model, width)``: a causal LM's SDPA attention with ``is_causal=True`` and no mask tensor, also
  under compilation and inside a CUDA-graph capture.

None of these touch the adapter layers; they apply to PEFT models too (a ``PeftModel`` is unwrapped),
which is how the benchmark gives both sides the same base speed-ups.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "FastPath",
    "plan",
    "prepare",
    "eager",
    "compile",
    "repeated_blocks",
    "liger",
    "liger_available",
    "linear_cross_entropy",
    "causal_lm_loss",
    "causal_sdpa",
    "packed_attention",
    "packed_inputs",
    "packing_blocker",
    "refuse_packing",
    "sliding_window",
    "unwrap",
]


# ---------------------------------------------------------------------------------------------------
# helpers

def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    return model


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks: the longest ``nn.ModuleList`` whose items are all of
    one class (``model.layers`` of a LLaMA, ``encoder.layer`` of a BERT)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            items = list(module)
            if items and len({type(m) for m in items}) == 1:
                best = items
    if not best:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of identical blocks to compile; "
                         "pass blocks=... explicitly")
    return best


# ---------------------------------------------------------------------------------------------------
# torch.compile

def compile(model: nn.Module, *, blocks: list[nn.Module] | None = None, mode: str | None = None,
            fullgraph: bool = False, dynamic: bool | None = False, backend: str = "inductor",
            cache_size_limit: int | None = 64) -> nn.Module:
    """Compile each repeated block of ``model`` in place (regional compilation); returns ``model``.

    Call it after ``lowrank.adapt`` (the adapters are compiled with the block). The first forward
    and backward compile one block (tens of seconds on a GPU); the other blocks reuse it. ``mode`` is
    ``torch.compile``'s (``None``, ``"max-autotune-no-cudagraphs"``...). Modules keep their class and
    parameter names, so saving and ``lowrank.adapted_modules`` are unaffected.
    """
    if cache_size_limit is not None:
        import torch._dynamo

        cfg = torch._dynamo.config
        cfg.cache_size_limit = max(cfg.cache_size_limit, cache_size_limit)
        if hasattr(cfg, "accumulated_cache_size_limit"):
            cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4 * cache_size_limit)
    for block in blocks if blocks is not None else repeated_blocks(unwrap(model)):
        block.compile(mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    return model


def eager(model: nn.Module):
    """A context in which the compiled blocks of ``model`` run their eager forward (evaluation and
    generation, whose many shapes would each need a compiled graph); a no-op for uncompiled models."""
    stack = contextlib.ExitStack()
    for module in unwrap(model).modules():
        compiled = getattr(module, "_compiled_call_impl", None)
        if compiled is not None:
            module._compiled_call_impl = None
            stack.callback(setattr, module, "_compiled_call_impl", compiled)
    return stack


# ---------------------------------------------------------------------------------------------------
# the trainer's fast path

@dataclass(frozen=True)
class FastPath:
    """What the trainer does for speed, resolved from the config for one device (``plan``)."""
    compile: str = "off"       # off | inductor | inductor+cudagraphs | inductor+whole-graph | cudagraphs | whole-graph
    fused_loss: bool = False   # causal LMs: LM head + cross-entropy fused and chunked
    buckets: int = 0           # pad batches to one of this many fixed widths (0: to the longest sequence)
    packed: bool = False       # causal LMs: each micro-batch one packed row (trainer.packing, data.pack)

    def describe(self) -> str:
        packed = " packed=True" if self.packed else ""
        return f"compile={self.compile} fused_loss={self.fused_loss} length_buckets={self.buckets}{packed}"


#: compile modes in which the training loop captures each micro-batch's forward and backward as one CUDA graph
#: (``lowrank.runner.graphs``)
WHOLE_GRAPH = ("whole-graph", "inductor+whole-graph")

#: What ``lowrank.runner.loss.can_fuse`` says of a classification task: no reason to warn, the fused loss never
#: applies there
NOT_CAUSAL_LM = "the task is not a causal LM"

#: Below this many parameters a model is launch-bound on a GPU: replaying the step's eager kernels as a CUDA
#: graph saves most of it, and inductor's code generation costs more start-up than it saves in a run of a few
#: hundred steps (MiniLM, 22.7M, 250 steps on an H200, per process: inductor+cudagraphs 7.6 ms/step and 33 s,
#: the blocks as CUDA graphs 9.5 ms/step and 23 s, eager 45 ms/step and 34 s; benchmarks/README.md).
SMALL_MODEL = 100_000_000


def plan(cfg, device: torch.device, fuse_blocker: str | None, parameters: int = 0,
         graph_blocker: str | None = None, packed_width: int = 0) -> FastPath:
    """Resolve ``trainer.compile``/``fused_loss``/``length_buckets`` for ``device``.

    ``compile``: ``inductor`` (regional ``torch.compile`` of the blocks), ``inductor+cudagraphs`` (the same,
    each block's forward and backward replayed as CUDA graphs: ``mode="reduce-overhead"``),
    ``inductor+whole-graph`` (the compiled blocks, and the whole forward and backward of a micro-batch around
    them captured as one CUDA graph per batch shape, ``lowrank.runner.graphs``), ``cudagraphs`` (the blocks
    captured as CUDA graphs through ``torch.compile(backend="cudagraphs")``, no code generation),
    ``whole-graph`` (the eager forward and backward of a micro-batch as one CUDA graph per batch shape: no
    tracing, no code generation, milliseconds to capture), ``off``. ``auto``: on CUDA, ``whole-graph`` for
    models under ``SMALL_MODEL`` ``parameters`` and ``inductor+whole-graph`` for larger ones (where
    ``graph_blocker`` says why the whole step cannot be one graph: ``cudagraphs`` and ``inductor+cudagraphs``);
    ``off`` on the CPU (compiling costs more than it saves in the CPU's short runs). A whole-step graph
    launches the step's kernels at once: with the blocks replayed one graph each, the GPU idles between
    them while the host launches the next (benchmarks/README.md, "Where the 1.1 B step goes").
    ``fused_loss`` ``auto``: on for causal LMs on CUDA. ``length_buckets`` ``null``: ``whole-graph`` one
    graph per 16 tokens of ``max_seq_len`` (at most 8: a capture is cheap, padding is not); other CUDA-graph
    modes 1 (every batch padded to ``max_seq_len``) up to 128 tokens, else 3 (each bucket is a
    compilation); without graphs 0 (pad to the longest sequence); packed rows (``packed_width``: the longest
    packed row, rows × ``max_seq_len``) under CUDA graphs one width per 256 tokens. ``fuse_blocker`` says why
    the fused loss cannot apply (None: it can).
    """
    cuda = device.type == "cuda"
    mode = cfg.compile if cfg.compile != "auto" else (
        "off" if not cuda else "inductor+whole-graph" if parameters >= SMALL_MODEL else "whole-graph")
    if "graph" in mode and not cuda:
        fallback = "off" if mode == "whole-graph" else "inductor"
        log.warning("trainer.compile=%s needs CUDA; using %s", mode, fallback)
        mode = fallback
    if mode in WHOLE_GRAPH and graph_blocker is not None:
        blocks = "cudagraphs" if mode == "whole-graph" else "inductor+cudagraphs"
        if cfg.compile == mode:
            log.warning("trainer.compile=%s does not apply: %s; capturing the blocks instead (%s)",
                        mode, graph_blocker, blocks)
        mode = blocks
    fused = cfg.fused_loss == "on" or (cfg.fused_loss == "auto" and cuda)
    if fused and fuse_blocker is not None:
        if cfg.fused_loss == "on" and fuse_blocker != NOT_CAUSAL_LM:
            log.warning("trainer.fused_loss=on does not apply: %s; using the model's loss", fuse_blocker)
        fused = False
    buckets = cfg.length_buckets
    if buckets is None:
        if packed_width:
            buckets = 0 if "graph" not in mode else max(1, -(-packed_width // 256))
        elif mode == "whole-graph":
            buckets = min(8, max(1, cfg.max_seq_len // 16))
        else:
            buckets = 0 if "graph" not in mode else 1 if cfg.max_seq_len <= 128 else 3
    return FastPath(compile=mode, fused_loss=fused, buckets=int(buckets), packed=bool(packed_width))


def prepare(model: nn.Module, path: FastPath) -> nn.Module:
    """Make the trainable tensors float32 masters (adapters, head: the frozen base may be bf16) and
    compile the blocks as ``path`` says (``whole-graph`` is captured by the loop: ``lowrank.runner.graphs``);
    returns ``model``."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if path.compile == "cudagraphs":
        compile(model, backend="cudagraphs", dynamic=None)
    elif path.compile in ("inductor", "inductor+cudagraphs", "inductor+whole-graph"):
        compile(model, mode="reduce-overhead" if path.compile == "inductor+cudagraphs" else None, dynamic=None)
    return model


# ---------------------------------------------------------------------------------------------------
# Liger kernels for the frozen base

def liger_available() -> bool:
    """Whether Liger kernels can run here (the package imports and a CUDA device is present)."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("liger_kernel.transformers.functional")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def _rms_norm_forward(self, hidden_states):
    from liger_kernel.transformers.functional import liger_rms_norm

    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
    return liger_rms_norm(hidden_states, self.weight, eps, offset=0.0, casting_mode="llama", in_place=True)


def _swiglu_forward(self, x):
    from liger_kernel.transformers.functional import liger_swiglu

    return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def liger(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True) -> nn.Module:
    """Put Liger's RMSNorm, SwiGLU and RoPE kernels into a LLaMA-family model instance; returns it.

    Only this instance changes: norms and MLPs get a new bound ``forward``; for RoPE the modeling
    module's ``apply_rotary_pos_emb`` is swapped for Liger's during this model's forward only (the
    attention code looks it up there), and restored afterwards. Needs ``liger-kernel`` and a GPU.
    """
    if not liger_available():
        raise RuntimeError("Liger kernels need the liger-kernel package and a CUDA device "
                           "(pip install liger-kernel); use lowrank.runner.accel.compile instead")
    lm = unwrap(model)
    family = getattr(getattr(lm, "config", None), "model_type", None)
    if family not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"lowrank.runner.accel.liger supports LLaMA-family models (llama, mistral, qwen2, qwen3), "
                         f"not model_type={family!r}; use lowrank.runner.accel.compile")
    act = getattr(lm.config, "hidden_act", "silu")
    for module in lm.modules():
        name = type(module).__name__
        if rms_norm and name.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            module.forward = types.MethodType(_rms_norm_forward, module)
        if swiglu and name.endswith("MLP") and act in ("silu", "swish") and all(
                hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_swiglu_forward, module)
    if rope:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        modeling = importlib.import_module(type(lm).__module__)
        if not hasattr(modeling, "apply_rotary_pos_emb"):
            raise ValueError(f"{modeling.__name__} has no apply_rotary_pos_emb to replace; pass rope=False")
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
        inner = decoder.forward

        def forward_with_liger_rope(*args, **kwargs):
            original = modeling.apply_rotary_pos_emb
            modeling.apply_rotary_pos_emb = liger_rotary_pos_emb
            try:
                return inner(*args, **kwargs)
            finally:
                modeling.apply_rotary_pos_emb = original

        decoder.forward = forward_with_liger_rope
    return model


# ---------------------------------------------------------------------------------------------------
# fused linear + cross-entropy

def _chunk(h, weight, bias, lab, valid, n, need_h: bool, need_w: bool, need_b: bool):
    """One chunk of rows of the fused cross-entropy: the chunk's summed loss and its gradients with respect to
    ``h``, ``weight`` and ``bias`` (None where not needed), from the chunk's softmax."""
    acc = n.dtype
    logits = F.linear(h, weight, bias).to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(valid, lab, torch.zeros_like(lab))
    target_logit = logits.gather(1, safe[:, None]).squeeze(1)
    total = torch.where(valid, lse - target_logit, torch.zeros_like(lse)).sum()
    if not (need_h or need_w or need_b):
        return total, None, None, None
    grad = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
    grad.scatter_add_(1, safe[:, None], -valid.to(grad.dtype)[:, None])
    grad.mul_((valid.to(grad.dtype) / n)[:, None])
    g = grad.to(h.dtype)
    return (total, g @ weight.to(h.dtype) if need_h else None, g.t().to(acc) @ h.to(acc) if need_w else None,
            grad.sum(0) if need_b else None)


_compiled_chunk = None
#: float32 logits per chunk of the fused cross-entropy (its default ``chunk_rows``)
CHUNK_LOGITS_BYTES = 64 * 2**20


def _chunk_fn(compiled: bool):
    """``_chunk``, or ``_chunk`` through inductor (one fused kernel for the upcast, log-sum-exp, softmax and
    its scaling around the two matrix products; compiled once per chunk shape: every chunk has ``chunk_rows``
    rows, the last one padded)."""
    global _compiled_chunk
    if not compiled:
        return _chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk, dynamic=False)
    return _compiled_chunk


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean CE(hidden @ weightᵀ + bias, labels) over non-ignored rows, chunked over rows.

    The gradients are computed in the forward (the chunk's softmax is at hand there) and saved; the
    backward only scales them, so no chunk of logits outlives its iteration. No host synchronisation: the
    whole loss can sit inside a CUDA graph.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_rows, compiled):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32 for bf16/fp16, float64 stays
        valid_all = labels != ignore_index
        n = valid_all.sum().clamp_min(1).to(acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        chunk = _chunk_fn(compiled)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, lab, valid = hidden[rows], labels[rows], valid_all[rows]
            short = chunk_rows - h.shape[0] if compiled else 0  # one shape for every chunk: pad the last one
            if short:
                h, lab, valid = F.pad(h, (0, 0, 0, short)), F.pad(lab, (0, short)), F.pad(valid, (0, short))
            part, gh, gw, gb = chunk(h, weight, bias, lab, valid, n, need_h, need_w, need_b)
            total = total + part
            if need_h:
                grad_h[rows] = gh[:gh.shape[0] - short]
            if need_w:
                grad_w += gw
            if need_b:
                grad_b += gb
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        out = []
        for has, g, dtype in zip(ctx.has, saved, ctx.dtypes):
            out.append((g * grad_out.to(g.dtype)).to(dtype) if has else None)
        grad_h, grad_w, grad_b = out
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, impl: str = "auto",
                         chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=...)`` (mean over
    non-ignored rows) without materialising the (rows × vocabulary) logits.

    ``hidden`` (..., H), ``weight`` (V, H), ``labels`` (...). ``impl``: ``"compiled"`` (chunks of rows through
    inductor, GPU), ``"torch"`` (the same chunks in eager PyTorch, any device), ``"liger"`` (Liger's fused
    kernel, GPU; it reads the count of labels back to the host, so it cannot sit inside a CUDA graph) or
    ``"auto"`` (``compiled`` on a GPU, ``torch`` otherwise). ``chunk_rows`` (``torch``, ``compiled``)
    defaults to a multiple of 256 rows (the logits' matrix product on whole tiles) holding about 64 MiB of
    float32 logits, fewer where ``hidden`` has fewer rows, so that a model has at most a few chunk shapes.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    if h.shape[0] != lab.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} rows but labels has {lab.shape[0]}")
    if impl not in ("auto", "compiled", "torch", "liger"):
        raise ValueError(f"impl={impl!r}: use 'auto', 'compiled', 'torch' or 'liger'")
    if impl == "auto":
        impl = "compiled" if h.is_cuda else "torch"
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(h, weight, lab, bias=bias, ignore_index=ignore_index)
    if chunk_rows is None:
        per_chunk = max(256, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]) // 256 * 256)
        chunk_rows = min(per_chunk, -(-h.shape[0] // 256) * 256)
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, lab, ignore_index, int(chunk_rows), impl == "compiled")


#: transformers' SDPA attention registered under a name its mask factory does not know: a model set to it builds
#: no attention mask (``create_causal_mask`` returns the mask it was given, None) and SDPA runs with
#: ``is_causal=True``. transformers skips the mask itself only where it can read the padding mask: not inside a
#: CUDA-graph capture, and under ``torch.compile`` only from transformers 5.24 with torch 2.14; elsewhere it
#: builds the full (batch × 1 × seq × seq) mask and SDPA runs a masked kernel.
CAUSAL_SDPA = "lowrank_causal_sdpa"


def sliding_window(config) -> int | None:
    """The sliding-window width of a transformers ``config`` whose attention uses one (None where none applies)."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


@contextlib.contextmanager
def _attention(model: nn.Module, name: str, function):
    """``model``'s attention implementation set to ``function`` (registered with transformers as ``name``)."""
    from transformers import AttentionInterface

    config = unwrap(model).config
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, function)
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def causal_sdpa(model: nn.Module, width: int):
    """A context in which a causal LM using SDPA attention runs it with ``is_causal=True`` and no mask tensor on
    sequences of ``width`` tokens.

    Exact whenever the forward gets no attention mask (every position is a real token) or the padding is on
    the right and the padded positions are not scored: under causal attention a position never attends to
    the ones after it. Models on another attention implementation, or with a sliding window shorter than
    ``width`` (which needs its mask), are left as they are."""
    config = getattr(unwrap(model), "config", None)
    window = sliding_window(config)
    if getattr(config, "_attn_implementation", None) != "sdpa" or (window is not None and window < width):
        return contextlib.nullcontext()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return _attention(model, CAUSAL_SDPA, sdpa_attention_forward)


# ---------------------------------------------------------------------------------------------------
# packed rows: attention within each sequence

#: transformers attention implementation for a packed row (``lowrank.runner.data.pack``): causal attention within
#: each sequence, whose boundaries (``cu_seq_lens_q``) transformers passes from the forward's keyword arguments to
#: the attention function; like ``CAUSAL_SDPA``, a name the mask factory does not know, so no mask is built
PACKED = "lowrank_packed"
#: model types whose forward takes ``position_ids`` and passes its keyword arguments down to the attention
#: function (tests/test_packing.py checks each against the padded batch's loss)
PACKING_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "granite")


def packing_blocker(config, max_len: int) -> str | None:
    """Why a model of this transformers ``config`` cannot train on packed rows of sequences of at most
    ``max_len`` tokens (None when it can)."""
    family = getattr(config, "model_type", None)
    if family not in PACKING_FAMILIES:
        return (f"model_type={family!r} is not one of the families whose attention takes the sequences' "
                f"boundaries ({', '.join(PACKING_FAMILIES)})")
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in (None, "sdpa", "eager"):
        return f"attention implementation {implementation!r} (packing replaces sdpa or eager)"
    window = sliding_window(config)
    if window is not None and window < max_len:
        return (f"the model attends within a sliding window of {window} tokens, shorter than "
                f"trainer.max_seq_len={max_len}, which packed attention does not apply")
    return None


def refuse_packing(config, max_len: int) -> None:
    """Raise ``ConfigError`` (one line) where ``packing_blocker`` says why ``trainer.packing=true`` cannot apply."""
    why = packing_blocker(config, max_len)
    if why is not None:
        from lowrank.runner.config import ConfigError

        raise ConfigError(f"trainer.packing=true: {why}; fix: trainer.packing=false")


@functools.lru_cache(maxsize=1)
def _varlen_parameters() -> frozenset[str] | None:
    """The keyword parameters of ``torch.nn.attention.varlen.varlen_attn`` (None where this torch has none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_causal(query, key, value, cu, width: int, scaling: float | None) -> torch.Tensor | None:
    """Causal flash attention over the sequences of one packed row (torch's variable-length path); None where
    this torch's ``varlen_attn`` cannot express the call."""
    params = _varlen_parameters()
    head_dim = query.shape[-1]
    if params is None or (scaling is not None and "scale" not in params and abs(scaling - head_dim ** -0.5) > 1e-12):
        return None
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, head_dim)
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params and scaling is not None:
        kw["scale"] = scaling
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu, cu, width, width, **kw)[None]


def packed_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask=None, dropout: float = 0.0, scaling: float | None = None, *,
                             cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function signature for one packed row: ``query`` (1, heads, tokens, head_dim),
    ``key``/``value`` (1, kv heads, tokens, head_dim); returns (1, tokens, heads, head_dim) and no weights.
    On a GPU in bf16/fp16, torch's variable-length flash attention; elsewhere SDPA with the block-diagonal
    causal mask built from the boundaries (the same attention, as a dense mask)."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("packed attention needs one packed row and its cu_seq_lens_q (lowrank.runner.data.pack)")
    width = query.shape[2]
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not (module.training and dropout):
        out = _varlen_causal(query, key, value, cu_seq_lens_q, width, scaling)
        if out is not None:
            return out, None
    positions = torch.arange(width, device=query.device)
    segment = torch.searchsorted(cu_seq_lens_q[1:].to(torch.int64), positions, right=True)
    allowed = (segment[:, None] == segment[None, :]) & (positions[:, None] >= positions[None, :])
    if key.shape[1] != query.shape[1]:
        key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def packed_inputs(batch: dict) -> dict:
    """The forward's keyword arguments for a packed row: its positions and its sequences' boundaries."""
    return {"position_ids": batch["position_ids"], "cu_seq_lens_q": batch["cu_seq_lens"]}


def packed_attention(model: nn.Module):
    """A context in which ``model`` (a ``PACKING_FAMILIES`` model) attends within each sequence of a packed row
    (``packed_inputs`` gives the forward the boundaries)."""
    return _attention(model, PACKED, packed_attention_forward)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                   attention_mask: torch.Tensor | None = None, ignore_index: int = -100, impl: str = "auto",
                   **kwargs) -> torch.Tensor:
    """transformers' causal-LM loss (``model(input_ids, labels=labels).loss``) with the LM head and the
    cross-entropy fused (``linear_cross_entropy``): the logits are never materialised.

    ``labels`` default to ``input_ids``; they are shifted inside, as transformers does. Works on a
    ``*ForCausalLM`` model or a PEFT model around one (adapters on the LM head are not supported).
    """
    lm = unwrap(model)
    config = getattr(lm, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise ValueError(f"causal_lm_loss does not implement {attr}={getattr(config, attr)}; use the model's loss")
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"causal_lm_loss needs a plain nn.Linear LM head, got {type(head).__name__} "
                         "(an adapted head? use the model's own loss)")
    decoder = lm.get_decoder()
    with causal_sdpa(lm, input_ids.shape[-1]) if attention_mask is None else contextlib.nullcontext():
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    labels = input_ids if labels is None else labels
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return linear_cross_entropy(hidden, head.weight, shifted, bias=head.bias, ignore_index=ignore_index,
                                impl=impl)
