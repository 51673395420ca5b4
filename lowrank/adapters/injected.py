"""Methods that add modules or tokens at the model level instead of wrapping one target layer.

Prefixes, prompts and layer-selection schedules are *injected*: the registry entry's ``inject(model,
targets, layers, rank, options)`` attaches an ``Injected`` module to the model (so its parameters are
the model's, saved and moved with it) and hooks it where the method acts (the attention call, the input
embeddings, the training step). They have no ΔW of a weight matrix: the weight analyses refuse them.

``Injected.fold()`` replaces a training-time reparameterisation (Prefix-Tuning's MLP, P-Tuning's prompt
encoder) by the values it produces — the same function, fewer parameters — and returns the adapter
options that rebuild the folded form (``lowrank.fold`` records them in the model's adapter config).

Every injection can be taken off again (``detach``, which ``lowrank.remove_adapters`` calls): the module
keeps the handles of the hooks it registered and the model settings it changed, and ``remove(model)``
gives them back; it is attached before it changes anything, so a half-done injection is undone too.
"""

from __future__ import annotations

import re

from torch import nn

from lowrank.targeting import LAYER_INDEX, family_of, resolve

#: Attribute of the model that holds the injected module (one per model).
INJECTED_ATTR = "lowrank_injected"


class Injected(nn.Module):
    """Base class of model-level adapters; ``folded`` is True once no reparameterisation is left."""

    adapter_name = "injected"
    folded = True
    #: Whether plain base weights keep the adapted function once this module is gone (``merge_and_unload``):
    #: False for tokens and attention prefixes, True for a schedule of which base weights train.
    mergeable = False
    #: What the method adds, for the line that refuses to merge it.
    adds = "tokens"

    def fold(self) -> dict:
        """Fold a reparameterisation away (exact); returns option overrides for the folded form."""
        return {}

    def remove(self, model: nn.Module) -> None:
        """Undo what the injection did to ``model`` besides attaching this module (hooks, settings)."""


def attach(model: nn.Module, module: Injected) -> Injected:
    """Register ``module`` on ``model`` (its parameters become the model's: saved, moved, counted)."""
    model.add_module(INJECTED_ATTR, module)
    return module


def injected_module(model: nn.Module) -> Injected | None:
    found = getattr(model, INJECTED_ATTR, None)
    return found if isinstance(found, Injected) else None


def detach(model: nn.Module) -> None:
    """Take the injected module off ``model`` with everything it hooked or changed (no-op without one)."""
    injected = injected_module(model)
    if injected is not None:
        injected.remove(model)
        delattr(model, INJECTED_ATTR)


def attention_modules(model: nn.Module, layers=None) -> list[tuple[int, nn.Module]]:
    """``[(layer index, attention module)]``: the modules that own the key projection (paper name ``k``)
    and make the attention call, in layer order."""
    if family_of(model) is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"model_type {model_type!r} has no attention map (bert, gpt2, llama, opt, ... families); "
                         f"use adapter=lora there")
    out = {}
    for target in resolve(model, ["k"], layers):
        parent = target.name.rpartition(".")[0]
        index = int(LAYER_INDEX.search(target.name).group(1))
        out[index] = model.get_submodule(parent)
    return sorted(out.items(), key=lambda item: item[0])


def block_list(model: nn.Module) -> tuple[str, int]:
    """``(qualified name of the ModuleList of transformer blocks, number of blocks)``."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and re.search(r"(?:^|\.)(?:layer|layers|h|block|blocks)$", name):
            if best is None or len(module) > best[1]:
                best = (name, len(module))
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks (layer/layers/h/blocks); "
                         f"this method needs a stacked transformer")
    return best
