"""``lowrank.adapt``: wrap a Hugging Face model's target modules in place, and the helpers around it.

``adapt`` freezes every base parameter, wraps the modules that ``targets`` name (see
``lowrank.targeting``) with the chosen adapter, and leaves trainable only the adapter parameters and
the modules the task must train (a new classification head, found by name or given as
``train_modules``). The call's arguments are kept on the model (``adapter_config(model)``) so an adapter
can be saved and rebuilt on a fresh copy of the base model.

Every method comes off again. ``remove_adapters`` (PEFT's ``unload``) puts the base layers back (unmerged),
takes off an injected module with the hooks and config values it changed, and restores every
``requires_grad`` flag as it was before ``adapt``: modules, hooks, config and outputs are the base model's.
``merge_and_unload`` does the same after folding each ΔW into its base weight, so the outputs stay the
adapted model's; a method with no ΔW (bottleneck adapters, prefixes, prompts) is refused there. One
adapter per model: ``adapt`` refuses an adapted model (take the adapter off first); a failed ``adapt``
leaves the model as it was.
"""

from __future__ import annotations

import copy
import re
from typing import Iterable

import torch
from torch import nn

from lowrank.adapters import ADAPTERS
from lowrank.adapters import spec as adapter_spec
from lowrank.adapters.base import AdaptedLayer
from lowrank.adapters.injected import detach, injected_module
from lowrank.targeting import resolve

#: Task heads that ``adapt`` keeps trainable when ``train_modules`` is not given (PEFT's SEQ_CLS choice).
HEAD_NAMES = ("classifier", "score", "qa_outputs")
CONFIG_ATTR = "lowrank_config"
#: ``{parameter name: requires_grad}`` before ``adapt``, restored when the adapter comes off.
FLAGS_ATTR = "lowrank_requires_grad"


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


def pattern_key(patterns: dict, name: str) -> str | None:
    """The first key ``k`` of ``patterns`` whose ``(.*\\.)?(k)$`` matches module ``name`` (PEFT's
    ``rank_pattern``/``alpha_pattern`` rule, ``peft.utils.other.get_pattern_key``); None if none does."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)


def _covering(patterns: dict, name: str) -> str | None:
    """``adapt``'s rule: a key equal to the module's name, else PEFT's."""
    return name if name in patterns else pattern_key(patterns, name)


def _patterns(adapter: str, uses_rank: bool, rank_pattern, alpha_pattern) -> tuple[dict, dict]:
    ranks, alphas = dict(rank_pattern or {}), dict(alpha_pattern or {})
    if (ranks or alphas) and not uses_rank:
        ranked = ", ".join(n for n, s in ADAPTERS.items() if s.uses_rank)
        raise ValueError(f"rank_pattern/alpha_pattern set a per-module rank, which adapter {adapter!r} does not "
                         f"have; use one of {ranked}, or drop the patterns")
    for key in (*ranks, *alphas):
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(f"pattern key {key!r} is not a valid regex ({error}); give a module name or the "
                             f"end of one, e.g. 'layer.0.attention.self.query'") from None
    for key, value in ranks.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"rank_pattern[{key!r}]={value!r} is not a positive integer; pass e.g. {{{key!r}: 8}}")
    for key, value in alphas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"alpha_pattern[{key!r}]={value!r} is not a positive number; pass e.g. {{{key!r}: 16}}")
    return ranks, alphas


def _refuse_adapted(model: nn.Module, action: str = "adapt") -> None:
    """One adapter per model: a second one would stack on the first (two sets of hooks, wrapped wrappers)."""
    config = getattr(model, CONFIG_ATTR, None)
    found = config["adapter"] if config is not None else next(
        (type(m).__name__ for m in (*adapted_modules(model).values(), injected_module(model)) if m is not None), None)
    if found is not None:
        raise ValueError(f"model is already adapted with {found!r}; {action} takes a base model: call "
                         f"lowrank.remove_adapters(model) (or lowrank.merge_and_unload(model) to keep its update) "
                         f"first, or use a fresh copy of the base model")


def adapt(model: nn.Module, adapter: str, *, targets: Iterable[str] | None = None, rank: int | None = 8,
          alpha: float | None = None, layers: Iterable[int] | int | None = None, rank_pattern: dict | None = None,
          alpha_pattern: dict | None = None, **options) -> nn.Module:
    """Adapt ``model`` in place with ``adapter`` and return it.

    Args:
        adapter: a name in ``lowrank.ADAPTERS``: {adapters}.
        targets: paper names ``q``, ``k``, ``v``, ``o`` (also ``gate``, ``up``, ``down``), mapped per
            architecture family, or explicit module names (exact, suffix, or ``re:<regex>``). Default: the
            registry entry's ``default_targets`` (``[q, v]``, LoRA §4.2, unless the method says otherwise).
        rank: r of the low-rank update (LoRA/DoRA/FLoRA); the bottleneck width of houlsby/pfeiffer.
        alpha: LoRA's α; the scaling is α/r (α/√r with ``rslora=True``). ``None`` means α = r.
        layers: layer indices to adapt (default: all).
        rank_pattern, alpha_pattern: ``{module: r}`` / ``{module: α}`` for modules whose rank or α differ
            from ``rank``/``alpha`` (PEFT's options of the same names and matching rule: a key equal to a
            wrapped module's name, or a regex matching the end of it); an α left out follows that module's r
            when ``alpha`` is None.
        options: each method's keyword options, as its registry entry lists them ({options}), documented
            in its module (``lowrank/adapters/``); and ``train_modules`` (modules trained in full besides the
            adapter; default: a ``classifier``/``score``/``qa_outputs`` head if the model has one).

    Raises ValueError (one line, nothing changed) for a bad value or an already adapted model.
    """
    spec = adapter_spec(adapter)
    _refuse_adapted(model)
    train_modules = options.pop("train_modules", None)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for adapter {adapter!r}; it takes {list(spec.options) or 'none'}")
    if "dropout" in options:
        _check_dropout(options["dropout"])
    if spec.uses_rank:
        _check_rank(rank)
        _check_alpha(alpha)
    ranks, alphas = _patterns(adapter, spec.uses_rank, rank_pattern, alpha_pattern)
    heads = _head_names(model, train_modules)
    if adapter == "head" and not heads:
        raise ValueError(f"adapter='head' found no task head on {type(model).__name__}; pass "
                         f"train_modules=[<head module name>]")

    setattr(model, FLAGS_ATTR, {name: p.requires_grad for name, p in model.named_parameters()})
    try:
        targets, wrapped = _install(model, spec, targets, rank, alpha, layers, ranks, alphas, options, heads)
    except BaseException:
        remove_adapters(model)  # a failed adapt leaves the model as it was
        raise
    config = {
        "adapter": adapter,
        "targets": None if targets is None else list(targets),
        "rank": rank if spec.uses_rank else None,
        "alpha": alpha if spec.uses_rank else None,
        "layers": None if layers is None else ([layers] if isinstance(layers, int) else list(layers)),
        "options": copy.deepcopy(options),
        "train_modules": heads,
        "modules": wrapped,
    }
    if ranks or alphas:
        config.update(rank_pattern=ranks, alpha_pattern=alphas)
    setattr(model, CONFIG_ATTR, config)
    return model


def _install(model, spec, targets, rank, alpha, layers, ranks, alphas, options, heads) -> tuple[list | None, list]:
    """``adapt``'s changes to the model: flags, wrapped layers, injection, trained heads."""
    for name, p in model.named_parameters():
        p.requires_grad_(spec.trains is not None and spec.trains(name))
    wrapped: list[str] = []
    if spec.wraps:
        targets = list(spec.default_targets if targets is None else
                       ([targets] if isinstance(targets, str) else targets))
        chosen = [t for t in resolve(model, targets, layers)  # a trained head is trained in full, not adapted
                  if not any(t.name == h or t.name.startswith(h + ".") for h in heads)]
        for patterns, what in ((ranks, "rank_pattern"), (alphas, "alpha_pattern")):
            covered = {_covering(patterns, t.name) for t in chosen}
            stray = [k for k in patterns if k not in covered]
            if stray:
                example = chosen[0].name if chosen else "<module name>"
                raise ValueError(f"{what} key {stray[0]!r} matches no adapted module; name one of them, e.g. "
                                 f"{example!r}, or the end of its name")
        for target in chosen:
            r = ranks.get(_covering(ranks, target.name), rank)
            a = alphas.get(_covering(alphas, target.name), alpha)  # None: α = this module's r
            _replace(model, target.name, spec.build(target, r, a, options))
            wrapped.append(target.name)
    if spec.inject is not None:  # model-level methods: prefixes, prompts, block selection
        spec.inject(model, targets=targets, layers=layers, rank=rank, options=options)
    for name, module in model.named_modules():
        if any(name == h or name.endswith("." + h) for h in heads):
            for p in module.parameters():
                p.requires_grad_(True)
    return targets, wrapped


adapt.__doc__ = adapt.__doc__.replace("{adapters}", ", ".join(ADAPTERS)).replace("{options}", "; ".join(
    f"{name}: {', '.join(spec.options)}" for name, spec in ADAPTERS.items() if spec.options))


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


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take the adapter off (PEFT's ``unload``): the base layers back in place, unmerged first (PEFT leaves a
    merged weight merged), the injected module off with its hooks and the config values it changed, every
    ``requires_grad`` flag as before ``adapt``, and no adapter config: modules, hooks, config and outputs
    are the base model's. Weights a method trains in place (full, top, gradual, BitFit, heads, trained
    LayerNorms) keep their trained values: they are the model's own. A model without an adapter is returned
    as it is."""
    for name, layer in adapted_modules(model).items():
        _replace(model, name, layer.release())
    detach(model)
    flags = getattr(model, FLAGS_ATTR, None) or {}
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    for attr in (CONFIG_ATTR, FLAGS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


#: PEFT's name (``PeftModel.unload``) for ``remove_adapters``.
unload = remove_adapters


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every ΔW into its base weight, then take the adapter off as ``remove_adapters`` does: a model with
    no lowrank code in it whose outputs are the adapted model's. A method whose function no weight holds
    (bottleneck adapters, prefixes, prompts) is refused with one line, the model unchanged. A quantized base
    is refused unless ``dequantize=True`` (see ``merge_adapters``), which also turns the quantized layers
    without an adapter into float ``nn.Linear`` layers."""
    config = getattr(model, CONFIG_ATTR, None) or {}
    injected = injected_module(model)
    for module in (*adapted_modules(model).values(), injected):
        if module is not None and not module.mergeable:
            raise ValueError(f"adapter {config.get('adapter', module.adapter_name)!r} adds {module.adds}, not a ΔW, so no "
                             f"weight can hold it: keep the adapted model, or take the adapter off with "
                             f"lowrank.remove_adapters(model) (the base model's outputs)")
    _quantized_bases(model, dequantize)
    for name, layer in adapted_modules(model).items():
        layer.merge()
        _replace(model, name, layer.base)  # with the merged weight in it
    if dequantize:
        from lowrank.quantize import dequantize as dequantized

        dequantized(model)
    return remove_adapters(model)
