"""Quantized frozen bases: ``quantize(model, "nf4" | "int8")`` stores every frozen ``nn.Linear`` of a model in
4 or 8 bits, and the adapters train on top (QLoRA, Dettmers et al. 2023, arXiv 2305.14314).

**NF4** (QLoRA §3): the weight matrix, flattened row-major, is cut into blocks of 64; each block is divided
by its absolute maximum and every element stored as the 4-bit index of the nearest of the 16 NormalFloat
values (Appendix E, ``NF4_VALUES``). *Double quantisation*: the 32-bit block constants are quantized again
with 8 bits in blocks of 256 after subtracting their mean, so the constants cost 8/64 + 32/(64·256) bits
per parameter instead of 32/64 — 4.127 bits in all, 0.516 byte (``NF4_BYTES_PER_PARAM``). Two kernels
store this format:

- CUDA: bitsandbytes (``quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`` and
  ``matmul_4bit``), the kernels PEFT's and Unsloth's QLoRA use; its second-level code is the 8-bit dynamic
  float of the paper.
- CPU (bitsandbytes' QLoRA kernels are CUDA ones): torchao's ``NF4Tensor`` (``to_nf4(w, 64, 256)``), the same
  NF4 values and blocks; its second-level code is int8 with one scale per 256 constants (also 8 bits per
  block). torchao needs whole blocks of 64·256 elements, so a matrix whose size is not a multiple of 16384
  is padded with zeros at its end (dropped on dequantisation; their zero constants take part in the mean and
  the 256-blocks of the second level, which bitsandbytes computes over the matrix's own blocks).

**int8**: weight-only int8 with one absmax scale per output row, the vector-wise weight quantisation of
LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339 §3.1), plain PyTorch on every device; the activations
stay in the compute dtype (no mixed-precision outlier decomposition).

Compute: the forward dequantizes the weight to the activations' dtype (bf16 under CUDA autocast or with
bf16 weights, float32 on the CPU) for each matmul and never keeps it: the backward dequantizes again for
the input gradient (the frozen weight gets none), as QLoRA's kernels do. Which layers: every ``nn.Linear``
except the output embedding (the LM head) and the task heads, as transformers' bitsandbytes integration
skips the output embedding; embeddings, norms and biases stay in the compute dtype.

An adapter reads the base weight through ``lowrank.adapters.base.base_weight``, which dequantizes: DoRA on an
NF4 base is QDoRA (the magnitude divides by the column norm of the dequantized W0 + ΔW), and ΔW analyses take
W0 as the dequantized base. Merging into a quantized base is refused (``merge_adapters(dequantize=True)``
first replaces each quantized base by its dequantized float Linear).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("none", "nf4", "int8")
#: The 16 NF4 values of QLoRA, Appendix E (arXiv 2305.14314), as printed there.
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
BLOCK, SCALE_BLOCK = 64, 256
#: Bytes per parameter of NF4 with double quantisation: 4 bits + an 8-bit constant per 64 + a float32 per 64·256.
NF4_BYTES_PER_PARAM = 0.5 + 1 / BLOCK + 4 / (BLOCK * SCALE_BLOCK)
#: int8: 1 byte + one float32 scale per row (counted per layer, ``QuantizedLinear.predicted_bytes``).


class QuantizationError(ValueError):
    """A quantisation setting that cannot run here (one line, naming the fix)."""


class _DequantizedLinear(torch.autograd.Function):
    """y = x Wᵀ with W dequantized in the forward and again in the backward, never saved."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored quantized. ``weight`` answers the dequantized matrix (for
    model code that reads it); ``dequantize(dtype)`` is the accessor; ``forward`` computes in ``x``'s dtype
    (the autocast dtype under autocast)."""

    method = "?"
    lowrank_quantized = True  # the marker lowrank.adapters.base.base_weight reads

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def storage_bytes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def predicted_bytes(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = self._matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def reset_parameters(self) -> None:  # a frozen, loaded weight: nothing to initialise
        pass

    def dense(self) -> nn.Linear:
        """A plain float ``nn.Linear`` holding the dequantized weight (the compute dtype)."""
        w = self.dequantize()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quantize={self.method}, compute={str(self.compute_dtype).removeprefix('torch.')}")


class NF4Linear(QuantizedLinear):
    """NF4 with double quantisation through bitsandbytes (CUDA) or torchao's NF4Tensor (CPU)."""

    method = "nf4"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach()
        self.numel = w.numel()
        if w.device.type == "cuda":
            bnb = _bitsandbytes()
            packed, state = bnb.functional.quantize_4bit(w.contiguous(), blocksize=BLOCK, compress_statistics=True,
                                                         quant_type="nf4", quant_storage=torch.uint8)
            self.kernel, self.packed, self.quant_state = "bitsandbytes", packed, state
        else:
            to_nf4 = _torchao_nf4()
            flat = w.reshape(-1)
            whole = BLOCK * SCALE_BLOCK
            if flat.numel() % whole:
                flat = torch.cat([flat, flat.new_zeros(whole - flat.numel() % whole)])
            self.kernel, self.nf4 = "torchao", to_nf4(flat.contiguous(), BLOCK, SCALE_BLOCK)
            # torchao picks the codes by the 16 values rounded to 4 decimals; dequantize with the paper's values
            # (bitsandbytes' table), so a code differs only where |w|/absmax lies within 5e-5 of a midpoint
            self.nf4.nf4 = torch.tensor(NF4_VALUES, dtype=self.nf4.nf4.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.kernel == "bitsandbytes":
            w = _bitsandbytes().functional.dequantize_4bit(self.packed, self.quant_state)
        else:
            w = self.nf4.get_original_weight()[: self.numel]
        return w.view(self.out_features, self.in_features).to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "bitsandbytes":
            return _bitsandbytes().matmul_4bit(x, self.packed.t(), quant_state=self.quant_state)
        return super()._matmul(x)

    def storage_bytes(self) -> int:
        if self.kernel == "bitsandbytes":
            s = self.quant_state
            tensors = [self.packed, s.absmax, s.state2.absmax, s.state2.code] if s.nested else [self.packed, s.absmax]
        else:
            t = self.nf4
            tensors = [t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean]
        return sum(x.numel() * x.element_size() for x in tensors)

    def predicted_bytes(self) -> float:
        return self.numel * NF4_BYTES_PER_PARAM

    def _apply(self, fn, recurse=True):  # .to(device) moves the packed weight and its constants too
        super()._apply(fn, recurse)
        if self.kernel == "bitsandbytes":
            moved = fn(self.packed)
            if moved.device != self.packed.device:
                self.packed = moved
                self.quant_state.to(moved.device)
        return self


class Int8Linear(QuantizedLinear):
    """Weight-only int8, one absmax scale per output row (LLM.int8()'s vector-wise weight quantisation)."""

    method = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def storage_bytes(self) -> int:
        return self.qweight.numel() + 4 * self.scale.numel()

    def predicted_bytes(self) -> float:
        return self.in_features * self.out_features + 4 * self.out_features


KINDS = {"nf4": NF4Linear, "int8": Int8Linear}


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizationError("quantize=nf4 on CUDA needs bitsandbytes, which is not installed; fix: "
                                "pip install 'lowrank[quant]' (or quantize on the CPU, which uses torchao)") from e
    return bitsandbytes


@functools.lru_cache(maxsize=1)
def _torchao_nf4():
    # torchao's import reports its optional CUDA extensions and Triton missing on a CPU machine: keep logs quiet
    logging.disable(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:
            try:
                from torchao.dtypes.nf4tensor import to_nf4
            except ImportError as e:
                raise QuantizationError("quantize=nf4 on the CPU needs torchao (its NF4Tensor), which is not "
                                        "installed; fix: pip install 'lowrank[quant]'") from e
        finally:
            logging.disable(logging.NOTSET)
    return to_nf4


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLinear)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _skipped(model: nn.Module) -> set[int]:
    from lowrank.core import HEAD_NAMES

    heads = {id(m) for name, m in model.named_modules() if set(name.split(".")) & {"lm_head", *HEAD_NAMES}}
    out = getattr(model, "get_output_embeddings", lambda: None)()
    return heads | ({id(out)} if out is not None else set())


def quantize(model: nn.Module, method: str) -> dict:
    """Replace every frozen ``nn.Linear`` of ``model`` (heads and the output embedding excepted) by its ``method``
    quantized layer, in place, on the device the weights are on. Returns a summary for result.json."""
    if method not in METHODS:
        raise QuantizationError(f"quantize={method!r} is not one of {METHODS}; use nf4 (QLoRA), int8 or none")
    summary = {"method": method, "layers": 0, "params": 0, "bytes": 0, "kernel": None}
    if method == "none":
        return summary
    skip = _skipped(model)
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and id(m) not in skip]
    if not names:
        raise QuantizationError(f"quantize={method}: {type(model).__name__} has no nn.Linear layer to quantize; "
                                f"use quantize=none")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = KINDS[method](getattr(owner, child))
        setattr(owner, child, layer)
        summary["layers"] += 1
        summary["params"] += layer.in_features * layer.out_features
        summary["bytes"] += layer.storage_bytes()
        summary["kernel"] = getattr(layer, "kernel", "torch")
    if method == "nf4":
        summary["block"], summary["scale_block"] = BLOCK, SCALE_BLOCK
    return summary


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a float ``nn.Linear`` of its dequantized weight (in place)."""
    for name, layer in quantized_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.dense())
    return model
