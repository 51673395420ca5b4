"""DoRA (Liu et al., 2024, arXiv 2402.09353): W' = m · (W0 + ΔW) / ‖W0 + ΔW‖_c, ΔW = (α/r) B A.

``magnitude`` m has shape (out,) (one entry per output row of the (out, in) weight matrix; the
paper's "column" norm in its (in, out) notation) and starts at ‖W0‖_c, so the adapted layer equals the
base layer at step 0. ``norm="detached"`` (the default) treats ‖W0 + ΔW‖_c as a constant in the
backward pass, as the paper's §4.3 does for all its experiments (and PEFT); ``norm="exact"`` keeps it in
the graph.

The bias is never rescaled: y = (m / ‖W0 + ΔW‖_c) ⊙ (W0 x + ΔW x) + b, in the forward and in the merge
alike. Two costs are avoided on the hot path:

- the row norms come from r-sized products, never from forming the out × in sum:
  ‖W0 + sBA‖²_row = ‖W0‖²_row + 2s·rowdot(W0 Aᵀ, B) + s²·rowdot(B (A Aᵀ), B), with ‖W0‖²_row cached;
- W0 x is taken from the base layer's own output (minus its bias) instead of a second matmul, unless
  dropout is active, where PEFT's form is used: base(x) + (m/‖·‖ − 1)·W0 x̃ + (m/‖·‖)·sBA x̃ for the
  dropped-out input x̃.

On a frozen ``nn.Linear``/``Conv1D`` without dropout, training with the detached norm (the default), the
scale c = m/‖W0 + sBA‖_c is folded into the *weights* instead of the activations (``_ScaledLinear``):
y = x (c⊙W0)ᵀ + s·(A x)ᵀ(c⊙B)ᵀ + b. Scaling out rows of W0 and B costs out·(in + r) multiplies per step
instead of a pass over every token's output in the forward and over its gradient in the backward; the
scale's gradient is then Σ_tokens g ⊙ (y − b) / c (since (y − b)/c = (W0 + sBA) x), one reduction over
the output and its gradient. ``fast=False`` keeps the activation-scaling form everywhere.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters.base import apply_matrix, check_rank_fits, no_slices, per_channel, refuse_quantized, to_native
from lowrank.adapters.lora import LoRA

NORMS = ("detached", "exact")


class _ScaledLinear(torch.autograd.Function):
    """y = x (c⊙W0)ᵀ + s (x Aᵀ)(c⊙B)ᵀ + b for a per-row scale c; gradients for x, A, B and c (autograd
    carries c's gradient on to the magnitude through ``DoRA._scale``)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w0, bias, A, B, c, s: float):
        dtype = x.dtype
        cw = (w0.float() * c[:, None]).to(dtype)                     # (out, in): rows of W0 scaled
        cb = (B * (s * c)[:, None]).to(dtype)                        # (out, r)
        a = A.to(dtype)
        h = F.linear(x, a)                                           # (..., r)
        y = F.linear(x, cw, bias) + F.linear(h, cb)
        ctx.save_for_backward(x, cw, a, cb, h, y, bias, c)
        ctx.s = s
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        x, cw, a, cb, h, y, bias, c = ctx.saved_tensors
        g2, x2, h2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        gh = g2 @ cb                                                 # (T, r): gradient into A x, times s·c
        grad_x = (g2 @ cw + gh @ a).view_as(x) if ctx.needs_input_grad[0] else None
        grad_A = (gh.t() @ x2).float()
        grad_B = (g2.t() @ h2).float() * (ctx.s * c)[:, None]
        out = y.reshape(-1, y.shape[-1])
        if bias is not None:
            out = out - bias
        grad_c = (g2.float() * out.float()).sum(0) / c             # Σ g ⊙ (W0 + sBA) x
        grad_bias = g2.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_A, grad_B, grad_c, None


def _plain_matmul_layer(base: nn.Module) -> bool:
    """An nn.Linear or transformers' Conv1D whose forward is the stock one (not quantised, not patched)."""
    if type(base) is nn.Linear:
        return True
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and type(base) is conv1d


class DoRA(LoRA):
    adapter_name = "dora"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, *, dropout: float = 0.0,
                 rslora: bool = False, norm: str = "detached", fast: bool = True, init: str = "default"):
        if norm not in NORMS:
            raise ValueError(f"dora_norm={norm!r} is not one of {NORMS}; use 'detached' (DoRA §4.3) or 'exact'")
        super().__init__(base, rank, alpha, dropout=dropout, rslora=rslora, init=init)
        if self.kind == "embedding":
            raise ValueError("DoRA on an nn.Embedding is not supported; adapt it with 'lora' instead")
        self.norm = norm
        self.fast = fast and _plain_matmul_layer(base)
        w0 = self.base_matrix().detach().float()
        # ‖W0 + sBA‖_c: ‖W0‖_c at the default init (B = 0); after an init from W (lora.init_from_weight) the
        # base is the residual and W0 + sBA is the pretrained weight again (PEFT's dora_init, same order)
        self.magnitude = nn.Parameter((w0 + LoRA._update_matrix(self).detach()).norm(dim=1))
        # ‖W0‖² per row, cached (W0 is frozen); dropped while merged because the base weight changes.
        self.register_buffer("_w0_sq", w0.square().sum(1), persistent=False)
        self.register_buffer("_merge_scale", None, persistent=False)

    # ---- the norm ------------------------------------------------------------------------------
    def _row_norm(self) -> torch.Tensor:
        """‖W0 + sBA‖ per output row, from r-sized products (float32, (out,))."""
        A, B, s = self.lora_A, self.lora_B, self.scaling
        w0 = self.base_matrix()
        w0_At = (w0 @ A.t().to(w0.dtype)).float()               # (out, r)
        sq = self._w0_sq.float() + 2 * s * (w0_At * B).sum(1) + s * s * ((B @ (A @ A.t())) * B).sum(1)
        return sq.clamp_min(1e-12).sqrt()

    def _scale(self) -> torch.Tensor:
        """m / ‖W0 + ΔW‖_c, with the norm detached unless ``norm='exact'``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.norm == "exact"):
            norm = self._row_norm()
        return self.magnitude / norm

    # ---- ΔW, forward, merge ----------------------------------------------------------------------
    def _pretrained_matrix(self) -> torch.Tensor:
        """W0 as an (out, in) float32 matrix, recovered from the merged weight if need be."""
        w = self.base_matrix().float()
        if self.merged:
            w = w / self._merge_scale[:, None] - super()._update_matrix()
        return w

    def _update_matrix(self) -> torch.Tensor:
        """The effective update: m ⊙ (W0 + sBA)/‖W0 + sBA‖_c − W0."""
        w0 = self._pretrained_matrix()
        directional = w0 + super()._update_matrix()
        return self.magnitude[:, None] * directional / directional.norm(dim=1, keepdim=True) - w0

    def _weight_scaling_applies(self, x: torch.Tensor) -> bool:
        """Fold the scale into the weights (``_ScaledLinear``)? Only where it is the same function and the
        same gradients: training, detached norm, no dropout, a frozen plain matmul layer, and no autocast
        other than CUDA's (the Function is registered for CUDA autocast)."""
        return (self.fast and self.training and self.norm == "detached" and not self.merged
                and isinstance(self.lora_dropout, nn.Identity) and not self.base.weight.requires_grad
                and torch.is_grad_enabled() and x.is_floating_point()
                and (x.device.type == "cuda" or not torch.is_autocast_enabled(x.device.type)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_scaling_applies(x):
            return _ScaledLinear.apply(x, self.base_matrix(), self.base.bias, self.lora_A, self.lora_B,
                                       self._scale(), self.scaling)
        y = self.base(x)
        if self.merged:
            return y
        x_lora = self.lora_dropout(x)
        scale = per_channel(self._scale(), self.kind, y.dim()).to(y.dtype)
        lora = self.lora_output(x_lora).to(y.dtype)
        bias = self.base.bias
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            if bias is not None:
                b = per_channel(bias, self.kind, y.dim())
                return scale * (y - b + lora) + b
            return scale * (y + lora)
        w0_x = apply_matrix(self.base, self.kind, x_lora, self.base_matrix())
        return y + (scale - 1) * w0_x + scale * lora

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        refuse_quantized(self.base, "merge into")
        w0 = self.base_matrix().float()
        directional = w0 + super()._update_matrix()
        scale = self.magnitude / directional.norm(dim=1)
        w = self.base.weight
        w.copy_(to_native(self.base, self.kind, scale[:, None] * directional).to(w.dtype))
        self._merge_scale = scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w0 = self._pretrained_matrix()
        w = self.base.weight
        w.copy_(to_native(self.base, self.kind, w0).to(w.dtype))
        self._merge_scale = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm={self.norm}"


def build(target, rank: int, alpha: float | None, options: dict) -> DoRA:
    """The registry's constructor (whole matrices only: the magnitude normalises full rows)."""
    no_slices("dora", target)
    check_rank_fits(rank, target)
    return DoRA(target.module, rank, alpha, dropout=options.get("dropout", 0.0), rslora=options.get("rslora", False),
                norm=options.get("dora_norm", "detached"), fast=options.get("dora_fast", True),
                init=options.get("init", "default"))
