"""Bottleneck adapters: Houlsby et al. 2019 (arXiv 1902.00751) and Pfeiffer et al. 2020 (arXiv 2005.00247).

An adapter maps a sublayer's output h (width d) to h + W_up f(W_down h + b_down) + b_up, with a
bottleneck of r = ``rank`` units (Houlsby §2.1, Figure 2): down-projection d → r, a nonlinearity,
up-projection r → d, and the residual that makes it near the identity at initialisation (weights drawn
N(0, 0.01²), biases zero: Houlsby §3.6's "near-identity initialisation"). It sits on the output of the
sublayer's projection back to d, before the block adds its skip connection and normalises — the
placement of Houlsby's Figure 2, here by wrapping that projection (paper names ``o`` and ``down``).

- ``houlsby``: two adapters per block, after the attention output (``o``) and after the FFN (``down``),
  swish nonlinearity, and the block's LayerNorms train too (Houlsby §2.1; adapter-hub ``adapters``
  ``DoubleSeqBnConfig``: mh_adapter, output_adapter, swish).
- ``pfeiffer``: one adapter after the FFN only (``down``), ReLU (Pfeiffer et al. 2020 §2.2; adapter-hub
  ``SeqBnConfig``); LayerNorms frozen unless ``train_norms=true``. adapter-hub applies it after the
  block's original LayerNorm and adds the residual again; here it takes Houlsby's placement, the same
  for every architecture family.

Parameters: each adapter has 2·d·r + r + d, so with L̂ adapters |Θ| = L̂·(2·d·r + r + d), LoRA paper
§5.1 (arXiv 2106.09685), plus 2·d per trained LayerNorm (its "+ 2 × L̂_LN × d_model" term).
Adapters add computation to every forward and have no ΔW to merge (LoRA §3, Table 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.adapters.base import AdaptedLayer, no_slices

NONLINEARITIES = {"swish": F.silu, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


class Bottleneck(AdaptedLayer):
    """``base(x)`` followed by a residual bottleneck adapter."""

    adapter_name = "bottleneck"
    mergeable = False
    adds = "a bottleneck module after its layer"

    def __init__(self, base: nn.Module, rank: int, *, nonlinearity: str = "swish", init_std: float = 0.01):
        super().__init__(base)
        if self.kind not in ("linear", "conv1d"):
            raise ValueError(f"a bottleneck adapter follows a linear projection, not a {type(base).__name__}")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity={nonlinearity!r} is unknown; choose one of {', '.join(NONLINEARITIES)}")
        self.rank, self.nonlinearity = rank, nonlinearity
        d, device = self.out_features, base.weight.device
        self.adapter_down = nn.Linear(d, rank, device=device)
        self.adapter_up = nn.Linear(rank, d, device=device)
        for layer in (self.adapter_down, self.adapter_up):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        z = NONLINEARITIES[self.nonlinearity](self.adapter_down(h.to(self.adapter_down.weight.dtype)))
        return self.adapter_up(z).to(h.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.adapter(h)

    def _update_matrix(self) -> torch.Tensor:
        raise ValueError("a bottleneck adapter is a nonlinear function of the sublayer output, not a ΔW; the weight "
                         "analyses and merging need a LoRA-family adapter")

    def merge(self) -> None:
        self._update_matrix()

    def unmerge(self) -> None:
        self._update_matrix()

    def release(self) -> nn.Module:
        return self.base  # never merged

    def extra_repr(self) -> str:
        return f"d={self.out_features}, r={self.rank}, nonlinearity={self.nonlinearity}"


def _builder(name: str, nonlinearity: str):
    """The registry's constructor of one bottleneck variant (its name and default nonlinearity)."""
    def build(target, rank, alpha, options: dict) -> Bottleneck:
        no_slices(name, target)
        return Bottleneck(target.module, rank, nonlinearity=options.get("nonlinearity", nonlinearity),
                          init_std=options.get("init_std", 0.01))
    return build


build_houlsby = _builder("houlsby", "swish")
build_pfeiffer = _builder("pfeiffer", "relu")


def is_norm(name: str) -> bool:
    """LayerNorm/RMSNorm parameters by name (BERT ``LayerNorm``, GPT-2 ``ln_*``, LLaMA ``*norm``)."""
    lowered = name.lower()
    return "layernorm" in lowered or ".ln_" in lowered or lowered.startswith("ln_") or "norm." in lowered


def norms_trained(default: bool):
    """The ``train_norms`` option's effect, as a hook run after wrapping."""
    def inject(model, targets=None, layers=None, rank=None, options=None):
        if (options or {}).get("train_norms", default):
            for name, p in model.named_parameters():
                if is_norm(name):
                    p.requires_grad_(True)
        return None
    return inject
