"""LoRA (Hu et al., 2021, arXiv 2106.09685): h = W0 x + (α/r) · B A x.

``lora_A`` has shape (r, in) and is Kaiming-uniform (a=√5) as in loralib's ``Linear``; ``lora_B`` has
shape (out, r) and starts at zero, so ΔW = (α/r) B A = 0 at initialisation. ``rslora=True`` uses
α/√r (Kalajdzievski 2023, PEFT's ``use_rslora``). Dropout acts on the input of the low-rank branch
only (loralib, PEFT).

Base kinds: Linear, GPT-2 Conv1D, Embedding (no dropout, PEFT's convention), Conv2d in one of two forms,
``conv_form``:

- ``peft`` (default; huggingface/peft ``tuners/lora/layer.py`` ``Conv2d``): A (r, in/groups·k·k) applied as a
  k×k convolution into r channels, B (out, r) as a 1×1 convolution; ΔW = (α/r) B A in the (out, in·k·k)
  layout; r·(in/groups·k² + out) parameters. A grouped convolution runs the dense ΔW through the base's
  grouped operation (a low-rank factorisation does not commute with grouping).
- ``loralib`` (microsoft/LoRA ``loralib/layers.py`` ``ConvLoRA``): A (r·k, in·k), B (out/groups·k, r·k), and
  ΔW = (α/r) · (B A).view(out, in/groups, k, k), r·k²·(in + out/groups) parameters, applied densely.
  ``lora_A``/``lora_B`` then hold loralib's shapes, not (r, in)/(out, r).

``FusedLoRA`` adapts chosen slices of a fused projection (GPT-2 ``c_attn``, GPT-NeoX
``query_key_value``): one independent (A, B) pair per slice, zero update elsewhere, like loralib's
``MergedLinear`` with ``enable_lora``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters.base import AdaptedLayer, apply_matrix, check_rank_fits, conv_input


CONV_FORMS = ("peft", "loralib")


def lora_scaling(alpha: float, rank: int, rslora: bool) -> float:
    """The update's scale: α/r (LoRA §4.1, arXiv 2106.09685), or α/√r with rsLoRA (arXiv 2312.03732)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def init_lora_pair(A: torch.Tensor, B: torch.Tensor) -> None:
    """loralib's initialisation: A Kaiming-uniform with a=√5, B zero."""
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _factor(shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    # Adapter weights are float32 masters whatever the base dtype (PEFT's autocast_adapter_dtype);
    # the forward casts them to the activation dtype, which is cheap (they are small).
    return nn.Parameter(torch.empty(shape, dtype=torch.float32, device=like.device))


class LoRA(AdaptedLayer):
    """LoRA on one whole weight matrix."""

    adapter_name = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, *, dropout: float = 0.0,
                 rslora: bool = False, conv_form: str = "peft"):
        super().__init__(base)
        if conv_form not in CONV_FORMS:
            raise ValueError(f"conv_form={conv_form!r} is unknown; choose one of {', '.join(CONV_FORMS)}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = lora_scaling(self.alpha, rank, rslora)
        self.loralib_conv = self.kind == "conv2d" and conv_form == "loralib"
        if self.loralib_conv:
            k = base.kernel_size[0]
            if base.kernel_size[0] != base.kernel_size[1]:
                raise ValueError(f"conv_form=loralib needs a square kernel, got {tuple(base.kernel_size)}; use "
                                 f"conv_form=peft")
            a_shape, b_shape = (rank * k, base.in_channels * k), (base.out_channels // base.groups * k, rank * k)
        else:
            a_shape, b_shape = (rank, self.in_features), (self.out_features, rank)
        self.lora_A = _factor(a_shape, base.weight)
        self.lora_B = _factor(b_shape, base.weight)
        init_lora_pair(self.lora_A, self.lora_B)
        self.lora_dropout = _dropout(dropout) if self.kind != "embedding" else nn.Identity()

    def _update_matrix(self) -> torch.Tensor:
        if self.loralib_conv:  # loralib's ConvLoRA: (B A) viewed as the kernel
            return (self.lora_B @ self.lora_A).view(self.base.weight.shape).flatten(1) * self.scaling
        return (self.lora_B @ self.lora_A) * self.scaling

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r) · B A x for an input already through dropout, in the activation dtype."""
        dtype = x.dtype if x.is_floating_point() else self.base.weight.dtype
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        if self.kind in ("linear", "conv1d"):
            return F.linear(F.linear(x, A), B) * self.scaling
        if self.kind == "embedding":
            return F.linear(apply_matrix(self.base, "embedding", x, A), B) * self.scaling
        base = self.base
        if self.loralib_conv:
            return apply_matrix(base, "conv2d", x, self._update_matrix().to(dtype))
        if base.groups != 1:  # a low-rank factorisation does not commute with grouping: go dense
            return apply_matrix(base, "conv2d", x, (B @ A) * self.scaling)
        x, padding = conv_input(base, x)
        h = F.conv2d(x, A.view(self.rank, *base.weight.shape[1:]), None, base.stride, padding, base.dilation)
        return F.conv2d(h, B[:, :, None, None]) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_output(self.lora_dropout(x)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


class LoRASlice(nn.Module):
    """One (A, B) pair of a fused projection, updating output rows ``rows``."""

    def __init__(self, in_features: int, rows: torch.Tensor, rank: int, like: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", rows, persistent=False)
        self.lora_A = _factor((rank, in_features), like)
        self.lora_B = _factor((len(rows), rank), like)
        init_lora_pair(self.lora_A, self.lora_B)


class FusedLoRA(AdaptedLayer):
    """LoRA on chosen slices (e.g. q and v) of a fused projection (e.g. GPT-2's c_attn)."""

    adapter_name = "lora"

    def __init__(self, base: nn.Module, slices: dict[str, torch.Tensor], rank: int, alpha: float | None = None,
                 *, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base)
        if self.kind not in ("linear", "conv1d"):
            raise ValueError(f"fused-slice LoRA needs a Linear or Conv1D base, got {type(base).__name__}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = lora_scaling(self.alpha, rank, rslora)
        self.slices = nn.ModuleDict({name: LoRASlice(self.in_features, rows, rank, base.weight)
                                     for name, rows in slices.items()})
        self.register_buffer("rows", torch.cat([s.rows for s in self.slices.values()]), persistent=False)
        self.lora_dropout = _dropout(dropout)

    def _update_matrix(self) -> torch.Tensor:
        blocks = torch.cat([s.lora_B @ s.lora_A for s in self.slices.values()]) * self.scaling
        return blocks.new_zeros(self.out_features, self.in_features).index_copy(0, self.rows, blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        x = self.lora_dropout(x)
        parts = [F.linear(F.linear(x, s.lora_A.to(x.dtype)), s.lora_B.to(x.dtype)) for s in self.slices.values()]
        return y.index_add(-1, self.rows, torch.cat(parts, -1).to(y.dtype), alpha=self.scaling)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, slices={list(self.slices)}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}")


def build(target, rank: int, alpha: float | None, options: dict) -> AdaptedLayer:
    """The registry's constructor: ``LoRA`` on a whole matrix, ``FusedLoRA`` on slices of a fused one."""
    kw = {"dropout": options.get("dropout", 0.0), "rslora": options.get("rslora", False)}
    if target.slices is not None:
        check_rank_fits(rank, target, rows=min(len(rows) for rows in target.slices.values()))
        return FusedLoRA(target.module, target.slices, rank, alpha, **kw)
    conv_form = options.get("conv_form", "peft")
    if conv_form != "loralib":  # loralib's ConvLoRA factors (r·k, in·k) and (out·k, r·k): no such bound
        check_rank_fits(rank, target)
    return LoRA(target.module, rank, alpha, conv_form=conv_form, **kw)


def read_factors(module: str, tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, dict]:
    """A saved LoRA/DoRA module's factors: ``{"A": (r, in), "B": (out, r), "scaling"}`` (+ ``magnitude``);
    a fused projection adapted in slices gives one entry per slice, keyed ``"<module>[q]"``."""
    if f"{module}.lora_A" in tensors:
        entry = {"A": tensors[f"{module}.lora_A"], "B": tensors[f"{module}.lora_B"], "scaling": scaling}
        if f"{module}.magnitude" in tensors:
            entry["magnitude"] = tensors[f"{module}.magnitude"]
        return {module: entry}
    prefix, out = f"{module}.slices.", {}
    for key in tensors:
        if key.startswith(prefix) and key.endswith(".lora_A"):
            part = key[len(prefix):-len(".lora_A")]
            out[f"{module}[{part}]"] = {"A": tensors[key], "B": tensors[f"{prefix}{part}.lora_B"], "scaling": scaling}
    return out
