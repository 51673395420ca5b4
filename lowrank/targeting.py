"""Which modules of a Hugging Face model the paper's names q, k, v, o (and FFN names) refer to.

A *family* maps each paper name to a regular expression over qualified module names, or, for a fused
projection, to ``(regex, slicer)`` where ``slicer(out_features, config)`` gives the output rows of that
matrix. Families are chosen by ``model.config.model_type``. Targets that are not paper names are
explicit module names: an exact qualified name, a name suffix (``"query"`` matches
``...attention.self.query``, PEFT's rule) or, with a ``re:`` prefix, a regular expression that must
match the whole name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lowrank.adapters.base import layer_kind

PAPER_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")

Slicer = Callable[[int, object], torch.Tensor]


def _contiguous_third(i: int) -> Slicer:
    """GPT-2's c_attn: output rows are [q | k | v], each d_model wide."""
    def rows(out: int, config) -> torch.Tensor:
        d = out // 3
        return torch.arange(i * d, (i + 1) * d)
    return rows


def _interleaved_per_head(i: int) -> Slicer:
    """GPT-NeoX's query_key_value: rows are laid out (heads, 3, head_dim)."""
    def rows(out: int, config) -> torch.Tensor:
        heads = config.num_attention_heads
        head_dim = out // (3 * heads)
        return (torch.arange(heads)[:, None] * 3 * head_dim + i * head_dim + torch.arange(head_dim)).flatten()
    return rows


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    targets: dict[str, str | tuple[str, Slicer]] = field(default_factory=dict)


_ATTN = r"(?:self_attn|encoder_attn)\."  # OPT/BART/Whisper: self-attention and (seq2seq) cross-attention

FAMILIES = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "ernie", "xmod"), {
        "q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value",
        "o": r"attention\.output\.dense", "up": r"intermediate\.dense", "down": r"(?<!attention\.)output\.dense",
    }),
    Family("deberta", ("deberta", "deberta-v2"), {
        "q": r"attention\.self\.query_proj", "k": r"attention\.self\.key_proj",
        "v": r"attention\.self\.value_proj", "o": r"attention\.output\.dense",
        "up": r"intermediate\.dense", "down": r"(?<!attention\.)output\.dense",
    }),
    Family("distilbert", ("distilbert",), {
        "q": r"attention\.q_lin", "k": r"attention\.k_lin", "v": r"attention\.v_lin", "o": r"attention\.out_lin",
        "up": r"ffn\.lin1", "down": r"ffn\.lin2",
    }),
    Family("gpt2", ("gpt2",), {
        "q": (r"attn\.c_attn", _contiguous_third(0)), "k": (r"attn\.c_attn", _contiguous_third(1)),
        "v": (r"attn\.c_attn", _contiguous_third(2)), "o": r"attn\.c_proj",
        "up": r"mlp\.c_fc", "down": r"mlp\.c_proj",
    }),
    Family("llama", ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                     "olmo2", "smollm3", "granite", "starcoder2", "cohere"), {
        "q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj", "o": r"self_attn\.o_proj",
        "gate": r"mlp\.gate_proj", "up": r"mlp\.up_proj", "down": r"mlp\.down_proj",
    }),
    Family("opt", ("opt", "bart", "mbart", "blenderbot", "marian", "pegasus", "whisper"), {
        "q": _ATTN + r"q_proj", "k": _ATTN + r"k_proj", "v": _ATTN + r"v_proj", "o": _ATTN + r"out_proj",
        "up": r"fc1", "down": r"fc2",
    }),
    Family("t5", ("t5", "mt5", "umt5"), {  # encoder self-attention, decoder self- and cross-attention
        "q": r"(?:SelfAttention|EncDecAttention)\.q", "k": r"(?:SelfAttention|EncDecAttention)\.k",
        "v": r"(?:SelfAttention|EncDecAttention)\.v", "o": r"(?:SelfAttention|EncDecAttention)\.o",
        "gate": r"DenseReluDense\.wi_0", "up": r"DenseReluDense\.wi(?:_1)?", "down": r"DenseReluDense\.wo",
    }),
    Family("gpt_neox", ("gpt_neox",), {
        "q": (r"attention\.query_key_value", _interleaved_per_head(0)),
        "k": (r"attention\.query_key_value", _interleaved_per_head(1)),
        "v": (r"attention\.query_key_value", _interleaved_per_head(2)),
        "o": r"attention\.dense", "up": r"mlp\.dense_h_to_4h", "down": r"mlp\.dense_4h_to_h",
    }),
)


def family_of(model: nn.Module) -> Family | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def layer_index(name: str) -> int | None:
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def candidates(model: nn.Module, limit: int = 30) -> str:
    """The distinct short names of the model's wrappable layers, for error messages."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if layer_kind(module) and not LAYER_INDEX.fullmatch(name):
            short = re.sub(r"^.*?\.(?:layer|layers|h|block|blocks)\.\d+\.", "", name)
            seen.setdefault(short, None)
    names = list(seen)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@dataclass
class Target:
    """One module to wrap; ``slices`` maps paper names to output rows for a fused projection."""
    name: str
    module: nn.Module
    slices: dict[str, torch.Tensor] | None = None
    paper_names: list[str] = field(default_factory=list)


def _explicit_matcher(target: str) -> Callable[[str], bool]:
    if target.startswith("re:"):
        pattern = re.compile(target[3:])
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: name == target or name.endswith("." + target)


def resolve(model: nn.Module, targets, layers=None) -> list[Target]:
    """The modules ``targets`` name in ``model``, restricted to layer indices ``layers``."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets=[] names no module; give paper names such as targets=[q,v] or module names")
    wanted_layers = None if layers is None else {int(i) for i in ([layers] if isinstance(layers, int) else layers)}
    family = family_of(model)
    paper = [t for t in targets if t in PAPER_NAMES]
    if paper and family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"model_type {model_type!r} has no map for paper names {paper}; pass module names as "
                         f"targets instead, from: {candidates(model)}")

    found: dict[str, Target] = {}
    modules = dict(model.named_modules())
    for target in targets:
        hits = 0
        if target in PAPER_NAMES:
            spec = family.targets.get(target)
            if spec is None:
                raise ValueError(f"target {target!r} is not defined for the {family.name} family; use one of "
                                 f"{sorted(family.targets)} or module names from: {candidates(model)}")
            pattern, slicer = (spec, None) if isinstance(spec, str) else spec
            regex = re.compile(rf"(?:^|.*\.){pattern}")
            match = lambda name, regex=regex: regex.fullmatch(name) is not None
        elif target in CONV_KINDS:
            slicer, match = None, conv_kind_matcher(model, target)
        else:
            slicer, match = None, _explicit_matcher(target)
        for name, module in modules.items():
            if not match(name) or layer_kind(module) is None:
                continue
            if wanted_layers is not None and layer_index(name) not in wanted_layers:
                continue
            hits += 1
            entry = found.setdefault(name, Target(name, module))
            entry.paper_names.append(target)
            if slicer is not None:
                from lowrank.adapters.base import features
                out = features(module, layer_kind(module))[1]
                entry.slices = {**(entry.slices or {}), target: slicer(out, model.config)}
        if hits == 0:
            where = f" in layers {sorted(wanted_layers)}" if wanted_layers is not None else ""
            raise ValueError(f"target {target!r} matched no adaptable module{where} of {type(model).__name__}; "
                             f"choose from q, k, v, o (mapped per family) or module names: {candidates(model)}")
    return list(found.values())


# ---- convolutions by layer kind (ConvNets) ----------------------------------------------------------------

#: ``conv``: every k×k convolution with k > 1 (depthwise and stem included); ``pointwise``: every 1×1
#: convolution; ``depthwise``: groups = input channels = output channels / multiplier (one filter per channel);
#: ``stem``: the model's first convolution (module order). ``layers=[...]`` selects by stage: the index after
#: ``blocks.``/``layers.`` in the module name (timm's ``blocks.<stage>.<i>``).
CONV_KINDS = ("conv", "pointwise", "depthwise", "stem")


def conv_kind(module: nn.Module) -> set[str]:
    """The kinds (``CONV_KINDS`` without ``stem``) of one module; empty for anything but an ``nn.Conv2d``."""
    if not isinstance(module, nn.Conv2d):
        return set()
    kinds = {"conv"} if max(module.kernel_size) > 1 else {"pointwise"}
    if module.groups > 1 and module.groups == module.in_channels:
        kinds.add("depthwise")
    return kinds


def conv_kind_matcher(model: nn.Module, kind: str) -> Callable[[str], bool]:
    """Whether a qualified module name is a convolution of ``kind``."""
    modules = dict(model.named_modules())
    if kind == "stem":
        first = next((n for n, m in modules.items() if isinstance(m, nn.Conv2d)), None)
        return lambda name: name == first
    return lambda name: kind in conv_kind(modules[name])
