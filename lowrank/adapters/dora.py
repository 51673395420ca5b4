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
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank.adapters.base import apply_matrix, per_channel, to_native
from lowrank.adapters.lora import LoRA

NORMS = ("detached", "exact")


class DoRA(LoRA):
    adapter_name = "dora"

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, *, dropout: float = 0.0,
                 rslora: bool = False, norm: str = "detached"):
        if norm not in NORMS:
            raise ValueError(f"dora_norm={norm!r} is not one of {NORMS}; use 'detached' (DoRA §4.3) or 'exact'")
        super().__init__(base, rank, alpha, dropout=dropout, rslora=rslora)
        if self.kind == "embedding":
            raise ValueError("DoRA on an nn.Embedding is not supported; adapt it with 'lora' instead")
        self.norm = norm
        w0 = self.base_matrix().detach().float()
        self.magnitude = nn.Parameter(w0.norm(dim=1))
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
        if self.norm == "detached":
            with torch.no_grad():
                norm = self._row_norm()
        else:
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

    def lora_delta_weight(self) -> torch.Tensor:
        """The low-rank directional update sBA alone (float32, (out, in))."""
        with torch.no_grad():
            return super()._update_matrix().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
