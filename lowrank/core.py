"""``lowrank.adapt``: wrap a Hugging Face model's target modules in place, and the helpers around it.

``adapt`` freezes every base parameter, wraps the modules that ``targets`` name (see
``lowrank.targeting``) with the chosen adapter, and leaves trainable only the adapter parameters and
the modules the task must train (a new classification head, found by name or given as
``train_modules``). The call's arguments are kept on the model (``adapter_config(model)``) so an adapter
can be saved and rebuilt on a fresh copy of the base model.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from lowrank.adapters import spec as adapter_spec
from lowrank.adapters.base import AdaptedLayer
from lowrank.adapters.injected import injected_module
from lowrank.targeting import resolve

#: Task heads that ``adapt`` keeps trainable when ``train_modules`` is not given (PEFT's SEQ_CLS choice).
HEAD_NAMES = ("classifier", "score", "qa_outputs")
CONFIG_ATTR = "lowrank_config"


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank={rank!r} is not a positive integer; pass e.g. rank=8")


def _check_alpha(alpha) -> None:
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(f"alpha={alpha!r} is not a positive number; pass e.g. alpha=16 or alpha=None (α = r)")


def _check_dropout(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout={p!r} is not in [0, 1); pass e.g. dropout=0.1")


def _head_names(model: nn.Module, train_modules) -> list[str]:
    if train_modules is not None:
        names = [train_modules] if isinstance(train_modules, str) else list(train_modules)
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules and not any(n.endswith("." + name) for n in modules):
                raise ValueError(f"train_modules entry {name!r} names no module of {type(model).__name__}; "
                                 f"give a module name such as 'classifier'")
        return names
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def adapt(model: nn.Module, adapter: str, *, targets: Iterable[str] | None = None, rank: int | None = 8,
          alpha: float | None = None, layers: Iterable[int] | int | None = None, **options) -> nn.Module:
    """Adapt ``model`` in place with ``adapter`` and return it.

    Args:
        adapter: one of ``lowrank.ADAPTERS``: lora, dora, flora, ia3, bitfit, head, full, houlsby, pfeiffer,
            prefix, ptuning2, prompt, ptuning, top, gradual.
        targets: paper names ``q``, ``k``, ``v``, ``o`` (also ``gate``, ``up``, ``down``), mapped per
            architecture family, or explicit module names (exact, suffix, or ``re:<regex>``). Default
            ``[q, v]`` (LoRA §4.2); for ia3 ``[k, v, down]``.
        rank: r of the low-rank update (LoRA/DoRA/FLoRA); the bottleneck width of houlsby/pfeiffer.
        alpha: LoRA's α; the scaling is α/r (α/√r with ``rslora=True``). ``None`` means α = r.
        layers: layer indices to adapt (default: all).
        options: ``dropout`` (input dropout of the update branch, default 0), ``rslora``,
            ``dora_norm`` ('detached', DoRA §4.3, default; or 'exact'), ``dora_fast`` (fold the scale
            into the weights when training; same function, see lowrank/adapters/dora.py), FLoRA ``scale`` and ``ranks``,
            IA3 ``feedforward``; the options of the other methods are listed in their registry entries
            and documented in their modules (``lowrank/adapters/``); and ``train_modules`` (modules trained in full besides the adapter;
            default: a ``classifier``/``score``/``qa_outputs`` head if the model has one).
    """
    spec = adapter_spec(adapter)
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError(f"model is already adapted with {getattr(model, CONFIG_ATTR)['adapter']!r}; "
                         f"adapt a fresh copy of the base model")
    train_modules = options.pop("train_modules", None)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for adapter {adapter!r}; it takes {list(spec.options) or 'none'}")
    if "dropout" in options:
        _check_dropout(options["dropout"])
    if spec.uses_rank:
        _check_rank(rank)
        _check_alpha(alpha)
    heads = _head_names(model, train_modules)
    if adapter == "head" and not heads:
        raise ValueError(f"adapter='head' found no task head on {type(model).__name__}; pass "
                         f"train_modules=[<head module name>]")

    for name, p in model.named_parameters():
        p.requires_grad_(spec.trains is not None and spec.trains(name))
    wrapped: list[str] = []
    if spec.wraps:
        targets = list(spec.default_targets if targets is None else
                       ([targets] if isinstance(targets, str) else targets))
        for target in resolve(model, targets, layers):
            if any(target.name == h or target.name.startswith(h + ".") for h in heads):
                continue  # a trained head is trained in full, not adapted
            _replace(model, target.name, spec.build(target, rank, alpha, options))
            wrapped.append(target.name)
    if spec.inject is not None:  # model-level methods: prefixes, prompts, block selection
        spec.inject(model, targets=targets, layers=layers, rank=rank, options=options)
    for name, module in model.named_modules():
        if any(name == h or name.endswith("." + h) for h in heads):
            for p in module.parameters():
                p.requires_grad_(True)

    setattr(model, CONFIG_ATTR, {
        "adapter": adapter,
        "targets": None if targets is None else list(targets),
        "rank": rank if spec.uses_rank else None,
        "alpha": alpha if spec.uses_rank else None,
        "layers": None if layers is None else ([layers] if isinstance(layers, int) else list(layers)),
        "options": copy.deepcopy(options),
        "train_modules": heads,
        "modules": wrapped,
    })
    return model


def adapter_config(model: nn.Module) -> dict:
    """The arguments ``adapt`` was called with, plus the wrapped module names."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has not been adapted; call lowrank.adapt(model, ...) first")
    return copy.deepcopy(config)


def adapted_modules(model: nn.Module) -> dict[str, AdaptedLayer]:
    """``{qualified module name: adapted layer}`` in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by qualified name: what an adapter checkpoint must hold."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def fold(model: nn.Module) -> nn.Module:
    """Fold a model-level reparameterisation away (Prefix-Tuning's MLP, P-Tuning's encoder): the same
    function with its values as plain parameters; the adapter config then rebuilds the folded form."""
    injected = injected_module(model)
    if injected is not None:
        overrides = injected.fold()
        config = getattr(model, CONFIG_ATTR, None)
        if config is not None:
            config["options"].update(overrides)
    return model


def _quantized_bases(model: nn.Module, dequantize: bool) -> None:
    """A quantized base (``lowrank.quantize``) cannot take ΔW in place: refuse, or (``dequantize=True``) replace
    it by the float ``nn.Linear`` of its dequantized weight first."""
    from lowrank.adapters.base import is_quantized, refuse_quantized

    for layer in adapted_modules(model).values():
        if is_quantized(layer.base):
            if not dequantize:
                refuse_quantized(layer.base, "merge into")
            layer.base = layer.base.dense()


def merge_adapters(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every ΔW into its base weight (and any reparameterisation, see ``fold``). A quantized base is
    refused unless ``dequantize=True``, which first replaces it by its dequantized float weight."""
    _quantized_bases(model, dequantize)
    for layer in adapted_modules(model).values():
        layer.merge()
    return fold(model)


def unmerge_adapters(model: nn.Module) -> nn.Module:
    for layer in adapted_modules(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every adapter and put the plain base layers back: a model with no lowrank code in it (a quantized
    base: see ``merge_adapters``; with ``dequantize=True`` the quantized layers without an adapter become float
    ``nn.Linear`` layers too)."""
    _quantized_bases(model, dequantize)
    for name, layer in adapted_modules(model).items():
        layer.merge()
        _replace(model, name, layer.base)
    if dequantize:
        from lowrank.quantize import dequantize as dequantized

        dequantized(model)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
