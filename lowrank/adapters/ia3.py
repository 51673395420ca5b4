"""(IA)³ (Liu et al., 2022, arXiv 2205.05638): learned rescaling vectors, initialised to one.

For the attention keys and values the *output* features are rescaled, y = l ⊙ (W x + b) (the bias
too, as in PEFT's merge); for the feed-forward network the *input* of its second linear layer (the
activation) is rescaled, y = W (l ⊙ x) + b. ΔW = (l − 1) ⊙ W along the rescaled side.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank.adapters.base import AdaptedLayer, no_slices, per_channel, to_native


class IA3(AdaptedLayer):
    adapter_name = "ia3"

    def __init__(self, base: nn.Module, *, feedforward: bool = False):
        super().__init__(base)
        if self.kind == "embedding" or (feedforward and self.kind == "conv2d" and base.groups != 1):
            raise ValueError(f"IA3 cannot rescale a {type(base).__name__} here; target linear projections")
        self.feedforward = feedforward
        size = base.weight.shape[1] if (feedforward and self.kind == "conv2d") else (
            self.in_features if feedforward else self.out_features)
        self.ia3_scale = nn.Parameter(torch.ones(size, dtype=torch.float32, device=base.weight.device))

    def _scale_matrix(self, l: torch.Tensor | None = None) -> torch.Tensor:
        """l as a factor that broadcasts against the (out, in) weight matrix."""
        l = self.ia3_scale if l is None else l
        if not self.feedforward:
            return l[:, None]
        if self.kind == "conv2d":  # input channels repeat over the kernel positions in the flattened matrix
            return l.repeat_interleave(self.base.weight[0, 0].numel())[None, :]
        return l[None, :]

    def _update_matrix(self) -> torch.Tensor:
        return (self._scale_matrix() - 1) * self._pretrained_matrix()

    def _pretrained_matrix(self) -> torch.Tensor:
        w = self.base_matrix().float()
        return w / self._scale_matrix() if self.merged else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base(x * per_channel(self.ia3_scale, self.kind, x.dim()).to(x.dtype))
        y = self.base(x)
        return y * per_channel(self.ia3_scale, self.kind, y.dim()).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._rescale(self.ia3_scale)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._rescale(1 / self.ia3_scale)
            self.merged = False

    def _rescale(self, l: torch.Tensor) -> None:
        """Multiply the base weight (and, for output rescaling, the bias) by l."""
        w = self.base.weight
        w.copy_(to_native(self.base, self.kind, self.base_matrix().float() * self._scale_matrix(l)).to(w.dtype))
        if not self.feedforward and self.base.bias is not None:
            self.base.bias.mul_(l.to(self.base.bias.dtype))


#: Paper names of the feed-forward projection whose *input* (IA)³ rescales (arXiv 2205.05638, §3.3).
FEEDFORWARD_NAMES = ("down",)


def build(target, rank: int | None, alpha: float | None, options: dict) -> IA3:
    no_slices("ia3", target)
    feedforward = options.get("feedforward")
    if feedforward is None:
        feedforward = any(n in FEEDFORWARD_NAMES for n in target.paper_names)
    return IA3(target.module, feedforward=bool(feedforward))
