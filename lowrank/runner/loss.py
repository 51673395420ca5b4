"""What one forward computes: the precision it runs in and the loss.

``autocast`` picks bf16 autocast on CUDA (``precision: auto``) or where asked. ``loss_fn`` is the
cross-entropy from logits: per sequence for classification, per target token (shifted by one) for
causal LMs. ``batch_loss`` is the training loss of one micro-batch, either through the logits or, with
``fused=True`` on a causal LM, through ``lowrank.runner.accel.causal_lm_loss`` (the LM head and the
cross-entropy fused and chunked: the (tokens × vocabulary) logits never exist). Both are transformers'
``ForCausalLMLoss``: the mean over the non-ignored shifted labels.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.runner.accel import NOT_CAUSAL_LM, causal_lm_loss, causal_sdpa, packed_attention, packed_inputs
from lowrank.runner.data import IGNORE


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether the forward runs under bf16 autocast: ``bf16``, or ``auto`` on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast on CUDA (``auto``) or where asked (``bf16``); float32 otherwise. ``cache=False``: no
    cache of casted weights (inside a CUDA graph capture, where the cache would hold graph memory)."""
    if not uses_bf16(device, precision):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy: per sequence for classification, per target token (shifted) for generation — the mean
    over the target tokens, 0 for a batch without any (every target truncated away), not 0/0."""
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    logits, labels = logits[:, :-1], labels[:, 1:]
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                            ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="sum")
    return total / (labels != IGNORE).sum().clamp_min(1)


def can_fuse(model: nn.Module, kind: str, label_smoothing: float, distributed: bool) -> str | None:
    """Why the fused causal-LM loss cannot be used here (None when it can)."""
    if kind != "generation":
        return NOT_CAUSAL_LM
    if label_smoothing:
        return "trainer.label_smoothing > 0"
    if distributed:
        return "DDP runs the model's own forward"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return "the LM head is not a plain nn.Linear (adapted or tied differently)"
    return None


def batch_loss(net: nn.Module, model: nn.Module, batch: dict, kind: str, *, fused: bool = False,
               label_smoothing: float = 0.0, loss_impl: str = "auto") -> torch.Tensor:
    """The mean training loss of one micro-batch (run it under ``autocast``).

    ``net`` runs the forward (the DDP wrapper when distributed), ``model`` is the model itself (the
    fused path calls its decoder and LM head directly; ``loss_impl`` is ``linear_cross_entropy``'s ``impl``).

    A causal LM gets no attention mask: ``collate`` pads on the right and the padded positions carry no
    label, and under causal attention a token never attends to the positions after it, so every scored
    position's output is the masked forward's (positions count from 0 either way). Without a mask, SDPA
    runs its causal kernel instead of the masked one (``accel.causal_sdpa``, also inside a CUDA graph). A
    packed batch (``data.pack``: one row, ``cu_seq_lens``) attends within each of its sequences
    (``accel.packed_attention``).
    """
    ids = batch["input_ids"]
    if "cu_seq_lens" in batch:  # one packed row (data.pack): attention within each sequence
        attention, inputs = packed_attention(model), packed_inputs(batch)
    elif kind == "classification":
        attention, inputs = nullcontext(), {"attention_mask": batch["attention_mask"]}
    else:
        attention, inputs = causal_sdpa(model, ids.shape[-1]), {}
    with attention:
        if fused:
            return causal_lm_loss(model, ids, batch["labels"], ignore_index=IGNORE, impl=loss_impl, **inputs)
        logits = net(input_ids=ids, **inputs).logits
    return loss_fn(logits, batch["labels"], kind, label_smoothing)
