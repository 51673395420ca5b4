"""Adapters on disk: lowrank's own format and PEFT's, both safetensors + JSON (never pickle).

lowrank format (a directory):
    adapter.safetensors    every trainable tensor, keyed by its qualified parameter name
    adapter_config.json    ``adapter_config(model)``: adapter, targets, rank, alpha, layers, options,
                           train_modules, the wrapped module names, and ``format``

PEFT format (``save_pretrained`` of a LoRA/DoRA ``PeftModel``): ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` / ``lora_magnitude_vector`` (convs
keep PEFT's 4-D shapes, embeddings use ``lora_embedding_A``/``_B``) and the modules to save under
their own names, plus PEFT's ``adapter_config.json``.

Files are written to a temporary name and renamed, so a reader never sees half an adapter.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank.adapters import DoRA, FusedLoRA, LoRA
from lowrank.atomic import atomic_path, write_json
from lowrank.core import adapt, adapted_modules, adapter_config, trainable_state_dict

FORMAT = "lowrank-adapter/1"
WEIGHTS, CONFIG = "adapter.safetensors", "adapter_config.json"
PEFT_WEIGHTS, PEFT_PREFIX = "adapter_model.safetensors", "base_model.model."


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """A safetensors file, written atomically (tensors moved to the CPU, made contiguous)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def save_adapter(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the adapter (every trainable tensor) and its config to directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {**adapter_config(model), "format": FORMAT, **(extra or {})}
    save_tensors(path / WEIGHTS, trainable_state_dict(model), {"format": FORMAT})
    write_json(path / CONFIG, config, sort_keys=True)
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a saved lowrank adapter, without a model."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"no {CONFIG} in {str(path)!r}; point at a directory written by lowrank.save_adapter")
    return json.loads((path / CONFIG).read_text()), load_file(str(path / WEIGHTS))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Adapt a fresh base ``model`` as the saved adapter was, and load its weights."""
    config, tensors = read_adapter(path)
    if config.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} holds format {config.get('format')!r}, not {FORMAT!r}; "
                         f"for PEFT adapters use lowrank.load_peft")
    adapt(model, config["adapter"], targets=config["targets"], rank=config["rank"], alpha=config["alpha"],
          layers=config["layers"], train_modules=config["train_modules"], **config["options"])
    load_into(model, tensors, str(path))
    return model


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: str,
              fix: str = "load it into the base model it was trained on") -> None:
    """Copy saved tensors into the model's parameters of the same names (shapes checked)."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{source!r} has tensors the adapted model lacks, e.g. {missing[:3]}; {fix}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: saved shape {tuple(value.shape)} != model shape {tuple(params[name].shape)}")
            params[name].copy_(value)


# ---- PEFT ------------------------------------------------------------------------------------------

def _peft_layer_keys(name: str, layer) -> dict[str, torch.Tensor]:
    if isinstance(layer, FusedLoRA) or not isinstance(layer, LoRA):
        raise ValueError(f"{name!r} is a {type(layer).__name__}; PEFT's format holds plain LoRA/DoRA layers only")
    A, B, prefix = layer.lora_A, layer.lora_B, PEFT_PREFIX + name
    if layer.kind == "embedding":
        return {f"{prefix}.lora_embedding_A": A, f"{prefix}.lora_embedding_B": B}
    if layer.kind == "conv2d":
        A, B = A.reshape(layer.rank, *layer.base.weight.shape[1:]), B[:, :, None, None]
    keys = {f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B}
    if isinstance(layer, DoRA):
        keys[f"{prefix}.lora_magnitude_vector"] = layer.magnitude
    return keys


def save_peft(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write a LoRA/DoRA-adapted model in PEFT's on-disk format (loadable by ``PeftModel.from_pretrained``)."""
    config = adapter_config(model)
    if config["adapter"] not in ("lora", "dora"):
        raise ValueError(f"PEFT's LoRA format holds lora or dora adapters, not {config['adapter']!r}; "
                         f"use lowrank.save_adapter")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = adapted_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update(_peft_layer_keys(name, layer))
    trained = trainable_state_dict(model)
    for name, p in trained.items():
        if any(name.startswith(h + ".") for h in config["train_modules"]):
            tensors[PEFT_PREFIX + name] = p
    first = next(iter(layers.values()))
    options = config["options"]
    peft_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if config["train_modules"] else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config["rank"],
        "lora_alpha": first.alpha,
        "lora_dropout": options.get("dropout", 0.0),
        "use_rslora": options.get("rslora", False),
        "use_dora": config["adapter"] == "dora",
        "target_modules": sorted(layers),
        "modules_to_save": config["train_modules"] or None,
        "fan_in_fan_out": any(layer.kind == "conv1d" for layer in layers.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    save_tensors(path / PEFT_WEIGHTS, tensors, {"format": "pt"})
    write_json(path / "adapter_config.json", peft_config, sort_keys=True)
    return path


def load_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Adapt a fresh base ``model`` from a PEFT LoRA/DoRA adapter directory and load its weights."""
    path = Path(path)
    peft_config = json.loads((path / "adapter_config.json").read_text())
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{str(path)!r} is a {peft_config.get('peft_type')} adapter; only PEFT LORA (with or "
                         f"without use_dora) converts to lowrank")
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise ValueError(f"{str(path)!r} uses rank_pattern/alpha_pattern, which lowrank does not map; "
                         f"save the PEFT adapter with one rank and alpha")
    targets = peft_config["target_modules"]
    targets = ["re:" + targets] if isinstance(targets, str) else list(targets)
    adapt(model, "dora" if peft_config.get("use_dora") else "lora", targets=targets, rank=peft_config["r"],
          alpha=peft_config["lora_alpha"], layers=peft_config.get("layers_to_transform"),
          dropout=peft_config.get("lora_dropout", 0.0), rslora=peft_config.get("use_rslora", False),
          train_modules=peft_config.get("modules_to_save") and [
              m for m in peft_config["modules_to_save"] if any(n.endswith(m) for n, _ in model.named_modules())])
    raw = load_file(str(path / PEFT_WEIGHTS))
    tensors: dict[str, torch.Tensor] = {}
    layers = adapted_modules(model)
    for key, value in raw.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|lora_embedding_A|"
                         r"lora_embedding_B)", name)
        if m is None:  # a module to save
            name = name.replace(".modules_to_save.default.", ".")
            tensors[name] = value
            continue
        module, part = m.groups()
        layer = layers[module]
        if part in ("lora_A.weight", "lora_embedding_A"):
            tensors[f"{module}.lora_A"] = value.reshape(layer.lora_A.shape)
        elif part in ("lora_B.weight", "lora_embedding_B"):
            tensors[f"{module}.lora_B"] = value.reshape(layer.lora_B.shape)
        else:
            tensors[f"{module}.magnitude"] = value
    load_into(model, tensors, str(path))
    return model
