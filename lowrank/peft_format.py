"""PEFT's on-disk LoRA/DoRA and AdaLoRA formats (``PeftModel.save_pretrained`` / ``from_pretrained``), both ways.

Files: ``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight`` / ``lora_magnitude_vector`` (convolutions keep PEFT's 4-D shapes, DoRA's conv
magnitude included: ``(1, out, 1, 1)``; embeddings use ``lora_embedding_A``/``_B``), the modules to save
under their own names, and PEFT's ``adapter_config.json``.

Reading follows PEFT 0.21's own rules (``peft.tuners.tuners_utils.check_target_module_exists``,
``peft.utils.other.get_pattern_key``), so an adapter adapts exactly the modules PEFT would adapt:

- ``target_modules``: a list of module names, each matching a qualified name exactly or as a dotted
  suffix (T5's ``q``, ``v`` are module names here, not the paper's q, v), or one regex string that must
  match the whole name;
- ``exclude_modules`` (same two forms), ``modules_to_save`` (trained in full, never adapted),
  ``layers_to_transform`` with ``layers_pattern`` (list targets only, as in PEFT);
- ``rank_pattern``/``alpha_pattern``: the first key ``k`` with ``(.*\\.)?(k)$`` matching the name;
- ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``use_dora``.

Options that change the function and that lowrank does not implement are refused with one line
(``REFUSED``). Writing: a q,v-sliced GPT-2 ``c_attn`` (``FusedLoRA``) is written as one LoRA of rank
Σr on the whole ``c_attn``: A = [A_q; A_v], B block-structured (each slice's B in its own rows and
rank columns, zero rows for k), and α chosen so the scale α/r (α/√r with rsLoRA) is unchanged; PEFT
then computes exactly the same ΔW.

AdaLoRA (``peft_type: ADALORA``): see the section at the end of this file.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lowrank.adapters import DoRA, FusedLoRA, LoRA, layer_kind
from lowrank.adapters.lora import converted_factors
from lowrank.adapters.adalora import ALLOCATION, AdaDoRA
from lowrank.atomic import write_json
from lowrank.core import adapt, adapted_modules, adapter_config, pattern_key, trainable_state_dict
from lowrank.io import load_into, load_tensors, loading, read_json, save_tensors, weights_file

PEFT_WEIGHTS, PEFT_CONFIG, PEFT_PREFIX = "adapter_model.safetensors", "adapter_config.json", "base_model.model."
LORA_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)")

#: LoraConfig fields that change what the adapter computes and that lowrank does not implement:
#: field -> (its value when unused, what to do instead). Set to anything else, the load is refused.
REFUSED = {
    "bias": ("none", "re-train with bias='none' (lowrank trains no base biases alongside LoRA)"),
    "lora_bias": (False, "re-train with lora_bias=False (lowrank's lora_B has no bias)"),
    "layer_replication": (None, "merge the replicated layers into the base model first"),
    "target_parameters": (None, "target modules instead of parameters"),
    "trainable_token_indices": (None, "save the trained embedding rows into the base model"),
    "use_qalora": (False, "use plain LoRA"),
    "alora_invocation_tokens": (None, "use plain LoRA"),
    "megatron_config": (None, "save the adapter from an unsharded model"),
    "arrow_config": (None, "load the experts as separate plain LoRA adapters"),
    "use_bdlora": (None, "use plain LoRA"),
    "kasa_config": (None, "use plain LoRA"),
    "monteclora_config": (None, "use plain LoRA"),
    "velora_config": (None, "use plain LoRA"),
    "loftq_config": ({}, "LoftQ changes the base weights: merge and save the full model"),
}
#: initialisations that rewrite the base weights: the adapter needs that rewritten base
BASE_CHANGING_INITS = ("pissa", "olora", "corda")

#: PEFT task type by the head a model class carries (the class-name suffix PEFT's auto classes use)
TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
              ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
              ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for the model's head (``None`` for a bare backbone)."""
    name = type(model).__name__
    if name.endswith("Model") and not name.endswith("LMHeadModel"):
        return "FEATURE_EXTRACTION"
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)


# ---- writing ---------------------------------------------------------------------------------------

def _peft_layer(name: str, layer, rslora: bool = False) -> tuple[dict[str, torch.Tensor], int, float]:
    """``(tensors in PEFT's layout, rank, alpha)`` of one adapted layer, as PEFT would hold it."""
    prefix = PEFT_PREFIX + name
    if isinstance(layer, FusedLoRA):
        parts = list(layer.slices.values())
        rank = sum(s.lora_A.shape[0] for s in parts)
        A = torch.cat([s.lora_A for s in parts])
        B = A.new_zeros(layer.out_features, rank)
        col = 0
        for s in parts:
            B[s.rows, col:col + s.lora_A.shape[0]] = s.lora_B.detach()
            col += s.lora_A.shape[0]
        # the same scale on rank Σr: α' = scale·r' (α/r), or scale·√r' with rsLoRA (α/√r)
        alpha = layer.scaling * (math.sqrt(rank) if rslora else rank)
        return {f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B}, rank, alpha
    if not isinstance(layer, LoRA):
        raise ValueError(f"{name!r} is a {type(layer).__name__}; PEFT's LoRA format holds LoRA/DoRA layers only")
    A, B = layer.lora_A, layer.lora_B
    if layer.kind == "embedding":
        return {f"{prefix}.lora_embedding_A": A, f"{prefix}.lora_embedding_B": B}, layer.rank, layer.alpha
    if layer.kind == "conv2d":
        A, B = A.reshape(layer.rank, *layer.base.weight.shape[1:]), B[:, :, None, None]
    keys = {f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B}
    if isinstance(layer, DoRA):
        keys[f"{prefix}.lora_magnitude_vector"] = layer.magnitude.view(1, -1, 1, 1) if layer.kind == "conv2d" \
            else layer.magnitude
    return keys, layer.rank, layer.alpha


def _converted(name: str, layer, rslora: bool) -> tuple[dict[str, torch.Tensor], int, float]:
    """A PiSSA/MiLoRA/OLoRA layer as the plain rank-2r LoRA that applies to the original base, as PEFT writes it
    with ``path_initial_model_for_weight_conversion``: A' = [A; A0], B' = [B, −B0], same scale (α' = s·2r)."""
    A, B = converted_factors(layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_A0, layer.lora_B0)
    rank = 2 * layer.rank
    prefix = PEFT_PREFIX + name
    keys = {f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B}
    if isinstance(layer, DoRA):  # m (W0 + s B'A') / ‖·‖ = m (W_res + s BA) / ‖·‖: the magnitude carries over
        keys[f"{prefix}.lora_magnitude_vector"] = layer.magnitude
    return keys, rank, layer.scaling * (math.sqrt(rank) if rslora else rank)


def save_peft(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write a LoRA/DoRA-adapted model in PEFT's on-disk format (loadable by ``PeftModel.from_pretrained``)."""
    config = adapter_config(model)
    if config["adapter"] == "adalora":
        return _save_adalora(model, config, Path(path), base_model_name_or_path)
    if config["adapter"] not in ("lora", "dora"):
        raise ValueError(f"PEFT's LoRA format holds lora, dora or adalora adapters, not {config['adapter']!r}; "
                         f"use lowrank.save_adapter")
    if any(isinstance(layer, AdaDoRA) for layer in adapted_modules(model).values()):
        raise ValueError("dora with allocate=adalora is this project's combination, which PEFT has no format for; "
                         "use lowrank.save_adapter")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    layers = adapted_modules(model)
    for name, layer in layers.items():
        keys, ranks[name], alphas[name] = _peft_layer(name, layer, config["options"].get("rslora", False))
        if getattr(layer, "lora_A0", None) is not None:  # an init from W: PEFT's conversion to plain LoRA
            keys, ranks[name], alphas[name] = _converted(name, layer, config["options"].get("rslora", False))
        tensors.update(keys)
    for name, p in trainable_state_dict(model).items():
        if any(name.startswith(h + ".") for h in config["train_modules"]):
            tensors[PEFT_PREFIX + name] = p
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    options = config["options"]
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": options.get("dropout", 0.0),
        "use_rslora": options.get("rslora", False),
        "use_dora": config["adapter"] == "dora",
        "target_modules": sorted(layers),
        "modules_to_save": config["train_modules"] or None,
        "fan_in_fan_out": any(layer.kind == "conv1d" for layer in layers.values()),
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # PEFT's pattern keys are regexes matched against the end of a name: escape the exact names
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / PEFT_WEIGHTS, tensors, {"format": "pt"})
    write_json(path / PEFT_CONFIG, peft_config, sort_keys=True)
    return path


# ---- reading ---------------------------------------------------------------------------------------

def read_peft_config(path: Path) -> dict:
    """PEFT's adapter_config.json, refusing (one line each) what lowrank does not implement."""
    if not (path / PEFT_CONFIG).is_file():
        raise FileNotFoundError(f"no {PEFT_CONFIG} in {str(path)!r}; point at a folder written by PEFT's "
                                f"save_pretrained")
    config = read_json(path / PEFT_CONFIG)
    if config.get("peft_type") not in ("LORA", "ADALORA"):
        found = "lowrank's own format (use lowrank.load_adapter)" if "format" in config \
            else f"a {config.get('peft_type')} adapter"
        raise ValueError(f"{str(path)!r} holds {found}; load_peft reads PEFT LORA (with or without use_dora) and "
                         f"ADALORA adapters")
    for key, (unused, fix) in REFUSED.items():
        if config.get(key) not in (unused, None):
            raise ValueError(f"{str(path)!r} sets {key}={config[key]!r}, which lowrank does not implement; {fix}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(f"{str(path)!r} has init_lora_weights={init!r}, which rewrites the base weights; save it "
                         f"from PEFT with path_initial_model_for_weight_conversion so it applies to the original base")
    if not config.get("target_modules"):
        raise ValueError(f"{str(path)!r} has no target_modules; lowrank reads adapters that name their modules")
    return config


def _names_match(spec, name: str) -> bool:
    """PEFT's rule: a string is a regex on the whole name; a list matches exactly or as a dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def _layer_index(name: str, pattern) -> int | None:
    """The first numbered segment after ``layers_pattern`` (any segment when unset), as PEFT finds it."""
    patterns = [pattern] if isinstance(pattern, str) else (pattern or [])
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns)), None)
    return int(match.group("idx")) if match else None


def peft_targets(model: nn.Module, config: dict, source: str) -> list[str]:
    """The qualified names of the modules PEFT would adapt in ``model`` for this config."""
    targets, exclude = config["target_modules"], config.get("exclude_modules")
    save = config.get("modules_to_save") or []
    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    found = []
    for name, module in model.named_modules():
        if not name or (exclude and _names_match(exclude, name)):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in save) or not _names_match(targets, name):
            continue
        if layers and not isinstance(targets, str) and _layer_index(name, config.get("layers_pattern")) not in layers:
            continue
        if layer_kind(module) is None:
            raise ValueError(f"target_modules {targets!r} of {source!r} match {name!r}, a {type(module).__name__}, "
                             f"which lowrank cannot wrap; load it into the base model it was trained on")
        found.append(name)
    if not found:
        raise ValueError(f"target_modules {targets!r} of {source!r} match no module of {type(model).__name__}; "
                         f"load it into the base model it was trained on")
    return found


def _pattern(patterns: dict, names: list[str]) -> dict:
    """``{module: value}`` for the modules a PEFT rank/alpha pattern covers (its first matching key); keys
    that cover none of them, which PEFT ignores, are left out."""
    return {name: patterns[key] for name in names if (key := pattern_key(patterns, name)) is not None}


def _from_peft(model: nn.Module, raw: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's parameter names, each name and shape checked."""
    ours = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B", "lora_A.weight": "lora_A",
            "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}
    expected: dict[str, tuple[str, torch.Size, torch.Size]] = {}  # PEFT key -> (our name, PEFT shape, our shape)
    layers = adapted_modules(model)
    for name, layer in layers.items():
        for key, value in _peft_layer(name, layer)[0].items():
            param = ours[LORA_KEY.fullmatch(key).group(2)]
            expected[key] = (f"{name}.{param}", value.shape, getattr(layer, param).shape)
    fix = "load it into the base model it was trained on"
    tensors = {}
    for key, value in raw.items():
        if key in expected:
            param, peft_shape, shape = expected[key]
            if value.shape != peft_shape:
                raise ValueError(f"{key[len(PEFT_PREFIX):]}: saved shape {tuple(value.shape)} != model shape "
                                 f"{tuple(peft_shape)} in {source!r}: the model's width or rank differs; {fix}")
            tensors[param] = value.reshape(shape)
            continue
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        lora = LORA_KEY.fullmatch(name)
        if lora is not None and lora.group(1) in layers:
            kind = type(layers[lora.group(1)]).__name__
            raise ValueError(f"{source!r} holds {lora.group(2)} for {lora.group(1)!r}, which its {kind} layer does not "
                             f"have: the weights are of another adapter type than the config's (use_dora); "
                             f"fix use_dora in its adapter_config.json")
        if lora is not None:
            raise ValueError(f"{source!r} holds weights for {lora.group(1)!r}, which this model does not adapt "
                             f"(no such module, or target_modules do not match it): different layers; {fix}")
        tensors[name.replace(".modules_to_save.default.", ".")] = value
    missing = sorted({k.rsplit(".lora_", 1)[0] for k in expected if k not in raw})
    if missing:
        raise ValueError(f"{source!r} has no weights for {missing[0][len(PEFT_PREFIX):]!r} ({len(missing)} module(s) "
                         f"in all), which its target_modules name in this model: the model has more layers; {fix}")
    return tensors


def load_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Adapt a fresh base ``model`` from a PEFT LoRA/DoRA adapter folder and load its weights; on any
    mismatch the model is left exactly as it was."""
    path = Path(path)
    config = read_peft_config(path)
    raw = load_tensors(weights_file(path, PEFT_WEIGHTS))
    names = peft_targets(model, config, str(path))
    modules = {n for n, _ in model.named_modules()}
    heads = [m for m in config.get("modules_to_save") or [] if m in modules or any(n.endswith("." + m) for n in modules)]
    if config["peft_type"] == "ADALORA":
        return _load_adalora(model, config, raw, names, heads, str(path))
    with loading(model):
        adapt(model, "dora" if config.get("use_dora") else "lora", targets=names, rank=config["r"],
              alpha=config["lora_alpha"], dropout=config.get("lora_dropout") or 0.0,
              rslora=bool(config.get("use_rslora")), train_modules=heads,
              rank_pattern=_pattern(config.get("rank_pattern") or {}, names),
              alpha_pattern=_pattern(config.get("alpha_pattern") or {}, names))
        load_into(model, _from_peft(model, raw, str(path)), str(path), complete=True)
    return model


# ---- AdaLoRA (PEFT 0.21 ``peft.tuners.adalora``) ---------------------------------------------------------
# Keys ``<module>.lora_A`` = Q (k, in), ``lora_E`` = λ (k, 1), ``lora_B`` = P (out, k), no ``.weight``, and no
# ``ranknum`` (PEFT rebuilds it as init_r). Once ranks are allocated, ``rank_pattern`` maps ``<module>.lora_E`` to
# the kept triplets (a list of booleans of length init_r) and only those are stored (k = their number): PEFT's
# ``resize_state_dict_by_rank_pattern``; loading puts them back in place, with zeros for the others.
ADALORA_KEYS = {"lora_A": "lora_Q", "lora_E": "lora_E", "lora_B": "lora_P"}


def _save_adalora(model: nn.Module, config: dict, path: Path, base_model_name_or_path: str | None) -> Path:
    layers = adapted_modules(model)
    first = next(iter(layers.values()))
    options = {**ALLOCATION, **{k: v for k, v in config["options"].items() if v is not None}}
    masked = any(not bool(layer.rank_mask.all()) for layer in layers.values())
    tensors, pattern = {}, {}
    for name, layer in layers.items():
        keep = layer.rank_mask if masked else torch.ones_like(layer.rank_mask)
        for peft_key, ours in ADALORA_KEYS.items():
            value = getattr(layer, ours)
            tensors[f"{PEFT_PREFIX}{name}.{peft_key}"] = value[:, keep] if ours == "lora_P" else value[keep]
        if masked:
            pattern[f"{name}.lora_E"] = layer.rank_mask.tolist()
    for name, p in trainable_state_dict(model).items():
        if any(name.startswith(h + ".") for h in config["train_modules"]):
            tensors[PEFT_PREFIX + name] = p
    # PEFT validates the schedule even for inference: the run's own steps, else the smallest valid schedule
    total, (tinit, tfinal) = config.get("total_steps") or 1, config.get("schedule_steps") or (0, 0)
    peft_config = {
        "peft_type": "ADALORA",
        "task_type": task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": 8, "init_r": first.rank,  # r: PEFT's default, which AdaLoRA ignores (it warns on any other)
        "target_r": first.target_rank, "lora_alpha": first.alpha,
        "lora_dropout": options.get("dropout", 0.0),
        "tinit": tinit, "tfinal": tfinal, "deltaT": options["deltaT"], "total_step": total,
        "beta1": options["beta1"], "beta2": options["beta2"], "orth_reg_weight": options["orth_reg_weight"],
        "rank_pattern": pattern or None,
        "target_modules": sorted(layers),
        "modules_to_save": config["train_modules"] or None,
        "fan_in_fan_out": any(layer.kind == "conv1d" for layer in layers.values()),
        "bias": "none", "init_lora_weights": True, "inference_mode": True, "use_dora": False, "use_rslora": False,
    }
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / PEFT_WEIGHTS, tensors, {"format": "pt"})
    write_json(path / PEFT_CONFIG, peft_config, sort_keys=True)
    return path


def _load_adalora(model: nn.Module, config: dict, raw: dict[str, torch.Tensor], names: list[str], heads: list[str],
                  source: str) -> nn.Module:
    pattern = config.get("rank_pattern") or {}
    init_r = config.get("init_r", 12)
    fix = "load it into the base model it was trained on"
    with loading(model):
        adapt(model, "adalora", targets=names, rank=min(config.get("target_r", 8), init_r),
              alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout") or 0.0, init_r=init_r,
              tinit=config.get("tinit", 0), tfinal=config.get("tfinal", 0),
              deltaT=config.get("deltaT", 1), beta1=config.get("beta1", 0.85), beta2=config.get("beta2", 0.85),
              orth_reg_weight=config.get("orth_reg_weight", 0.5), train_modules=heads)
        layers = adapted_modules(model)
        tensors, masks = {}, {}
        for name, layer in layers.items():
            keep = torch.tensor(pattern.get(f"{name}.lora_E", [True] * layer.rank), dtype=torch.bool)
            if keep.numel() != layer.rank:
                raise ValueError(f"rank_pattern of {name!r} in {source!r} has {keep.numel()} entries, not init_r="
                                 f"{layer.rank}; fix the adapter_config.json or {fix}")
            for peft_key, ours in ADALORA_KEYS.items():
                key = f"{PEFT_PREFIX}{name}.{peft_key}"
                if key not in raw:
                    raise ValueError(f"{source!r} has no {peft_key} for {name!r}, which its target_modules name in this "
                                     f"model: the model has more layers; {fix}")
                value, full = raw.pop(key), getattr(layer, ours)
                want = (full.shape[0], int(keep.sum())) if ours == "lora_P" else (int(keep.sum()), full.shape[1])
                if tuple(value.shape) != want:
                    raise ValueError(f"{name}.{peft_key}: saved shape {tuple(value.shape)} != {want} in {source!r}: the "
                                     f"model's width or the adapter's ranks differ; {fix}")
                placed = torch.zeros_like(full)
                if ours == "lora_P":
                    placed[:, keep] = value.to(placed.dtype)
                else:
                    placed[keep] = value.to(placed.dtype)
                tensors[f"{name}.{ours}"] = placed
            masks[name] = keep
        for key, value in raw.items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if any(name.startswith(m + ".") for m in layers):
                raise ValueError(f"{source!r} holds {name!r}, which PEFT's AdaLoRA layer does not have; {fix}")
            tensors[name.replace(".modules_to_save.default.", ".")] = value
        load_into(model, tensors, source, complete=True)
        for name, keep in masks.items():
            layers[name].rank_mask.copy_(keep)
    return model
