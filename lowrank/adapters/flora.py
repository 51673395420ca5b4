"""FLoRA (Si et al., 2024, arXiv 2405.14739): a Tucker-form update with a low-rank core.

ΔW = s · G ×₁ A_in ×₂ A_out (×₃ A_kh ×₄ A_kw for a convolution). The factors are not constrained to
be orthogonal. Following the official code (SJTU-DeepVisionLab/FLoRA ``flora/layers.py``), the core G
starts at zero and every factor is Kaiming-normal with a = √3, so ΔW = 0 at initialisation, and s is a
plain multiplier (not α/r).

- ``nn.Linear`` / ``Conv1D``: ΔW = s · A_out Gᵀ A_inᵀ with A_in (in, r1), G (r1, r2), A_out (out, r2);
  applied as x ↦ s · ((x A_in) G) A_outᵀ. Parameters r1·r2 + in·r1 + out·r2.
- ``nn.Conv2d``: G is 4-D (r1, r2, r3, r4) and keeps the kernel's spatial modes; ΔW[o, c, y, x] =
  s Σ G[a, b, p, q] A_in[c, a] A_out[o, b] A_kh[y, p] A_kw[x, q]. It is applied in factored form
  (1×1 conv in→r1, then the k×k core conv r1→r2 carrying the base's stride, padding, padding mode and
  dilation, then 1×1 conv r2→out), never forming the dense kernel, except on a depthwise convolution
  (groups = in channels), whose dense (out, 1, kh, kw) update is applied with one depthwise convolution (the
  same function, much faster than the three grouped ones). Another grouped base convolution
  (weight (out, in/groups, kh, kw)) is handled exactly by running the three convolutions with the same
  groups (shared A_in and core per group, the rows of A_out split by group). Parameters
  r1·r2·r3·r4 + (in/groups)·r1 + out·r2 + kh·r3 + kw·r4.

Default scale (``scale=None``): 4.0 for convolutions, the official ConvNeXt example's value; α/r1 for
linear layers (α = r1, i.e. s = 1, when no α is given), the authors' NLU implementation
(Chongjie-Si/Subspace-Tuning: ΔW = (α/r)·B E A), so switching LoRA → FLoRA keeps LoRA's scaling. The
0.04 a secondary source reports for InternViT/LLaVA linear layers is not the default: on MiniLM/SST-2 at
LoRA's learning rate (r=8, 150 steps) it reached 56.7 % dev accuracy, against 68.1 % at s=0.25, 77.9 % at
s=1 and 78.8 % at s=4; pass ``scale=`` to choose. Default spatial ranks r3 = r4 = min(2, k) (the official example's
``r=[16, 16, 2, 2]``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters.base import AdaptedLayer, apply_matrix, conv_input, no_slices

CONV_SCALE = 4.0  # the official code's ConvNeXt example (SJTU-DeepVisionLab/FLoRA, r=[16,16,2,2], scale=4.0)


def _factor(*shape: int, like: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=torch.float32, device=like.device))
    nn.init.kaiming_normal_(p, a=math.sqrt(3))
    return p


class FLoRA(AdaptedLayer):
    adapter_name = "flora"

    def __init__(self, base: nn.Module, rank: int | list[int], *, scale: float | None = None,
                 alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base)
        if self.kind == "embedding":
            raise ValueError("FLoRA on an nn.Embedding is not supported; adapt it with 'lora' instead")
        conv = self.kind == "conv2d"
        ranks = [rank] * 2 if isinstance(rank, int) else list(rank)
        if conv and len(ranks) == 2:
            kh, kw = base.kernel_size
            ranks += [min(2, kh), min(2, kw)]
        if len(ranks) != (4 if conv else 2) or any(not isinstance(r, int) or r <= 0 for r in ranks):
            raise ValueError(f"FLoRA ranks={ranks} on {type(base).__name__}: give one positive int, or "
                             f"{'[r1, r2, r3, r4]' if conv else '[r1, r2]'}")
        self.ranks = ranks
        if scale is None:
            scale = CONV_SCALE if conv else (ranks[0] if alpha is None else alpha) / ranks[0]
        self.scaling = float(scale)
        w = base.weight
        if conv:
            out, in_per_group, kh, kw = w.shape
            self.A_in = _factor(in_per_group, ranks[0], like=w)
            self.A_out = _factor(out, ranks[1], like=w)
            self.A_kh = _factor(kh, ranks[2], like=w)
            self.A_kw = _factor(kw, ranks[3], like=w)
        else:
            self.A_in = _factor(self.in_features, ranks[0], like=w)
            self.A_out = _factor(self.out_features, ranks[1], like=w)
        self.core = nn.Parameter(torch.zeros(ranks, dtype=torch.float32, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _spatial_core(self) -> torch.Tensor:
        """The core contracted with the kernel factors: (r2, r1, kh, kw), a small conv kernel."""
        return torch.einsum("abpq,yp,xq->bayx", self.core, self.A_kh, self.A_kw)

    def _update_matrix(self) -> torch.Tensor:
        if self.kind != "conv2d":
            return self.scaling * (self.A_out @ self.core.t() @ self.A_in.t())
        dense = torch.einsum("bayx,ca,ob->ocyx", self._spatial_core(), self.A_in, self.A_out)
        return self.scaling * dense.flatten(1)

    def flora_output(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.kind != "conv2d":
            h = F.linear(x, self.A_in.t().to(dtype))
            return F.linear(F.linear(h, self.core.t().to(dtype)), self.A_out.to(dtype)) * self.scaling
        base, g = self.base, self.base.groups
        if g > 1 and base.in_channels == g:  # depthwise: the dense (out, 1, kh, kw) update is tiny, and three
            # convolutions of `groups` groups (each of r1 or r2 channels) are far slower than one depthwise one
            return apply_matrix(base, "conv2d", x, self._update_matrix().to(dtype))
        h = F.conv2d(x, self.A_in.t().to(dtype)[:, :, None, None].repeat(g, 1, 1, 1), groups=g)
        h, padding = conv_input(base, h)  # padding commutes with the bias-free 1×1 conv above
        h = F.conv2d(h, self._spatial_core().to(dtype).repeat(g, 1, 1, 1), None, base.stride, padding,
                     base.dilation, g)
        return F.conv2d(h, self.A_out.to(dtype)[:, :, None, None], groups=g) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.flora_output(self.dropout(x)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ranks={self.ranks}, scale={self.scaling:g}"


def build(target, rank: int, alpha: float | None, options: dict) -> FLoRA:
    no_slices("flora", target)
    return FLoRA(target.module, options.get("ranks") or rank, scale=options.get("scale"), alpha=alpha,
                 dropout=options.get("dropout", 0.0))


def read_factors(module: str, tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, dict]:
    """A saved linear FLoRA module's factors ``A_in`` (in, r1), ``core`` (r1, r2), ``A_out`` (out, r2), and in
    LoRA's form ``B = A_out``, ``A = coreᵀ A_inᵀ`` (r2, in), so ΔW = scaling · B A. Convolutions give ``{}``."""
    if f"{module}.core" not in tensors:
        return {}
    a_in, core, a_out = (tensors[f"{module}.{k}"] for k in ("A_in", "core", "A_out"))
    if core.dim() != 2:
        return {}
    return {module: {"A_in": a_in, "core": core, "A_out": a_out, "B": a_out, "A": core.t() @ a_in.t(),
                     "scaling": scaling}}
