"""Which modules of a Hugging Face model the paper's names q, k, v, o (and FFN names) refer to.

Any model is read from its module tree (``structure``: attentions found by their projections' names and
checked by shapes, fused projections sliced by their model type's layout, the MLP of each block by name).
A *family* overrides that reading for its model types: it maps each paper name to a regular expression
over qualified module names, or, for a fused projection, to ``(regex, slicer)`` where
``slicer(out_features, config)`` gives the output rows of that matrix. Families are chosen by
``model.config.model_type``; ``resolve`` dispatches each target in ``_matches``. Targets that are not paper
names are explicit module names: an exact qualified name, a name suffix (``"query"`` matches
``...attention.self.query``, PEFT's rule) or, with a ``re:`` prefix, a regular expression that must
match the whole name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lowrank.adapters.base import features, layer_kind

PAPER_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")

Slicer = Callable[[int, object], torch.Tensor]


def split_rows(groups: int, parts: tuple[tuple[str, int], ...]) -> dict[str, torch.Tensor]:
    """The output rows of each part of a fused projection laid out ``(groups, part sizes)``: ``groups=1`` is
    contiguous ([q | k | v], GPT-2's ``c_attn``, Phi-3's ``qkv_proj`` with unequal blocks under grouped-query
    attention), ``groups=heads`` is interleaved per head (GPT-NeoX, BLOOM: rows ``(heads, 3, head_dim)``)."""
    width = sum(size for _, size in parts)
    rows, offset = {}, 0
    for name, size in parts:
        rows[name] = (torch.arange(groups)[:, None] * width + offset + torch.arange(size)).flatten()
        offset += size
    return rows


def _contiguous_third(i: int) -> Slicer:
    """GPT-2's c_attn: output rows are [q | k | v], each d_model wide."""
    def rows(out: int, config) -> torch.Tensor:
        return split_rows(1, tuple((p, out // 3) for p in "qkv"))["qkv"[i]]
    return rows


def _interleaved_per_head(i: int) -> Slicer:
    """GPT-NeoX's query_key_value: rows are laid out (heads, 3, head_dim)."""
    def rows(out: int, config) -> torch.Tensor:
        heads = config.num_attention_heads
        return split_rows(heads, tuple((p, out // (3 * heads)) for p in "qkv"))["qkv"[i]]
    return rows


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    targets: dict[str, str | tuple[str, Slicer]] = field(default_factory=dict)


_ATTN = r"(?:self_attn|encoder_attn)\."  # OPT/BART/Whisper: self-attention and (seq2seq) cross-attention

FAMILIES = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "xmod"), {
        "q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value",
        "o": r"attention\.output\.dense", "up": r"intermediate\.dense", "down": r"(?<!attention\.)output\.dense",
    }),
    Family("deberta", ("deberta-v2",), {
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
                     "olmo2", "smollm3", "granite", "cohere"), {
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


# ---- targets found by structure ----------------------------------------------------------------------
# A model whose type has no family is read from its module tree: an *attention* is a module whose direct
# children include a query, key and value projection (or one fused projection, or MLA's q/kv_b_proj); its
# output projection is a sibling, or a direct child of a sibling module (BERT's ``attention.output.dense``).
# The MLP of a block is found by name among the block's layers outside its attentions. Names are compared
# in lower case; shapes are checked (o reads what q or v writes; a fused projection's rows add up).

Q_NAMES = ("q_proj", "query", "q", "q_lin", "wq", "query_proj", "q_b_proj")
K_NAMES = ("k_proj", "key", "k", "k_lin", "wk", "key_proj")
V_NAMES = ("v_proj", "value", "v", "v_lin", "wv", "value_proj")
FUSED_NAMES = ("query_key_value", "qkv", "qkv_proj", "c_attn", "in_proj", "wqkv", "w_pack")
O_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out_lin", "proj", "out", "output", "projection",
           "projection_layer")
MLP_NAMES = {
    "up": ("up_proj", "fc1", "c_fc", "lin1", "wi", "wi_1", "dense_h_to_4h", "fc_in", "ffn", "w3",
           "intermediate.dense"),
    "gate": ("gate_proj", "wi_0", "w1"),
    "down": ("down_proj", "fc2", "c_proj", "lin2", "wo", "dense_4h_to_h", "fc_out", "ffn_output", "w2",
             "output.dense"),
}
FUSED_MLP_NAMES = ("gate_up_proj", "wi")  # fused when its rows are twice the down projection's input
BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")  # the outermost numbered module holding an attention: its block


def _heads(config) -> int:
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"{type(config).__name__} names no number of attention heads; pass module names as targets")


def _kv_heads(config) -> int:
    for key in ("num_key_value_heads", "num_kv_heads", "n_head_kv"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return _heads(config)


def _qkv(groups: int, q: int, k: int, v: int, order: str = "qkv") -> dict[str, torch.Tensor]:
    sizes = {"q": q, "k": k, "v": v}
    return split_rows(groups, tuple((p, sizes[p]) for p in order))


def _thirds(out: int, config) -> dict[str, torch.Tensor]:
    return _qkv(1, out // 3, out // 3, out // 3)


def _per_head(out: int, config) -> dict[str, torch.Tensor]:
    heads = _heads(config)
    return _qkv(heads, *(3 * [out // (3 * heads)]))


def _grouped_query(out: int, config) -> dict[str, torch.Tensor]:
    """[q | k | v] with heads·d, kv_heads·d, kv_heads·d rows (Phi-3's qkv_proj)."""
    heads, kv = _heads(config), _kv_heads(config)
    d = out // (heads + 2 * kv)
    return _qkv(1, heads * d, kv * d, kv * d)


def _falcon(out: int, config) -> dict[str, torch.Tensor]:
    """Falcon's ``_split_heads``: (kv_heads, heads/kv_heads + 2, d) in the new decoder architecture,
    [q | k | v] with one k and v head under multi-query attention, else (heads, 3, d)."""
    heads = _heads(config)
    if config.new_decoder_architecture:
        kv = config.num_kv_heads
        d = out // (heads + 2 * kv)
        return _qkv(kv, heads // kv * d, d, d)
    if config.multi_query:
        d = out // (heads + 2)
        return _qkv(1, heads * d, d, d)
    return _per_head(out, config)


def _gpt_bigcode(out: int, config) -> dict[str, torch.Tensor]:
    """GPTBigCode's c_attn: [q | k | v] with one k and v head under multi-query attention, else per head."""
    if config.multi_query:
        d = config.n_embd // _heads(config)
        return _qkv(1, config.n_embd, d, d)
    return _per_head(out, config)


def _codegen(out: int, config) -> dict[str, torch.Tensor]:
    """CodeGen's qkv_proj: 4 model-parallel groups of [q | v | k] (``mp_num = 4``)."""
    return _qkv(4, *(3 * [out // 12]), order="qvk")


#: How each model type lays out a fused q, k, v projection; a fused projection of a type not listed is read
#: as [q | k | v] of equal thirds (``qkv``, ``Wqkv``, ``c_attn``, ``in_proj``, ``W_pack``, as ViT-style
#: encoders and MPT do) or of heads·d, kv_heads·d, kv_heads·d rows under grouped-query attention, and
#: ``query_key_value`` as interleaved per head (GPT-NeoX, BLOOM, Persimmon).
FUSED_LAYOUTS: dict[str, Callable[[int, object], dict[str, torch.Tensor]]] = {
    "gpt2": _thirds, "mpt": _thirds, "modernbert": _thirds,
    "gpt_neox": _per_head, "bloom": _per_head, "persimmon": _per_head,
    "deberta": _per_head,  # DeBERTa v1's in_proj: transpose_for_scores(qp).chunk(3, -1)
    "phi3": _grouped_query, "falcon": _falcon, "gpt_bigcode": _gpt_bigcode, "codegen": _codegen,
}
#: Fused gate/up projections (``gate_up_proj``; ModernBERT's ``Wi``): the order of their two halves.
FUSED_MLP_ORDER = {"modernbert": ("up", "gate")}


def _fused_layout(model_type: str | None, short: str, out: int, config) -> dict[str, torch.Tensor] | None:
    if model_type in FUSED_LAYOUTS:
        return FUSED_LAYOUTS[model_type](out, config)
    if short == "query_key_value":
        return _per_head(out, config)
    try:
        heads, kv = _heads(config), _kv_heads(config)
    except ValueError:
        heads = kv = None
    if heads and kv != heads and out % (heads + 2 * kv) == 0:
        return _grouped_query(out, config)
    return _thirds(out, config) if out % 3 == 0 else None


def _out_features(module: nn.Module) -> int:
    return features(module, layer_kind(module))[1]


def _in_features(module: nn.Module) -> int:
    return features(module, layer_kind(module))[0]


def _linear_children(module: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    return {name.lower(): (name, child) for name, child in module.named_children()
            if layer_kind(child) in ("linear", "conv1d")}


def _first(children: dict, names) -> tuple[str, nn.Module] | None:
    return next((children[n] for n in names if n in children), None)


def _config_of(module: nn.Module, model: nn.Module):
    config = getattr(module, "config", None)
    return config if hasattr(config, "model_type") else getattr(model, "config", None)


def _attention(prefix: str, module: nn.Module, parent: nn.Module | None, model: nn.Module) -> dict | None:
    """``{paper name: (qualified name, rows or None)}`` for one attention module, or None if it is not one."""
    children = _linear_children(module)
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    config = _config_of(module, model)
    found, used = {}, set()
    q, k, v = _first(children, Q_NAMES), _first(children, K_NAMES), _first(children, V_NAMES)
    kv_b = children.get("kv_b_proj")
    if q and kv_b:  # multi-head latent attention (DeepSeek-V2/V3): q is q_b_proj (or q_proj); k and v are the
        # per-head [k_nope | v] rows of kv_b_proj (the rotary key part, one head shared by all from
        # kv_a_proj_with_mqa, is not k)
        heads = _heads(config)
        rows = split_rows(heads, (("k", config.qk_nope_head_dim), ("v", config.v_head_dim)))
        if _out_features(kv_b[1]) != len(rows["k"]) + len(rows["v"]):
            return None
        found = {"q": (join(q[0]), None), "k": (join(kv_b[0]), rows["k"]), "v": (join(kv_b[0]), rows["v"])}
        widths = {"q": _out_features(q[1]), "v": len(rows["v"])}
        used = {q[0], kv_b[0]}
    elif q and k and v:
        found = {p: (join(m[0]), None) for p, m in zip("qkv", (q, k, v))}
        widths = {"q": _out_features(q[1]), "v": _out_features(v[1])}
        used = {q[0], k[0], v[0]}
    elif (fused := _first(children, FUSED_NAMES)) is not None:
        out = _out_features(fused[1])
        try:
            rows = _fused_layout(config.model_type, fused[0].lower(), out, config)
        except (ValueError, AttributeError, ZeroDivisionError):
            return None
        if rows is None or sum(len(r) for r in rows.values()) != out:
            return None
        found = {p: (join(fused[0]), rows[p]) for p in "qkv"}
        widths = {"q": len(rows["q"]), "v": len(rows["v"])}
        used = {fused[0]}
    else:
        return None
    o = _first({n: c for n, c in children.items() if c[0] not in used}, O_NAMES)
    if o is not None:
        o = (join(o[0]), o[1])
    elif parent is not None:  # BERT, ViT: attention.self.{query,key,value} and attention.output.dense
        parent_prefix = prefix.rpartition(".")[0]
        for name, sibling in parent.named_children():
            if sibling is module:
                continue
            hit = _first(_linear_children(sibling), O_NAMES)
            if hit is not None:
                o = (f"{parent_prefix}.{name}.{hit[0]}".lstrip("."), hit[1])
                break
    if o is not None and _in_features(o[1]) in widths.values():
        found["o"] = (o[0], None)
    elif len(used) == 1:  # a fused projection counts as attention only with an o reading its q-wide output
        return None       # (a state-space mixer's in_proj is not one)
    return found


def _moe_experts(block: nn.Module) -> str | None:
    """The name of a block's experts when they are stored as 3-D parameters (one tensor for all experts)."""
    for name, module in block.named_modules():
        if name.rpartition(".")[2].endswith("experts") and any(p.dim() == 3 for p in module.parameters(recurse=False)):
            return name
    return None


@dataclass
class Structure:
    """What the module tree says: ``{paper name: {qualified name: rows or None}}``, and why a paper name is
    refused (``refused[name]``: one line)."""
    targets: dict[str, dict[str, torch.Tensor | None]]
    refused: dict[str, str]


def structure(model: nn.Module) -> Structure:
    """Each attention's q, k, v, o and each block's gate, up, down, found from the module tree."""
    targets: dict[str, dict] = {p: {} for p in PAPER_NAMES}
    refused: dict[str, str] = {}
    modules = dict(model.named_modules())
    attentions: list[tuple[str, dict]] = []
    for name, module in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        found = _attention(name, module, parent, model)
        if found:
            attentions.append((name, found))
            for paper, (qualified, rows) in found.items():
                targets[paper][qualified] = rows
    taken = {n for _, found in attentions for n, _ in found.values()}
    inside = tuple(f"{name}." for name, _ in attentions)
    blocks = {m.group(1) for name, _ in attentions if (m := BLOCK.match(name))}
    model_type = getattr(_config_of(model, model), "model_type", None)
    for block in sorted(blocks):
        experts = _moe_experts(modules[block])
        if experts is not None:
            for paper in ("gate", "up", "down"):
                refused[paper] = (f"{block}.{experts} stores its experts as one 3-D parameter per matrix, which no "
                                  f"adapter wraps; adapt the attention (targets=[q,k,v,o]) or name the shared "
                                  f"expert's modules")
            continue
        layers = [(f"{block}.{n}", m) for n, m in modules[block].named_modules()
                  if layer_kind(m) in ("linear", "conv1d") and not f"{block}.{n}".startswith(inside)
                  and f"{block}.{n}" not in taken]
        down_in = {_in_features(m) for n, m in layers if _mlp_name(n) == "down"}
        for name, module in layers:
            paper = _mlp_name(name)
            short = name.rpartition(".")[2].lower()
            if short in FUSED_MLP_NAMES and _out_features(module) in {2 * d for d in down_in}:
                half = _out_features(module) // 2
                order = FUSED_MLP_ORDER.get(model_type, ("gate", "up"))
                for part, rows in split_rows(1, ((order[0], half), (order[1], half))).items():
                    targets[part][name] = rows
            elif paper is not None:
                targets[paper][name] = None
    return Structure(targets, refused)


def _mlp_name(name: str) -> str | None:
    lowered = name.lower()
    for paper, names in MLP_NAMES.items():
        if any(lowered == n or lowered.endswith("." + n) for n in names):
            return paper
    return None


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


def _family_matches(model: nn.Module, family: Family, target: str) -> dict[str, torch.Tensor | None]:
    """``{qualified name: rows or None}`` for a paper name through the family table."""
    spec = family.targets.get(target)
    if spec is None:
        raise ValueError(f"target {target!r} is not defined for the {family.name} family; use one of "
                         f"{sorted(family.targets)} or module names from: {candidates(model)}")
    pattern, slicer = (spec, None) if isinstance(spec, str) else spec
    regex = re.compile(rf"(?:^|.*\.){pattern}")
    hits = {}
    for name, module in model.named_modules():
        if regex.fullmatch(name) is not None and layer_kind(module) is not None:
            hits[name] = None if slicer is None else slicer(_out_features(module), model.config)
    return hits


def _paper_matches(model: nn.Module, target: str, found: list) -> dict[str, torch.Tensor | None]:
    """A paper name: the family table when the model type has one (it overrides), else the module tree.
    ``found`` caches the structure for the targets of one call."""
    family = family_of(model)
    if family is not None:
        return _family_matches(model, family, target)
    if not found:
        found.append(structure(model))
    if target in found[0].refused:
        raise ValueError(f"target {target!r}: {found[0].refused[target]}")
    hits = found[0].targets[target]
    if not hits:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"target {target!r}: no {target} projection found in model_type {model_type!r} "
                         f"({type(model).__name__}); pass module names as targets instead, from: {candidates(model)}")
    return hits


def _matches(model: nn.Module, target: str, found: list) -> dict[str, torch.Tensor | None]:
    """``{qualified name: rows of a fused projection or None}`` that one target names; the dispatch point."""
    if target in PAPER_NAMES:
        return _paper_matches(model, target, found)
    match = conv_kind_matcher(model, target) if target in CONV_KINDS else _explicit_matcher(target)
    return {name: None for name, module in model.named_modules() if match(name) and layer_kind(module) is not None}


def resolve(model: nn.Module, targets, layers=None) -> list[Target]:
    """The modules ``targets`` name in ``model``, restricted to layer indices ``layers``."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets=[] names no module; give paper names such as targets=[q,v] or module names")
    wanted_layers = None if layers is None else {int(i) for i in ([layers] if isinstance(layers, int) else layers)}
    found: dict[str, Target] = {}
    modules = dict(model.named_modules())
    cache: list = []
    for target in targets:
        hits = 0
        for name, rows in _matches(model, target, cache).items():
            if wanted_layers is not None and layer_index(name) not in wanted_layers:
                continue
            hits += 1
            entry = found.setdefault(name, Target(name, modules[name]))
            entry.paper_names.append(target)
            if rows is not None:
                entry.slices = {**(entry.slices or {}), target: rows}
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
