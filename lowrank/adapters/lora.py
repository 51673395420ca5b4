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

from lowrank.adapters.base import (AdaptedLayer, apply_matrix, check_rank_fits, conv_input, refuse_quantized,
                                   to_native)


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
                 rslora: bool = False, init: str = "default", conv_form: str = "peft"):
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
        init_from_weight(self, init)

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

    # ---- initialisations from W (``init``, see init_from_weight) ---------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW against the original pretrained W0: after a PiSSA/MiLoRA/OLoRA init the base holds the residual
        W0 − s·B0A0, so ΔW = s(BA − B0A0)."""
        delta = super().delta_weight()
        if self.lora_A0 is not None:
            delta = delta - (self.lora_B0 @ self.lora_A0) * self.scaling
        return delta

    def original_matrix(self) -> torch.Tensor:
        """The pretrained W0 (float32, (out, in), while unmerged): the base weight plus s·B0A0 after an init
        from W, the base weight itself otherwise."""
        w = self.base_matrix().detach().float()
        if self.lora_A0 is not None:
            w = w + (self.lora_B0 @ self.lora_A0) * self.scaling
        return w

    def release(self) -> nn.Module:
        """The base as before ``adapt``: unmerged, and W0 put back after an init from W (PiSSA, MiLoRA, OLoRA)."""
        self.unmerge()
        restore_pretrained(self)
        return self.base

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
        check_init(options.get("init", "default"), target.name, fused=True)
        check_rank_fits(rank, target, rows=min(len(rows) for rows in target.slices.values()))
        return FusedLoRA(target.module, target.slices, rank, alpha, **kw)
    conv_form = options.get("conv_form", "peft")
    if conv_form != "loralib":  # loralib's ConvLoRA factors (r·k, in·k) and (out·k, r·k): no such bound
        check_rank_fits(rank, target)
    return LoRA(target.module, rank, alpha, init=options.get("init", "default"), conv_form=conv_form, **kw)


def read_factors(module: str, tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, dict]:
    """A saved LoRA/DoRA module's factors: ``{"A": (r, in), "B": (out, r), "scaling"}`` (+ ``magnitude``);
    a fused projection adapted in slices gives one entry per slice, keyed ``"<module>[q]"``."""
    if f"{module}.lora_A" in tensors:
        A, B = tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]
        if f"{module}.lora_A0" in tensors:  # an init from W: ΔW = s(BA − B0A0) in PEFT's rank-2r form
            A, B = converted_factors(A, B, tensors[f"{module}.lora_A0"], tensors[f"{module}.lora_B0"])
        entry = {"A": A, "B": B, "scaling": scaling}
        if f"{module}.magnitude" in tensors:
            entry["magnitude"] = tensors[f"{module}.magnitude"]
        return {module: entry}
    prefix, out = f"{module}.slices.", {}
    for key in tensors:
        if key.startswith(prefix) and key.endswith(".lora_A"):
            part = key[len(prefix):-len(".lora_A")]
            out[f"{module}[{part}]"] = {"A": tensors[key], "B": tensors[f"{prefix}{part}.lora_B"], "scaling": scaling}
    return out


# ==== initialisations from the pretrained weight (``init``): PiSSA, MiLoRA, OLoRA ========================
# PiSSA (Meng et al. 2024, arXiv 2404.02948): A, B from the top-r singular triplets of W; MiLoRA (Wang et al.
# 2024, arXiv 2406.09044): the bottom r; OLoRA (Büyükakyüz 2024, arXiv 2406.01775): the first r columns of
# Q and rows of R of W = QR. In each the base becomes the residual W0 − s·B0A0, so the model's function is
# unchanged at step 0; A0, B0 are kept (persistent buffers ``lora_A0``/``lora_B0``) so that ΔW is measured
# against the original W0. Factors as PEFT's ``pissa_init``/``olora_init`` (tuners/lora/layer.py):
# A = diag(√(S_r/s)) Vhᵣ, B = Uᵣ diag(√(S_r/s)); OLoRA: B = Qᵣ, A = Rᵣ.

INITS = ("default", "pissa", "milora", "olora")


def check_init(init, name: str, fused: bool = False) -> None:
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}; use e.g. init=pissa")
    if fused and init != "default":
        raise ValueError(f"init={init!r} on slices of the fused projection {name!r} is not supported; use "
                         f"init=default there, or a model with separate q/k/v projections")


def init_factors(w: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` (float64) from an (out, in) weight ``w`` for ``init`` (pissa, milora, olora)."""
    w = w.double()
    if init == "olora":
        Q, R = torch.linalg.qr(w)
        return R[:rank].contiguous(), Q[:, :rank].contiguous()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    keep = slice(0, rank) if init == "pissa" else slice(S.numel() - rank, S.numel())
    root = (S[keep] / scaling).sqrt()
    return root[:, None] * Vh[keep], U[:, keep] * root


@torch.no_grad()
def init_from_weight(layer: LoRA, init: str) -> None:
    """Set A, B from the layer's weight (``init``) and make the base the residual; ``default`` keeps loralib's."""
    check_init(init, type(layer.base).__name__)
    layer.register_buffer("lora_A0", None)
    layer.register_buffer("lora_B0", None)
    if init == "default":
        return
    refuse_quantized(layer.base, f"initialise (init={init}) from the weight of")  # the residual needs a float base
    if layer.kind not in ("linear", "conv1d"):
        raise ValueError(f"init={init!r} needs a Linear or Conv1D base, not a {type(layer.base).__name__}; "
                         f"use init=default there")
    w0 = layer.base_matrix().detach()
    A0, B0 = init_factors(w0, layer.rank, layer.scaling, init)
    layer.lora_A.copy_(A0)
    layer.lora_B.copy_(B0)
    layer.lora_A0, layer.lora_B0 = A0.float().clone(), B0.float().clone()
    residual = w0.double() - layer.scaling * (B0 @ A0)
    layer.base.weight.copy_(to_native(layer.base, layer.kind, residual.to(w0.dtype)))


@torch.no_grad()
def restore_pretrained(layer) -> None:
    """Put the pretrained W0 back into the base of a layer initialised from W (base += s·B0A0, up to float32
    rounding), for taking the adapter off unmerged (a rolled-back load, removal); other layers are left alone."""
    if getattr(layer, "lora_A0", None) is None or layer.merged:
        return
    w = layer.base.weight
    w.copy_(to_native(layer.base, layer.kind, layer.original_matrix().to(w.dtype)))
    layer.lora_A0 = layer.lora_B0 = None


def converted_factors(A, B, A0, B0) -> tuple[torch.Tensor, torch.Tensor]:
    """s(BA − B0A0) as one rank-2r pair, [B, −B0] [A; A0]: PEFT's conversion of such adapters to plain LoRA
    on the original base (``LoraModel.subtract_mutated_init``)."""
    return torch.cat([A, A0.to(A.dtype)]), torch.cat([B, -B0.to(B.dtype)], dim=1)


def initial_factors(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A0": A0, "<module>.lora_B0": B0}`` of the layers initialised from W."""
    out = {}
    for name, layer in layers.items():
        if getattr(layer, "lora_A0", None) is not None:
            out[f"{name}.lora_A0"], out[f"{name}.lora_B0"] = layer.lora_A0, layer.lora_B0
    return out
