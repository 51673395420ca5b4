"""What every adapted layer shares: the base-layer kinds it can wrap and the merge/unmerge protocol.

An adapted layer wraps one frozen *base* layer (``nn.Linear``, ``nn.Embedding``, ``nn.Conv2d`` or
transformers' GPT-2 ``Conv1D``) and adds a learned update ΔW. Whatever the base layer's own storage
layout, ΔW is exchanged as a matrix in the ``(out_features, in_features)`` layout of
``nn.Linear.weight``:

- ``Linear``: ``weight`` is already ``(out, in)``;
- ``Conv1D`` (GPT-2): ``weight`` is stored ``(in, out)``, so the matrix is ``weight.T``;
- ``Conv2d``: ``weight`` is ``(out, in/groups, kh, kw)``, the matrix is ``weight.flatten(1)``;
- ``Embedding``: ``weight`` is ``(num_embeddings, dim)``, a linear map from one-hot ids, so the matrix
  is ``weight.T`` with ``in = num_embeddings`` and ``out = dim`` (PEFT's convention too).

``as_matrix`` is the one place that knows these layouts (``to_native`` is its inverse): the layout of a
weight is read from its layer's kind, never guessed from its shape (a square GPT-2 ``Conv1D`` looks the
same either way round).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("linear", "conv1d", "conv2d", "embedding")


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a wrappable base layer, or None. GPT-2's Conv1D is matched by name so that
    ``import lowrank`` does not need transformers."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return "conv1d"
    return None


# ---- quantized bases (QLoRA, arXiv 2305.14314; lowrank.quantize) -----------------------------------------
def is_quantized(base: nn.Module) -> bool:
    """A base layer whose weight is stored quantized (``lowrank.quantize.QuantizedLinear``)."""
    return getattr(base, "lowrank_quantized", False)


def base_weight(base: nn.Module) -> torch.Tensor:
    """The one accessor of a base layer's weight, in its own layout: a quantized base answers its dequantized
    weight (compute dtype), so every adapter and ΔW analysis sees W0 as the dequantized base."""
    return base.dequantize() if is_quantized(base) else base.weight


def refuse_quantized(base: nn.Module, what: str) -> None:
    if is_quantized(base):
        raise ValueError(f"cannot {what} a {base.method}-quantized base layer in place; fix: merge_adapters(model, "
                         f"dequantize=True) replaces each quantized base by its dequantized float weight first")


def features(base: nn.Module, kind: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of the base layer's weight matrix."""
    if kind == "linear":
        return base.in_features, base.out_features
    w = base.weight
    if kind == "conv1d":
        return w.shape[0], w.shape[1]
    if kind == "conv2d":
        return w[0].numel(), w.shape[0]
    return w.shape[0], w.shape[1]  # embedding


def as_matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A weight stored in the layout of a ``kind`` layer (``layer_kind``) as its ``(out, in)`` matrix: a
    view, never a copy. Works on any tensor of that layout: the live weight, a saved or trained copy."""
    if kind not in KINDS:
        raise ValueError(f"layer kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if kind in ("conv1d", "embedding"):
        return weight.t()
    if kind == "conv2d":
        return weight.flatten(1)
    return weight


def weight_matrix(base: nn.Module, kind: str) -> torch.Tensor:
    """The base weight as an ``(out, in)`` matrix: a view, never a copy (a quantized base: its dequantized copy)."""
    return as_matrix(base_weight(base), kind)


def to_native(base: nn.Module, kind: str, matrix: torch.Tensor) -> torch.Tensor:
    """An ``(out, in)`` matrix in the base weight's own layout."""
    if kind in ("conv1d", "embedding"):
        return matrix.t()
    if kind == "conv2d":
        return matrix.reshape(base.weight.shape)
    return matrix


def per_channel(vector: torch.Tensor, kind: str, ndim: int) -> torch.Tensor:
    """Reshape a per-output-feature vector to broadcast against an output of ``ndim`` dims."""
    if kind == "conv2d":
        return vector.view(1, -1, *([1] * (ndim - 2)))
    return vector


def conv_input(base: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple | str | int]:
    """Apply the base convolution's non-zero padding mode explicitly; return (input, conv padding)."""
    if base.padding_mode != "zeros":
        return F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0
    return x, base.padding


def apply_matrix(base: nn.Module, kind: str, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Run ``x`` through the base layer's operation with weight ``matrix`` ((out, in)) and no bias."""
    if kind in ("linear", "conv1d"):
        return F.linear(x, matrix)
    if kind == "embedding":
        return F.embedding(x, matrix.t(), base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)
    x, padding = conv_input(base, x)
    return F.conv2d(x, matrix.reshape(base.weight.shape), None, base.stride, padding, base.dilation, base.groups)


def check_rank_fits(rank: int, target, rows: int | None = None) -> None:
    """Refuse a rank larger than the matrix it factors (one line, naming the module and the bound);
    ``rows``: the output rows actually adapted (the smallest slice of a fused projection)."""
    kind = layer_kind(target.module)
    if kind is None:
        return  # the adapted layer's constructor names the unsupported module
    in_features, out_features = features(target.module, kind)
    limit, name = min(in_features, out_features if rows is None else rows), target.name
    if rank > limit:
        raise ValueError(f"rank={rank} exceeds min(in_features, out_features)={limit} of {name!r}; "
                         f"choose rank <= {limit}")


def no_slices(adapter: str, target) -> None:
    """Methods other than LoRA cannot adapt a subset of a fused projection's rows."""
    if target.slices is not None:
        raise ValueError(f"{adapter} on slices of the fused projection {target.name!r} is not supported; "
                         f"use adapter=lora there, or a model with separate q/k/v projections")


class AdaptedLayer(nn.Module):
    """Base class of every adapted layer: owns ``.base`` and the merge protocol.

    Subclasses implement ``_update_matrix()`` (the learned ΔW as an (out, in) matrix, differentiable,
    in float32) and ``forward``; they may override ``merge``/``unmerge`` when merging is not additive
    (DoRA rescales the whole weight).
    """

    adapter_name: str = "adapter"
    #: Whether ``merge`` folds the adapter into the base weight (False: the bottleneck adapters, no ΔW).
    mergeable: bool = True
    adds: str = "an update"  # what it adds, for the line that refuses to merge an unmergeable one

    def __init__(self, base: nn.Module):
        super().__init__()
        kind = layer_kind(base)
        if kind is None:
            raise ValueError(f"cannot adapt a {type(base).__name__}; supported base layers: "
                             "nn.Linear, nn.Embedding, nn.Conv2d, transformers Conv1D")
        self.base = base
        self.kind = kind
        self.in_features, self.out_features = features(base, kind)
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)

    # ---- the update --------------------------------------------------------------------------
    def _update_matrix(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW = merged weight − base weight, float32, ``(out_features, in_features)``, detached."""
        with torch.no_grad():
            return self._update_matrix().detach().float()

    def base_matrix(self) -> torch.Tensor:
        """The base weight as an (out, in) view (the pretrained W0 while unmerged)."""
        return weight_matrix(self.base, self.kind)

    # Model code sometimes reads ``layer.weight`` / ``layer.bias`` (dtype checks, weight tying):
    # answer with the base layer's, as PEFT does.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    # ---- merge / unmerge ---------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight so that inference costs nothing extra."""
        if self.merged:
            return
        refuse_quantized(self.base, "merge into")
        w = self.base.weight
        w.add_(to_native(self.base, self.kind, self._update_matrix().to(w.dtype)))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to floating-point rounding)."""
        if not self.merged:
            return
        w = self.base.weight
        w.sub_(to_native(self.base, self.kind, self._update_matrix().to(w.dtype)))
        self.merged = False

    def release(self) -> nn.Module:
        """The base layer as it was before this layer wrapped it (``lowrank.remove_adapters`` puts it back):
        unmerged. A layer that changes its base at construction (an initialisation that rewrites W0) gives
        that back here too."""
        self.unmerge()
        return self.base

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}, merged={self.merged}"
